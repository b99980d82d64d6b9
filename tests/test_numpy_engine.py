"""Tests of the test fixtures in tests/engines/ (no xvalid import):

- write_seed_model.py writes the seed's layout and nothing else;
- numpy_engine.py matches an independent torch float64 forward written here from the spec;
- every --bug changes the logits where it is observable (and only there), every --fail misbehaves
  as documented, and the intermediates carry docs/intermediates.md's names and shapes.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENGINES = REPO / "tests" / "engines"
ENGINE = ENGINES / "numpy_engine.py"
sys.path.insert(0, str(ENGINES))
from seedfile import read_model  # noqa: E402
from write_seed_model import minimind_intermediate_size, write_seed_model  # noqa: E402

BUGS = ["gqa", "rope-k-missing", "rope-interleaved", "no-padding-mask", "attn-lost",
        "norm-weight-ignored", "causal-off-by-one", "nan"]

SMALL = dict(hidden=64, layers=2, vocab=128, max_pos=32, seed=7)
CONFIGS = {
    "gqa8-8": dict(SMALL, heads=8, kv_heads=8, batch=2, seq=6),
    "gqa8-2-padded": dict(SMALL, heads=8, kv_heads=2, batch=3, seq=8,
                          pad_left_rows=(0,), pad_right_rows=(2,)),
    "gqa8-1": dict(SMALL, heads=8, kv_heads=1, batch=2, seq=6),
    "odd-vocab": dict(SMALL, hidden=32, heads=4, kv_heads=2, vocab=131, batch=2, seq=5),
    # every bug is observable here: KVH not in {1, NH}, a left-padded row, seq > 1, norm weights random
    "bugs": dict(SMALL, heads=8, kv_heads=2, batch=2, seq=8, pad_left_rows=(1,)),
    # where some bugs are invisible
    "right-padded": dict(SMALL, heads=8, kv_heads=2, batch=2, seq=8, pad_right_rows=(1,)),
    "ones-norm": dict(SMALL, heads=8, kv_heads=2, batch=2, seq=8, random_norm_weights=False),
}
INVISIBLE = [  # (bug, config): the bug cannot change the logits of unpadded rows there
    ("gqa", "gqa8-8"),                 # h % 8 == h // 1
    ("gqa", "gqa8-1"),                 # both map every head to kv head 0
    ("no-padding-mask", "gqa8-8"),     # nothing padded
    ("no-padding-mask", "right-padded"),  # causality already hides right padding from real rows
    ("norm-weight-ignored", "ones-norm"),  # the seed's all-ones norms
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """config name -> (path, arrays as written); written once per module."""
    root = tmp_path_factory.mktemp("models")
    return {name: (root / f"{name}.json", write_seed_model(root / f"{name}.json", **kw))
            for name, kw in CONFIGS.items()}


def run_engine(model_path, out_dir, *args, timeout=60):
    return subprocess.run([sys.executable, str(ENGINE), str(model_path), str(out_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


def engine_logits(model, out_dir, *args):
    path, arrays = model
    r = run_engine(path, out_dir, "--no-intermediates", *args)
    assert r.returncode == 0, r.stderr
    B, S = arrays["inputs"]["input_ids"].shape
    return np.fromfile(Path(out_dir) / "logits.bin", dtype="<f4").reshape(B, S, -1)


def max_diff_unpadded(a, b, mask):
    """max |a - b| over rows whose own mask is 1; NaN counts as infinitely different."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[mask.astype(bool)]
    return float(np.nan_to_num(d, nan=np.inf).max())


