"""Both C++ kernels (fast and clear) against the PyTorch reference over many shapes: GQA ratios,
padding, odd sizes, prefill + decode. The tolerance is compare's own policy (derived from the
reference's float32-vs-float64 noise), so these tests hold each kernel to what users are told."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xvalid.config import ModelConfig
from xvalid.generate import generate_model
from xvalid.metrics import POLICIES
from xvalid.modelfile import write_model
from xvalid.reference import Reference

core = pytest.importorskip("xvalid._core", reason="the C++ module is not built")


def check_against_reference(mf, path, decode_steps: int = 0) -> None:
    write_model(mf, path, progress=False)
    keep = mf.attention_mask.astype(bool)
    ref32 = Reference(mf, "float32").forward(mf.input_ids, mf.attention_mask).numpy()
    ref64 = Reference(mf, "float64").forward(mf.input_ids, mf.attention_mask).numpy()
    atol = POLICIES["float32"].atol(np.abs(ref32 - ref64)[keep].max(), np.abs(ref32[keep]).max())
    for kernel in core.kernels():
        check_kernel(core.Model(str(path), kernel), mf, ref32, keep, atol, decode_steps)


def check_kernel(model, mf, ref32, keep, atol, decode_steps) -> None:
    ours = model.forward(mf.input_ids, mf.attention_mask)
    assert ours.shape == ref32.shape and ours.dtype == np.float32
    err = np.abs(ours - ref32)[keep].max()
    assert err <= atol, f"{model.kernel}: max abs {err:.3g} > atol {atol:.3g} for {mf.config}"
    if decode_steps:
        S, n = mf.seq_len, decode_steps
        model.reset_cache()
        model.step(mf.input_ids[:, :S - n], mf.attention_mask[:, :S - n])
        for t in range(S - n, S):
            step = model.step(mf.input_ids[:, t:t + 1], mf.attention_mask[:, :t + 1])
            rows = keep[:, t]
            if rows.any():
                assert np.abs(step[rows, 0] - ref32[rows, t]).max() <= atol, (model.kernel, t)
        assert model.cache_len == S


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 6, 8]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([2, 4, 6, 8, 16]))
    seq_len = draw(st.integers(1, 12))
    batch = draw(st.integers(1, 4))
    cfg = ModelConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=draw(st.integers(2, 150)),
                      num_hidden_layers=draw(st.integers(1, 3)),
                      intermediate_size=draw(st.sampled_from([0, 1, 17, 100])),
                      max_position_embeddings=seq_len + draw(st.integers(0, 5)))
    pad = draw(st.integers(0, batch)) if seq_len > 1 else 0
    return cfg, batch, seq_len, pad, draw(st.integers(0, 2**31))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=configs())
def test_cpp_matches_torch_over_random_configs(case, tmp_path):
    cfg, batch, seq_len, pad, seed = case
    mf = generate_model(cfg, batch_size=batch, seq_len=seq_len, seed=seed, pad=pad)
    check_against_reference(mf, tmp_path / "m.json", decode_steps=min(3, seq_len - 1))


@pytest.mark.parametrize("hidden,heads,kvh,seq,batch,pad", [
    (64, 8, 8, 16, 2, 1), (64, 8, 2, 1, 1, 0), (64, 8, 1, 33, 4, 4),
    (128, 8, 2, 64, 3, 2), (256, 8, 1, 17, 2, 2), (512, 8, 2, 128, 2, 2), (512, 8, 8, 7, 4, 3),
])
def test_cpp_matches_torch_on_the_acceptance_grid(tmp_path, hidden, heads, kvh, seq, batch, pad):
    cfg = ModelConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kvh,
                      vocab_size=300, max_position_embeddings=128)
    mf = generate_model(cfg, batch_size=batch, seq_len=seq, seed=hidden + seq, pad=pad)
    check_against_reference(mf, tmp_path / "m.json", decode_steps=min(4, seq - 1))


@pytest.mark.parametrize("flags", [
    ["--kv-heads", 2, "--seq-len", 9, "--batch-size", 3, "--pad", 2],
    ["--kv-heads", 8, "--seq-len", 5],
    ["--kv-heads", 1, "--hidden", 128, "--seq-len", 12, "--batch-size", 4, "--pad", 4],
])
def test_compare_passes_torch_and_cpp_with_decode(cli, tmp_path, flags):
    model, report = tmp_path / "m.json", tmp_path / "r.json"
    assert cli("generate", *flags, "-o", model).code == 0
    result = cli("compare", model, "--backends", "torch,cpp,cpp-clear", "--decode", 4,
                 "--repeat", 2, "--json", report)
    assert result.code == 0, result.out + result.err
    data = json.loads(report.read_text())
    for name in ("cpp", "cpp-clear"):
        cpp = next(c for c in data["candidates"] if c["name"] == name)
        assert cpp["status"] == "pass" and cpp["decode"]["pass"]
        assert cpp["divergence"]["first"] is None and len(cpp["divergence"]["points"]) > 20
        assert cpp["timing"]["ratio_to_torch"] > 0
    backends = data["versions"]["backends"]
    assert backends["cpp"]["kernel"] == "fast" and backends["cpp-clear"]["kernel"] == "clear"
    assert "first divergence" not in result.out and "PASS" in result.out


def test_run_cpp_backend_writes_the_same_files_as_torch(cli, tiny_model, tmp_path):
    for backend in ("torch", "cpp", "cpp-clear"):
        result = cli("run", tiny_model, "--backend", backend, "-o", tmp_path / f"{backend}.npy",
                     "--intermediates", tmp_path / backend)
        assert result.code == 0, result.err
    torch_files = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert len(torch_files) == 1 + 12 * 2 + 2
    for backend in ("cpp", "cpp-clear"):
        assert torch_files == sorted(p.name for p in (tmp_path / backend).iterdir())
        assert np.abs(np.load(tmp_path / "torch.npy") - np.load(tmp_path / f"{backend}.npy")).max() < 1e-5


def test_standalone_runner_passes_as_an_external_engine(cli, tmp_path, make_model):
    """The binary people debug with gdb follows the engine protocol, intermediates included."""
    import shutil
    import sys
    from pathlib import Path
    runner = shutil.which("xvalid-run", path=str(Path(sys.executable).parent))
    if runner is None:
        pytest.skip("xvalid-run is not installed beside this interpreter")
    model = make_model(kv_heads=1, seq_len=9, batch_size=3, pad=2)
    report = tmp_path / "r.json"
    result = cli("compare", model, "--backends", "torch", "--engine",
                 "xvalid-run {model} {out} --intermediates", "--json", report)
    assert result.code == 0, result.out + result.err
    engine = json.loads(report.read_text())["candidates"][1]
    assert engine["status"] == "pass" and engine["divergence"]["first"] is None
    assert len(engine["divergence"]["points"]) == 1 + 12 * 2 + 2
