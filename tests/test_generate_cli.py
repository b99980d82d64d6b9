"""`xvalid generate`: determinism, what the weights look like, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from xvalid.modelfile import read_model


def test_same_flags_give_byte_identical_files(cli, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path in (a, b):
        result = cli("generate", "--hidden", 64, "--layers", 2, "-o", path)
        assert result.code == 0, result.err
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.json"
    cli("generate", "--hidden", 64, "--layers", 2, "--seed", 124, "-o", c)
    assert c.read_bytes() != a.read_bytes()


def test_generated_weights_make_bugs_visible(cli, tmp_path):
    path = tmp_path / "m.json"
    assert cli("generate", "--batch-size", 4, "--seq-len", 9, "--pad", 3, "-o", path).code == 0
    mf = read_model(path)
    w = mf.weights
    assert np.array_equal(w.lm_head, w.tok_embedding)  # tied
    for norm in [w.final_rms] + [l.rms_attn for l in w.layers] + [l.rms_ffn for l in w.layers]:
        assert norm.std() > 0.1 and 0.5 <= norm.min() and norm.max() <= 1.5  # not all ones
    assert abs(w.layers[0].wq.std() - 0.02) < 0.002
    mask = mf.attention_mask
    assert mask[0].all()  # unpadded row
    assert mask[1][0] == 0 and mask[1][-1] == 1  # left padded
    assert mask[2][0] == 1 and mask[2][-1] == 0  # right padded
    assert mask[3][0] == 0  # left again
    # Padded positions hold random ids, not one token: with one token there, padded rows
    # would agree whatever an engine's attention does with them.
    assert len(np.unique(mf.input_ids[mask == 0])) > 3
    stats = mf.meta["reference"]
    assert stats["top1_margin_min"] > 1e-3 and stats["rows"] == int(mask.sum())
    assert "xvalid generate" in mf.meta["generator"]["command"]


def test_flags_reach_the_config(cli, tmp_path):
    path = tmp_path / "m.json"
    result = cli("generate", "--hidden", 96, "--layers", 3, "--heads", 6, "--kvh", 3,
                 "--vocab", 77, "--max-pos", 40, "--seq-len", 7, "--batch-size", 3,
                 "--rope-theta", 10000, "--eps", 1e-6, "--intermediate", 100, "-o", path)
    assert result.code == 0, result.err
    c = read_model(path).config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.max_position_embeddings, c.intermediate_size, c.head_dim) == \
        (96, 3, 6, 3, 77, 40, 100, 16)
    assert c.rope_theta == 10000 and c.rms_norm_eps == 1e-6


@pytest.mark.parametrize("hidden,expected", [(64, 192), (128, 384), (256, 704), (512, 1408),
                                             (768, 2048), (1024, 2752)])
def test_intermediate_follows_the_minimind_rule(hidden, expected):
    from xvalid.config import ModelConfig
    assert ModelConfig(hidden_size=hidden).intermediate_size == expected


def test_presets(cli, tmp_path):
    path = tmp_path / "m.json"
    assert cli("generate", "--preset", "minimind2-small", "--layers", 1, "--max-pos", 64,
               "-o", path).code == 0
    c = read_model(path).config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
            c.intermediate_size) == (512, 8, 2, 6400, 1408)
    from xvalid.config import PRESETS
    assert PRESETS["minimind2"].num_parameters == pytest.approx(104.0e6, rel=0.01)
    assert PRESETS["minimind2-small"].num_parameters == pytest.approx(25.8e6, rel=0.01)


@pytest.mark.parametrize("flags,needle", [
    (["--heads", 7], "does not divide hidden_size"),
    (["--kv-heads", 3], "does not divide num_attention_heads"),
    (["--hidden", 72], "must be even"),
    (["--seq-len", 200], "exceeds --max-pos"),
    (["--hidden", 0], "must be positive"),
    (["--layers", -1], "must be positive"),
    (["--vocab", 0], "must be positive"),
    (["--batch-size", 0], "must be positive"),
    (["--seq-len", 0], "must be positive"),
    (["--hidden", 10**9], "absurdly large"),
    (["--hidden", 2**16, "--vocab", 2**20, "--heads", 8], "GiB of float32 weights"),
    (["--pad", 3], "--pad 3"),
    (["--seq-len", 1, "--pad", 1], "--pad needs"),
    (["--init-std", -1], "--init-std"),
    (["--eps", 0], "rms_norm_eps"),
    (["--hidden", "abc"], "'abc' is not a valid integer"),
    (["--preset", "nope"], "nope"),
    (["--bogus"], "--bogus"),
])
def test_impossible_configs_are_refused(cli, tmp_path, flags, needle):
    path = tmp_path / "m.json"
    cli("generate", *flags, "-o", path).assert_one_line_error(2, needle)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused_without_leftovers(cli, tmp_path):
    cli("generate", "-o", tmp_path / "missing" / "m.json").assert_one_line_error(
        2, "directory", "does not exist")
    assert list(tmp_path.iterdir()) == []
    target = tmp_path / "dir.json"
    target.mkdir()
    cli("generate", "-o", target).assert_one_line_error(2, "dir.json", "is a directory")
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


def test_padding_is_seeded_and_every_padded_row_keeps_a_real_token():
    """S = 2 is the edge: a padded row then has exactly one padded and one real position."""
    from xvalid.config import ModelConfig
    from xvalid.generate import generate_model
    for seed in range(8):
        mf = generate_model(ModelConfig(), batch_size=4, seq_len=2, seed=seed, pad=4)
        assert mf.attention_mask.sum(axis=1).tolist() == [1, 1, 1, 1], seed
        again = generate_model(ModelConfig(), batch_size=4, seq_len=2, seed=seed, pad=4)
        assert np.array_equal(mf.input_ids, again.input_ids)
    mf = generate_model(ModelConfig(), batch_size=3, seq_len=16, seed=5, pad=2)
    padded = mf.input_ids[mf.attention_mask == 0]
    assert padded.size >= 2 and len(np.unique(padded)) > padded.size // 2


def test_seq_len_may_equal_max_positions(cli, tmp_path):
    path = tmp_path / "m.json"
    result = cli("generate", "--seq-len", 16, "--max-pos", 16, "-o", path)
    assert result.code == 0, result.err
    assert read_model(path).input_ids.shape == (2, 16)
    cli("generate", "--seq-len", 17, "--max-pos", 16, "-o", path).assert_one_line_error(
        2, "--seq-len 17 exceeds --max-pos 16")


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    from xvalid import modelfile
    from xvalid.config import ModelConfig
    from xvalid.generate import generate_model
    mf = generate_model(ModelConfig())
    calls = {"n": 0}
    real = modelfile.encode_tensor

    def interrupt_midway(name, array, *stored):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(name, array, *stored)

    monkeypatch.setattr(modelfile, "encode_tensor", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        modelfile.write_model(mf, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_module_and_console_script_entry_points(tmp_path):
    path = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "xvalid", "generate", "-o", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "top-1 margin" in proc.stdout
    assert json.loads(path.read_text())["format"] == "xvalid-model"
    script = subprocess.run([str(__import__("pathlib").Path(sys.executable).parent / "xvalid"),
                             "--version"], capture_output=True, text=True)
    assert script.returncode == 0 and "0.1.0" in script.stdout


def test_recorded_command_regenerates_the_same_file(cli, tmp_path):
    import shlex
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("generate", "--hidden", 48, "--heads", 6, "--kv-heads", 3, "--rope-theta", 1234567.8,
               "--init-std", 0.0312345678, "--seq-len", 7, "--batch-size", 3, "--pad", 2,
               "--seed", 99, "-o", a).code == 0
    command = shlex.split(read_model(a).meta["generator"]["command"])
    assert command[:2] == ["xvalid", "generate"]
    assert cli(*command[1:], "-o", b).code == 0
    assert a.read_bytes() == b.read_bytes()


def test_pad_len_sets_the_padding_of_every_padded_row(cli, tmp_path):
    """--pad 3 --pad-len 6 on S=8: rows 1..3 padded left, right, left by exactly 6 positions;
    the recorded command carries --pad-len; other draws are unchanged by it."""
    path, free = tmp_path / "m.json", tmp_path / "free.json"
    assert cli("generate", "--batch-size", 4, "--seq-len", 8, "--pad", 3, "--pad-len", 6,
               "-o", path).code == 0
    assert cli("generate", "--batch-size", 4, "--seq-len", 8, "--pad", 3, "-o", free).code == 0
    mf = read_model(path)
    assert mf.attention_mask.tolist() == [[1] * 8, [0] * 6 + [1] * 2, [1] * 2 + [0] * 6,
                                          [0] * 6 + [1] * 2]
    assert "--pad 3 --pad-len 6 " in mf.meta["generator"]["command"]
    unpadded = mf.attention_mask[0] == 1
    assert np.array_equal(mf.input_ids[0][unpadded], read_model(free).input_ids[0][unpadded])


@pytest.mark.parametrize("flags,needle", [
    (["--seq-len", 8, "--pad-len", 8], "--pad-len 8 must be between 1 and --seq-len - 1 = 7"),
    (["--seq-len", 8, "--pad-len", 0], "--pad-len 0 must be between 1"),
    (["--seq-len", 8, "--pad", 0, "--pad-len", 2], "--pad-len needs padded rows"),
])
def test_impossible_pad_len_is_refused(cli, tmp_path, flags, needle):
    cli("generate", *flags, "-o", tmp_path / "m.json").assert_one_line_error(2, needle)
    assert not (tmp_path / "m.json").exists()