def torch_logits(m):
    """The spec's forward pass in torch float64, from the writer's arrays (not the file)."""
    c, w = m["config"], m["weights"]
    T = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    H, NH, KVH, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = H // NH
    ids = torch.from_numpy(m["inputs"]["input_ids"].astype(np.int64))
    keep = torch.from_numpy(m["inputs"]["attention_mask"].astype(bool))
    B, S = ids.shape
    cos, sin = T(m["rope"]["cos"][:S]), T(m["rope"]["sin"][:S])

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * T(g)

    def rot(x):  # (B,heads,S,hd), rotate-half
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def heads(y, n):  # (B,S,n*hd) -> (B,n,S,hd)
        return y.view(B, S, n, hd).transpose(1, 2)

    bias = torch.full((S, S), -math.inf, dtype=torch.float64).triu(1) \
        + torch.where(keep, 0.0, -1e9)[:, None, None, :].double()
    E = T(w["tok_embedding"])
    x = E[ids]
    for L in w["layers"]:
        a = norm(x, L["rms_attn"])
        q = rot(heads(a @ T(L["wq"]).T, NH))
        k = rot(heads(a @ T(L["wk"]).T, KVH)).repeat_interleave(NH // KVH, dim=1)
        v = heads(a @ T(L["wv"]).T, KVH).repeat_interleave(NH // KVH, dim=1)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
        x = x + (p @ v).transpose(1, 2).reshape(B, S, H) @ T(L["wo"]).T
        f = norm(x, L["rms_ffn"])
        x = x + (torch.nn.functional.silu(f @ T(L["w_gate"]).T) * (f @ T(L["w_up"]).T)) @ T(L["w_down"]).T
    return (norm(x, w["final_rms"]) @ E.T).numpy()


def documented_intermediates(n_layers):
    """[(name, shape symbols)] in docs/intermediates.md's (forward) order, layer{l} rows expanded."""
    text = (REPO / "docs" / "intermediates.md").read_text()
    rows = [(n, s.split(",")) for n, s in re.findall(r"^\| `([^`]+)` \| \(([^)]*)\) \|", text, re.M)]
    layer = [i for i, (n, _) in enumerate(rows) if "{l}" in n]
    assert rows and layer == list(range(layer[0], layer[-1] + 1)), "unexpected intermediates table"
    per_layer = [(n.format(l=l), s) for l in range(n_layers) for n, s in rows[layer[0]:layer[-1] + 1]]
    return rows[:layer[0]] + per_layer + rows[layer[-1] + 1:]


def arrays_by_path(tree, prefix=""):
    """{"weights/layers/0/wq": array, ...} for every array in a nested dict/list."""
    if isinstance(tree, np.ndarray):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    return {k: v for key, sub in items for k, v in arrays_by_path(sub, f"{prefix}/{key}").items()}


# ---- the writer ---------------------------------------------------------------------------

def test_writer_round_trip_and_layout(models):
    path, arrays = models["gqa8-2-padded"]
    doc = json.loads(path.read_text())
    assert set(doc) == {"meta", "config", "inputs", "rope", "weights"}   # no xvalid-only keys
    assert doc["meta"] == {"seed": 7, "B": 3, "S": 8, "head_dim": 8}
    assert set(doc["config"]) >= {"hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "intermediate_size",
                                  "max_position_embeddings", "rms_norm_eps", "rope_theta",
                                  "hidden_act", "tie_word_embeddings"}
    t = doc["weights"]["layers"][1]["wq"]
    assert (t["name"], t["shape"], t["dtype"], t["encoding"]) == ("layer1_wq", [64, 64], "float32", "base64")
    assert t["preview"] == arrays["weights"]["layers"][1]["wq"].reshape(-1)[:16].tolist()
    assert doc["inputs"]["attention_mask"]["dtype"] == "uint8"
    assert doc["inputs"]["input_ids"]["dtype"] == "int32"

    read = read_model(path)
    a, b = arrays_by_path(arrays), arrays_by_path(read)
    assert a.keys() == b.keys() and len(a) == 4 + 3 + 2 * 9
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_writer_contents(models):
    _, m = models["gqa8-2-padded"]
    w = m["weights"]
    assert np.array_equal(w["lm_head"], w["tok_embedding"])
    assert 0.5 <= w["final_rms"].min() and w["final_rms"].max() <= 1.5 and w["final_rms"].std() > 0.1
    mask, ids = m["inputs"]["attention_mask"], m["inputs"]["input_ids"]
    assert mask.tolist() == [[0] * 4 + [1] * 4, [1] * 8, [1] * 4 + [0] * 4]
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] > 0).all()
    # rope: float32 tables within float32 rounding of the float64 formula
    pos, i = np.arange(32)[:, None], np.arange(8) % 4
    ang = pos / 1e6 ** (2 * i / 8)
    assert np.abs(m["rope"]["cos"] - np.cos(ang)).max() < 1e-6
    assert np.abs(m["rope"]["sin"] - np.sin(ang)).max() < 1e-6
    _, ones = models["ones-norm"]
    assert (ones["weights"]["layers"][0]["rms_attn"] == 1).all()
    assert [minimind_intermediate_size(h) for h in (64, 128, 256, 512, 768, 1024)] == \
        [192, 384, 704, 1408, 2048, 2752]


def test_writer_script(tmp_path):
    out = tmp_path / "m.json"
    subprocess.run([sys.executable, str(ENGINES / "write_seed_model.py"), str(out), "--hidden", "32",
                    "--heads", "4", "--kvh", "1", "--seq-len", "4", "--pad-left", "0,1"], check=True)
    m = read_model(out)
    assert m["config"]["num_key_value_heads"] == 1
    assert m["inputs"]["attention_mask"].tolist() == [[0, 0, 1, 1]] * 2


# ---- the engine: correctness ----------------------------------------------------------------

@pytest.mark.parametrize("config", ["gqa8-8", "gqa8-2-padded", "gqa8-1", "odd-vocab"])
def test_engine_matches_torch(models, config, tmp_path):
    _, m = models[config]
    mask = m["inputs"]["attention_mask"]
    got = engine_logits(models[config], tmp_path)
    assert got.shape == mask.shape + (m["config"]["vocab_size"],)
    assert max_diff_unpadded(got, torch_logits(m), mask) < 1e-5


def test_engine_float32(models, tmp_path):
    _, m = models["gqa8-2-padded"]
    got = engine_logits(models["gqa8-2-padded"], tmp_path, "--dtype", "float32")
    assert max_diff_unpadded(got, torch_logits(m), m["inputs"]["attention_mask"]) < 1e-5


# ---- the engine: bugs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def correct_logits(models, tmp_path_factory):
    return {name: engine_logits(models[name], tmp_path_factory.mktemp(f"ok-{name}"))
            for name in {"bugs", *(c for _, c in INVISIBLE)}}


@pytest.mark.parametrize("bug", BUGS)
def test_bug_is_observable(models, correct_logits, bug, tmp_path):
    """On GQA 8/2, batch 2, seq 8, row 1 left-padded by 4, random norm weights."""
    got = engine_logits(models["bugs"], tmp_path, "--bug", bug)
    mask = models["bugs"][1]["inputs"]["attention_mask"]
    assert max_diff_unpadded(got, correct_logits["bugs"], mask) > 1e-3


@pytest.mark.parametrize("bug,config", INVISIBLE)
def test_bug_is_invisible(models, correct_logits, bug, config, tmp_path):
    got = engine_logits(models[config], tmp_path, "--bug", bug)
    mask = models[config][1]["inputs"]["attention_mask"]
    assert max_diff_unpadded(got, correct_logits[config], mask) < 1e-6


# ---- the engine: output protocol ------------------------------------------------------------

def test_formats_and_intermediates(models, tmp_path):
    path, m = models["gqa8-2-padded"]
    c = m["config"]
    B, S = m["inputs"]["input_ids"].shape
    dims = dict(B=B, S=S, H=c["hidden_size"], NH=c["num_attention_heads"], KVH=c["num_key_value_heads"],
                hd=m["meta"]["head_dim"], I=c["intermediate_size"], V=c["vocab_size"])

    assert run_engine(path, tmp_path / "raw").returncode == 0
    raw_file = tmp_path / "raw" / "logits.bin"
    assert raw_file.stat().st_size == B * S * dims["V"] * 4
    raw = np.fromfile(raw_file, dtype="<f4").reshape(B, S, -1)

    assert run_engine(path, tmp_path / "npy", "--format", "npy", "--no-intermediates",
                      "--no-timing").returncode == 0
    assert sorted(p.name for p in (tmp_path / "npy").iterdir()) == ["engine.json", "logits.npy"]
    assert json.loads((tmp_path / "npy" / "engine.json").read_text()) == {"dtype": "float64"}
    npy = np.load(tmp_path / "npy" / "logits.npy")
    assert npy.dtype == np.float32 and np.array_equal(npy, raw)

    assert run_engine(path, tmp_path / "named", "--format", "npy", "--output-name", "out.bin",
                      "--no-intermediates").returncode == 0
    assert np.array_equal(np.load(tmp_path / "named" / "out.bin"), raw)

    expected = documented_intermediates(c["num_hidden_layers"])
    written = tmp_path / "raw" / "intermediates"
    assert sorted(p.name for p in written.iterdir()) == sorted(n + ".npy" for n, _ in expected)
    for name, shape in expected:
        a = np.load(written / f"{name}.npy")
        assert a.dtype == np.float32 and a.shape == tuple(dims[s.strip()] for s in shape), name
    assert np.array_equal(np.load(written / "logits.npy"), raw)
    embedding = m["weights"]["tok_embedding"][m["inputs"]["input_ids"]]
    assert np.array_equal(np.load(written / "embedding.npy"), embedding)


def test_fail_exit3(models, tmp_path):
    r = run_engine(models["gqa8-8"][0], tmp_path / "out", "--fail", "exit3", timeout=20)
    assert r.returncode == 3 and "exit3" in r.stderr
    assert not (tmp_path / "out").exists()


def test_fail_none_written(models, tmp_path):
    r = run_engine(models["gqa8-8"][0], tmp_path / "out", "--fail", "none-written", timeout=20)
    assert r.returncode == 0 and not (tmp_path / "out").exists()


def test_fail_sleep(models, tmp_path):
    p = subprocess.Popen([sys.executable, str(ENGINE), str(models["gqa8-8"][0]), str(tmp_path / "out"),
                          "--fail", "sleep"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait(timeout=10)
    assert not (tmp_path / "out").exists()


def test_fail_short(models, tmp_path):
    r = run_engine(models["gqa8-8"][0], tmp_path, "--fail", "short", "--no-intermediates", timeout=20)
    assert r.returncode == 0
    assert (tmp_path / "logits.bin").stat().st_size == (2 * 6 * 128 - 1) * 4


def test_fail_long(models, tmp_path):
    r = run_engine(models["gqa8-8"][0], tmp_path, "--fail", "long", "--no-intermediates", timeout=20)
    assert r.returncode == 0
    data = (tmp_path / "logits.bin").read_bytes()
    assert len(data) == (2 * 6 * 128 + 1) * 4 and data[-4:] == data[:4]


def test_fail_two_files(models, tmp_path):
    r = run_engine(models["gqa8-8"][0], tmp_path, "--fail", "two-files", "--no-intermediates",
                   "--no-timing", timeout=20)
    assert r.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.json", "extra.bin", "logits.bin"]
    assert (tmp_path / "extra.bin").read_bytes() == (tmp_path / "logits.bin").read_bytes()


# ---- the engine: KV cache, decode and timing (protocol version 2) ----------------------------

def test_decode_through_the_kv_cache_matches_torch_and_the_cache_bug_shows_from_step_2(
        models, tmp_path):
    """Prefill S-3, then 3 one-token steps: each step equals the independent torch forward at its
    position. --bug kv-cache-position leaves the full forward and step 1 right and breaks step 2."""
    path, m = models["gqa8-2-padded"]
    mask = m["inputs"]["attention_mask"]
    S = mask.shape[1]
    expected = torch_logits(m)[:, S - 3:]
    keep = mask[:, S - 3:].astype(bool)
    env = dict(os.environ, XVALID_REPEAT="2", XVALID_WARMUP="1")
    steps = {}
    for bug in (None, "kv-cache-position"):
        out = tmp_path / str(bug)
        r = subprocess.run([sys.executable, str(ENGINE), str(path), str(out), "--format", "npy",
                            "--no-intermediates", "--decode", "3", *(["--bug", bug] if bug else [])],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        decoded = np.load(out / "decode_logits.npy")
        assert decoded.shape == (3, 3, m["config"]["vocab_size"]) and decoded.dtype == np.float32
        steps[bug] = [float(np.abs(decoded[keep[:, i], i] - expected[keep[:, i], i]).max())
                      for i in range(3)]
        full = np.load(out / "logits.npy")
        assert max_diff_unpadded(full, torch_logits(m), mask) < 1e-5
        timing = json.loads((out / "timing.json").read_text())
        assert len(timing["forward_ms"]) == 2 and timing["warmup"] == 1
        assert len(timing["decode_ms"]) == 3 and timing["prefill_ms"] > 0
    assert max(steps[None]) < 1e-5
    assert steps["kv-cache-position"][0] < 1e-5 and min(steps["kv-cache-position"][1:]) > 1e-3


def test_seed_style_writes_raw_logits_only(models, tmp_path):
    env = dict(os.environ, XVALID_DECODE_STEPS="2")
    r = subprocess.run([sys.executable, str(ENGINE), str(models["gqa8-8"][0]), str(tmp_path),
                        "--seed-style"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["logits.bin"]
