"""Hostile model files, generated: byte flips, truncations, spliced junk and edited numbers.
Whatever the damage, both loaders either read the file or refuse it with one line (exit 2
from the CLI, ModelFileError from the C++ module): never a crash, a hang or a traceback."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, CliResult, find_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@st.composite
def damaged(draw, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "number"]))
    n = len(original)
    if kind == "flip":  # a few bytes anywhere get random values
        data = bytearray(original)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return original[:draw(st.integers(0, n - 1))]
    if kind == "splice":  # junk inserted at a random place
        at = draw(st.integers(0, n))
        return original[:at] + draw(st.binary(min_size=1, max_size=40)) + original[at:]
    # a number in the JSON (a config value, a shape, a dimension) replaced by a hostile one
    numbers = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?(e[-+]?\d+)?", original[:4000])]
    start, end = draw(st.sampled_from(numbers))
    value = draw(st.sampled_from([b"0", b"-1", b"1e308", b"NaN", b"2147483648", b"99999999999",
                                  b"3.5", b"true", b"null", b'"7"', b"[]", b"1e999", b"-1e400",
                                  b"9" * 400, b"18446744073709551615", b"9223372036854775808",
                                  b"1e-31", b"1e13", b"[" * 65 + b"]" * 65, b"[" * 64 + b"]" * 64]))
    return original[:start] + value + original[end:]


class Original(bytes):
    def __repr__(self) -> str:  # hypothesis prints arguments of failing cases: keep it short
        return f"<tiny model file, {len(self)} bytes>"


@pytest.fixture(scope="module")
def original(tiny_model) -> Original:
    return Original(tiny_model.read_bytes())


@settings(max_examples=int(os.environ.get("XVALID_FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_are_read_or_refused_in_one_line(cli, tmp_path, original, data):
    payload = data.draw(damaged(original), label="damaged file")
    path = tmp_path / "damaged.json"
    path.write_bytes(payload)
    result = cli("inspect", path, "--no-tensors")
    if result.code != 0:
        result.assert_one_line_error(2)
    core = pytest.importorskip("xvalid._core")
    try:
        core.Model(str(path))
        cpp_ok = True
    except core.ModelFileError as exc:
        assert "\n" not in str(exc)
        cpp_ok = False
    # The two readers agree on what is a valid file.
    assert cpp_ok == (result.code == 0), (result.err, payload[:40], payload[-40:])


def test_original_is_valid(cli, original, tmp_path):
    path = tmp_path / "m.json"
    path.write_bytes(original)
    assert cli("inspect", path, "--no-tensors").code == 0
    assert json.loads(original)["format_version"] == 1  # float32 weights: still version 1


# ---- hostile files refused alike by every entry point (issue 11) ---------------------------
# Each file below is refused with exit 2 and one line by `xvalid inspect`, `run` (both
# backends) and `compare`, by the standalone runner, and by the module xvalid._core with a
# ModelFileError (in a child process, so a crash is a failed test rather than a dead run),
# and the Python and the C++ reader write the same line.

HOSTILE_DIR = Path(__file__).parent / "data" / "hostile"
BASE_MODEL = REPO / "csrc" / "fuzz" / "seeds" / "tiny-gqa.json"  # H=4 L=1 NH=2 KVH=1 V=8 I=8
RUNNER = find_runner()
POSITIONS = 1 << 17  # the long-input case: attention scores alone need 2 * 4 * 2^34 bytes


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def with_long_inputs(doc: dict, B: int, S: int) -> dict:
    """`doc` with all-zero inputs of shape (B, S) and RoPE tables (zeros) long enough."""
    hd = doc["config"]["head_dim"]
    positions = max(S, doc["config"]["max_position_embeddings"])
    doc["config"]["max_position_embeddings"] = positions
    for name in ("cos", "sin"):
        doc["rope"][name].update(shape=[positions, hd], data=b64(np.zeros((positions, hd), np.float32)))
    doc["inputs"]["input_ids"].update(shape=[B, S], data=b64(np.zeros((B, S), np.int32)))
    doc["inputs"]["attention_mask"].update(shape=[B, S], data=b64(np.ones((B, S), np.uint8)))
    return doc


def edited(edit, raw: str = "") -> bytes:
    """The base model's text after edit(doc); the string "RAW" set by the edit becomes `raw`
    as it is (a number json.dumps cannot write)."""
    doc = json.loads(BASE_MODEL.read_bytes())
    edit(doc)
    return json.dumps(doc).replace('"RAW"', raw).encode()


# name -> (the file's content, XVALID_MEMORY_LIMIT_MB or None for the machine's default, the
# expected message after "<path>: ")
CASES = {
    # 1: nesting that overflowed the C++ loader's stack when it quoted the value
    "deep-arrays": (lambda: b"[" * 100_000 + b"]" * 100_000, None,
                    "not valid JSON: arrays and objects nested deeper than 64 levels (at byte offset 64)"),
    "deep-config": (lambda: b'{"config": ' + b"[" * 80_000 + b"]" * 80_000 + b"}", None,
                    "not valid JSON: arrays and objects nested deeper than 64 levels (at byte offset 74)"),
    "deep-brackets-in-strings-are-text": (
        lambda: b'{"config": "' + b"[" * 1000 + b'\\\\", "x": ' + b"[" * 65 + b"]" * 65 + b"}", None,
        "not valid JSON: arrays and objects nested deeper than 64 levels (at byte offset 1085)"),
    # 2: numbers beyond a double
    "overflow-1e999": (lambda: (HOSTILE_DIR / "overflow-1e999.json").read_bytes(), None,
                       "config.hidden_size: number 1e999 does not fit in a double"),
    "overflow-400-digit-integer": (
        lambda: (HOSTILE_DIR / "overflow-400-digit-integer.json").read_bytes(), None,
        "config.num_hidden_layers: number 7777777777777777777777777777777777777... does not fit in a double"),
    "overflow-in-a-list": (lambda: edited(lambda d: d["weights"]["layers"][0]["wq"].update(shape=[4, "RAW"]), "-1e400"),
                           None, "weights.layers[0].wq.shape[1]: number -1e400 does not fit in a double"),
    # 3: integers that wrapped to negative numbers in int64
    "format-version-2^64-1": (lambda: edited(lambda d: d.update(format_version=2**64 - 1)), None,
                              "format_version: 18446744073709551615 is newer than this reader supports (2); update xvalid"),
    "format-version-2^63": (lambda: edited(lambda d: d.update(format_version=2**63)), None,
                            "format_version: 9223372036854775808 is newer than this reader supports (2); update xvalid"),
    "format-version-negative": (lambda: edited(lambda d: d.update(format_version=-1)), None,
                                "format_version: must be a positive integer, found -1"),
    # 4: hyperparameters outside a meaningful range
    "eps-1.7e308": (lambda: edited(lambda d: d["config"].update(rms_norm_eps=1.7e308)), None,
                    "config.rms_norm_eps: must be a number in [1e-30, 1), found 1.7e+308"),
    "eps-1": (lambda: edited(lambda d: d["config"].update(rms_norm_eps=1)), None,
              "config.rms_norm_eps: must be a number in [1e-30, 1), found 1"),
    "rope-theta-1": (lambda: edited(lambda d: d["config"].update(rope_theta=1.0)), None,
                     "config.rope_theta: must be a number in (1, 1e12], found 1.0"),
    "rope-theta-string": (lambda: edited(lambda d: d["config"].update(rope_theta="1e6")), None,
                          'config.rope_theta: must be a number, found "1e6"'),
    # 5: a forward that would need more memory than the limit: S = 2^17 positions against the
    # machine's default limit, B = 8192 rows against XVALID_MEMORY_LIMIT_MB=1. Needed MiB by
    # hand: scores B*NH*S*S*4, activations B*S*(3H + 2*NH*hd + 2*KVH*hd + 2I + 2V)*4 = B*S*56*4,
    # KV cache 2*L*B*S*KVH*hd*4.
    "memory-long-input": (
        lambda: edited(lambda d: with_long_inputs(d, 1, POSITIONS)), None,
        f"inputs.input_ids: a forward over B=1 x S={POSITIONS} tokens needs about "
        f"{(2 * POSITIONS**2 * 4 + POSITIONS * 56 * 4 + 2 * POSITIONS * 2 * 4) // 2**20} MiB of working "
        f"memory (activations, KV cache, attention scores, logits), above the limit of "
        f"{{half_the_machine}} MiB (half of this machine's memory; XVALID_MEMORY_LIMIT_MB sets another)"),
    "memory-large-batch": (
        lambda: edited(lambda d: with_long_inputs(d, 8192, 1)), 1,
        f"inputs.input_ids: a forward over B=8192 x S=1 tokens needs about "
        f"{-(-(8192 * 2 * 4 + 8192 * 56 * 4 + 2 * 8192 * 2 * 4) // 2**20)} MiB of working memory "
        f"(activations, KV cache, attention scores, logits), above the limit of 1 MiB "
        f"(set by XVALID_MEMORY_LIMIT_MB)"),
}


def half_the_machine_mib() -> int:
    """Independent of the readers: MemTotal from /proc/meminfo."""
    kib = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
    return kib * 1024 // 2 // 2**20


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[Path, int | None, str]]:
    """name -> (file, memory limit to set or None, expected message after '<path>: ')."""
    folder = tmp_path_factory.mktemp("hostile")
    files = {}
    for name, (content, limit, expected) in CASES.items():
        path = folder / f"{name}.json"
        path.write_bytes(content())
        files[name] = (path, limit, expected.replace("{half_the_machine}", str(half_the_machine_mib())))
    return files


def environment(limit: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XVALID_MEMORY_LIMIT_MB"}
    if limit is not None:
        env["XVALID_MEMORY_LIMIT_MB"] = str(limit)
    return env


MODULE_SCRIPT = r"""
import json, os, sys
from xvalid import _core
results = {}
for name, path, limit in json.loads(sys.argv[1]):
    os.environ.pop("XVALID_MEMORY_LIMIT_MB", None)
    if limit is not None:
        os.environ["XVALID_MEMORY_LIMIT_MB"] = str(limit)
    try:
        _core.Model(path)
        results[name] = ["loaded", ""]
    except Exception as exc:
        results[name] = [type(exc).__name__, str(exc)]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def module_results(hostile) -> dict[str, list[str]]:
    """name -> [exception class, message] from xvalid._core.Model, all files in one child."""
    cases = [(name, str(path), limit) for name, (path, limit, _) in hostile.items()]
    proc = subprocess.run([sys.executable, "-c", MODULE_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, timeout=300, env=environment(None))
    assert proc.returncode == 0, f"the module's process died (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def one_line(result: CliResult, prefix: str) -> str:
    result.assert_one_line_error(2)
    line = result.err.strip()
    assert line.startswith(prefix), line
    return line[len(prefix):]


@pytest.mark.parametrize("name", CASES)
def test_hostile_file_is_refused_alike_everywhere(cli, hostile, module_results, monkeypatch, tmp_path, name):
    path, limit, expected = hostile[name]
    monkeypatch.delenv("XVALID_MEMORY_LIMIT_MB", raising=False)
    if limit is not None:
        monkeypatch.setenv("XVALID_MEMORY_LIMIT_MB", str(limit))
    elif name.startswith("memory-") and half_the_machine_mib() >= 131_102:
        pytest.skip("this machine has the memory for the long input")
    want = f"{path}: {expected}"

    assert one_line(cli("inspect", path), "xvalid: error: ") == want
    for backend in ("torch", "cpp"):
        out = tmp_path / f"{backend}.npy"
        assert one_line(cli("run", path, "--backend", backend, "-o", out), "xvalid: error: ") == want
        assert not out.exists()
    assert one_line(cli("compare", path, "--repeat", "1", "--warmup", "0"), "xvalid: error: ") == want

    if RUNNER is not None:
        proc = subprocess.run([RUNNER, path, tmp_path / "out"], capture_output=True, text=True, timeout=120,
                              env=environment(limit))
        assert one_line(CliResult(proc.returncode, proc.stdout, proc.stderr), "xvalid-run: error: ") == want
        assert not (tmp_path / "out" / "logits.npy").exists()

    assert module_results[name] == ["ModelFileError", want]


def test_every_file_in_the_hostile_folder_is_a_case():
    """Files kept in tests/data/hostile/ (fuzzer findings among them) are all run above."""
    kept = {p.stem for p in HOSTILE_DIR.glob("*.json")}
    assert kept and kept <= set(CASES), kept - set(CASES)


# ---- the limits, and the two readers' messages, are the same in Python and C++ ---------------

def test_python_and_cpp_readers_share_their_limits(monkeypatch):
    from xvalid import _core
    from xvalid.config import FLOAT_RANGES, MAX_DIM, ModelConfig
    from xvalid.memory import memory_limit_mib
    from xvalid.modelfile import MAX_JSON_DEPTH

    monkeypatch.delenv("XVALID_MEMORY_LIMIT_MB", raising=False)
    limits = _core.limits()
    assert limits["max_dim"] == MAX_DIM == 2**24
    assert limits["max_json_depth"] == MAX_JSON_DEPTH == 64
    defaults = ModelConfig()
    assert set(FLOAT_RANGES) == {"rms_norm_eps", "rope_theta"}
    for name, allowed in FLOAT_RANGES.items():
        assert limits[name] == {"low": allowed.low, "high": allowed.high, "low_included": allowed.low_included,
                                "high_included": allowed.high_included, "default": getattr(defaults, name)}
    assert limits["memory_limit_mib"] == memory_limit_mib() == half_the_machine_mib()
    monkeypatch.setenv("XVALID_MEMORY_LIMIT_MB", "1234")
    assert _core.limits()["memory_limit_mib"] == memory_limit_mib() == 1234


def test_both_readers_take_the_format_from_the_one_description():
    """schemas/model-format.json, read here independently of either loader, is what the C++
    loader was built from and what the Python reader uses."""
    from xvalid import _core, modelfile
    from xvalid.config import FLOAT_RANGES, MAX_DIM

    spec = json.loads((REPO / "python" / "xvalid" / "schemas" / "model-format.json").read_text())
    limits = _core.limits()
    for key in ("format", "format_version", "max_dim", "max_json_depth", "max_safetensors_header_bytes",
                "reserved_dtypes", "required_sections", "required_config"):
        assert limits[key] == spec[key], key
    assert limits["storage_dtypes"] == {name: {"itemsize": d["itemsize"], "safetensors": d["safetensors"]}
                                        for name, d in spec["storage_dtypes"].items()}
    for name, r in spec["float_config"].items():
        assert limits[name] == {k: r[k] for k in ("low", "high", "low_included", "high_included")} | {
            "default": r["default"]}
        assert FLOAT_RANGES[name].text == r["text"]
    assert (modelfile.FORMAT_NAME, modelfile.FORMAT_VERSION, modelfile.MAX_JSON_DEPTH, MAX_DIM) == (
        spec["format"], spec["format_version"], spec["max_json_depth"], spec["max_dim"])
    assert {k: v.str for k, v in modelfile.STORAGE_DTYPES.items()} == {
        k: np.dtype(d["numpy"]).str for k, d in spec["storage_dtypes"].items()}
    assert all(np.dtype(modelfile.STORAGE_DTYPES[k]).itemsize == d["itemsize"] for k, d in spec["storage_dtypes"].items())
    assert modelfile.RESERVED_DTYPES == tuple(spec["reserved_dtypes"])


# ---- the two readers give the same verdict on every file -------------------------------------
# Edits of the base model where the readers once disagreed (issue 9), and the rest of the
# corpus: every hostile case above, every file kept in tests/data/hostile/, the fuzz seeds.

def _drop_encoding(doc: dict) -> None:
    for tensor in (doc["inputs"]["input_ids"], doc["rope"]["cos"], doc["weights"]["final_rms"]):
        del tensor["encoding"]


AGREEMENT_EDITS = {
    # name -> (edit, the one message both readers write after "<path>: ", or None for "loaded")
    "no-encoding-means-base64": (_drop_encoding, None),
    "null-encoding-means-base64": (lambda d: d["rope"]["sin"].update(encoding=None), None),
    "other-encoding": (lambda d: d["rope"]["sin"].update(encoding="hex"),
                       "rope.sin: encoding expected 'base64', found 'hex'"),
    "reserved-dtype": (lambda d: d["rope"]["cos"].update(dtype="float8_e5m2"),
                       "rope.cos: dtype float8_e5m2 is not supported yet (format version 2 reads float32 here)"),
    "reserved-dtype-int4": (lambda d: d["inputs"]["input_ids"].update(dtype="int4"),
                            "inputs.input_ids: dtype int4 is not supported yet (format version 2 reads int32 here)"),
    "unknown-dtype": (lambda d: d["rope"]["sin"].update(dtype="float64"),
                      "rope.sin: dtype expected float32, found 'float64'"),
    "storage-dtype-in-the-wrong-place": (lambda d: d["rope"]["cos"].update(dtype="int32"),
                                         "rope.cos: dtype expected float32, found 'int32'"),
    "reduced-dtype-outside-the-weights": (lambda d: d["rope"]["cos"].update(dtype="float16"),
                                          "rope.cos: dtype expected float32, found 'float16'"),
    "no-inputs": (lambda d: d.pop("inputs"), "missing"),
    "no-rope": (lambda d: d.pop("rope"), "missing"),
    "no-lm-head-means-tied": (lambda d: d["weights"].pop("lm_head", None), None),
}


def verdicts(path: Path) -> tuple[str, str]:
    """(Python's, C++'s) outcome: 'loaded' or the error message."""
    from xvalid import _core
    from xvalid.errors import ModelFileError
    from xvalid.modelfile import read_model

    outcomes = []
    for load, error in ((read_model, ModelFileError), (lambda p: _core.Model(str(p)), _core.ModelFileError)):
        try:
            load(path)
            outcomes.append("loaded")
        except error as exc:
            outcomes.append(str(exc))
    return outcomes[0], outcomes[1]


@pytest.mark.parametrize("name", AGREEMENT_EDITS)
def test_both_readers_agree_on_edited_files(tmp_path, name):
    edit, message = AGREEMENT_EDITS[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(edited(edit))
    python, cpp = verdicts(path)
    if message is None:
        assert python == cpp == "loaded"
    elif message == "missing":  # both refuse, each naming the section
        section = name.removeprefix("no-")
        assert python != "loaded" and cpp != "loaded"
        assert section in python and section in cpp and "missing" in python and "missing" in cpp
    else:
        assert python == cpp == f"{path}: {message}"


def test_both_readers_give_the_same_verdict_on_the_whole_corpus(hostile, monkeypatch):
    files = [path for path, limit, _ in hostile.values() if limit is None]
    files += sorted(HOSTILE_DIR.glob("*.json")) + sorted((REPO / "csrc" / "fuzz" / "seeds").glob("*.json"))
    monkeypatch.delenv("XVALID_MEMORY_LIMIT_MB", raising=False)
    seen = {"loaded": 0, "refused": 0}
    for path in files:
        python, cpp = verdicts(path)
        assert (python == "loaded") == (cpp == "loaded"), (path.name, python, cpp)
        seen["loaded" if python == "loaded" else "refused"] += 1
    assert seen["loaded"] and seen["refused"], seen


def outcome(path: Path) -> str:
    """'loaded', or the error message, from the Python reader and from the C++ loader: both the same."""
    from xvalid import _core
    from xvalid.errors import ModelFileError
    from xvalid.modelfile import read_model

    try:
        read_model(path)
        python = "loaded"
    except ModelFileError as exc:
        python = str(exc)
    try:
        _core.Model(str(path))
        cpp = "loaded"
    except _core.ModelFileError as exc:
        cpp = str(exc)
    assert python == cpp
    return python


@pytest.mark.parametrize("text", [
    "1e-30", "1e-31", "0.5", "0.999999", "1.0", "1", "0", "-1e-5", "1e12", "1000000000001", "1e16",
    "123456789012.5", "5e-324", "true", "null", '"x"', "[1, 2]", '{"a": [1, {"b": 2}]}',
    "[" * 60 + "]" * 60, '"' + "y" * 100 + '"', '{"k' + "z" * 60 + '": [[["deep"]]]}',
    "18446744073709551616", "-9223372036854775809", "1e308", "1e309",
])
@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta", "format_version"])
def test_both_readers_accept_or_refuse_a_value_alike(tmp_path, key, text):
    def edit(doc):
        (doc if key == "format_version" else doc["config"])[key] = "RAW"
    path = tmp_path / "m.json"
    path.write_bytes(edited(edit, text))
    message = outcome(path)
    assert message == "loaded" or (message.startswith(f"{path}: ") and len(message) < 200 + len(str(path)))


@pytest.mark.parametrize("depth", [63, 64, 65])
def test_nesting_limit_is_the_same_in_both_readers(tmp_path, depth):
    path = tmp_path / "m.json"
    path.write_bytes(edited(lambda d: d["meta"].update(x="RAW"), "[" * (depth - 2) + "]" * (depth - 2)))
    message = outcome(path)  # meta.x adds two levels
    assert (message == "loaded") == (depth <= 64), message


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", " 12", "9" * 16])
def test_bad_memory_limit_variable_is_one_line(cli, monkeypatch, tmp_path, value):
    from xvalid import _core

    want = f"XVALID_MEMORY_LIMIT_MB: expected a whole number of MiB (1 or more), found '{value}'"
    monkeypatch.setenv("XVALID_MEMORY_LIMIT_MB", value)
    assert one_line(cli("inspect", BASE_MODEL), "xvalid: error: ") == want
    with pytest.raises(_core.ModelFileError) as err:
        _core.Model(str(BASE_MODEL))
    assert str(err.value) == want
    if RUNNER is not None:
        proc = subprocess.run([RUNNER, BASE_MODEL, tmp_path / "out"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "XVALID_MEMORY_LIMIT_MB": value})
        assert one_line(CliResult(proc.returncode, proc.stdout, proc.stderr), "xvalid-run: error: ") == want


def test_intermediates_count_against_the_memory_limit(cli, monkeypatch, tmp_path):
    """B=3000 S=1 on the base model under a 1 MiB limit: a forward needs 3000 * 248 bytes
    (0.71 MiB), with intermediates 68 floats more per row (1.49 MiB)."""
    from xvalid import _core

    path = tmp_path / "m.json"
    path.write_bytes(edited(lambda d: with_long_inputs(d, 3000, 1)))
    monkeypatch.setenv("XVALID_MEMORY_LIMIT_MB", "1")
    want = (f"{path}: inputs.input_ids: a forward over B=3000 x S=1 tokens needs about 2 MiB of working memory "
            f"(activations, KV cache, attention scores, logits, intermediates), above the limit of 1 MiB "
            f"(set by XVALID_MEMORY_LIMIT_MB)")
    assert cli("run", path, "-o", tmp_path / "a.npy").code == 0
    assert one_line(cli("run", path, "-o", tmp_path / "b.npy", "--intermediates", tmp_path / "i"),
                    "xvalid: error: ") == want
    assert not (tmp_path / "b.npy").exists()
    if RUNNER is not None:
        env = {**os.environ, "XVALID_MEMORY_LIMIT_MB": "1"}
        run = lambda *flags: subprocess.run([RUNNER, path, tmp_path / "out", *flags], capture_output=True,  # noqa: E731
                                            text=True, timeout=60, env=env)
        assert run().returncode == 0
        proc = run("--intermediates")
        assert one_line(CliResult(proc.returncode, proc.stdout, proc.stderr), "xvalid-run: error: ") == want
    model = _core.Model(str(path))
    model.forward(model.input_ids)
    with pytest.raises(_core.InputError, match=r"^input_ids \(3000, 1\): needs about 2 MiB .*intermediates\), "
                                               r"above the limit of 1 MiB"):
        model.forward(model.input_ids, capture=True)


def test_module_refuses_a_call_beyond_the_memory_limit(monkeypatch):
    """The bindings check every call, cached positions included, before the kernel allocates.
    Under 1 MiB on the base model: a forward over (4000, 1) needs 4000 * 248 bytes (fits); one
    more step then needs 4000 * (224 + 32 + 16) bytes for the new row, KV cache and scores."""
    from xvalid import _core

    model = _core.Model(str(BASE_MODEL))
    monkeypatch.setenv("XVALID_MEMORY_LIMIT_MB", "1")
    with pytest.raises(_core.InputError, match=r"^input_ids \(8192, 1\): needs about 2 MiB of working memory"):
        model.forward(np.zeros((8192, 1), np.int64))
    model.forward(np.zeros((4000, 1), np.int64))
    with pytest.raises(_core.InputError, match=r"^input_ids \(4000, 1\) after 1 cached position: needs about "
                                               r"2 MiB .* above the limit of 1 MiB"):
        model.step(np.zeros((4000, 1), np.int64))
    assert model.cache_len == 1  # a refused call keeps the cache


@settings(max_examples=int(os.environ.get("XVALID_FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet='[]{}"\\x', max_size=120), deep=st.integers(0, 80))
def test_both_readers_find_the_same_too_deep_bracket(tmp_path, text, deep):
    """The depth scan skips strings (escaped quotes included) the same way in both readers."""
    from xvalid import _core
    from xvalid.errors import ModelFileError
    from xvalid.modelfile import load_json

    path = tmp_path / "deep.json"
    path.write_bytes(text.encode() + b"[" * deep + b'"\\"' + b"{" * deep)
    messages = []
    try:
        load_json(path)
    except ModelFileError as exc:
        messages.append(str(exc))
    try:
        _core.Model(str(path))
    except _core.ModelFileError as exc:
        messages.append(str(exc))
    too_deep = [m for m in messages if "nested deeper than 64 levels" in m]
    assert len(too_deep) in (0, 2) and len(set(too_deep)) <= 1, messages


# ---- reduced-precision weights and the source record (format version 2) ---------------------
# Edits of the base model with weights stored as int8, float16 or bfloat16 (converted here,
# by hand, not by xvalid's writer). The Python reader's messages are the contract of
# docs/model-format.md, and the C++ loader must say the same.



def _values(tensor: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape(tensor["shape"])


def as_int8(tensor: dict, block: int) -> None:
    """A float32 tensor object becomes int8 (scale = absmax / 127 per block of a row), in place."""
    values = _values(tensor)
    rows, columns = values.shape
    blocks = -(-columns // block)
    scales, q = np.zeros((rows, blocks), np.float32), np.zeros((rows, columns), np.int8)
    for r in range(rows):
        for b in range(blocks):
            chunk = values[r, b * block:(b + 1) * block]
            scales[r, b] = np.abs(chunk).max() / 127
            q[r, b * block:(b + 1) * block] = np.round(chunk / scales[r, b]) if scales[r, b] else 0
    tensor.update(dtype="int8", data=b64(q), block_size=block,
                  scales={"shape": [rows, blocks], "dtype": "float32", "encoding": "base64", "data": b64(scales)})


def as_half(tensor: dict, dtype: str, poison: tuple[int, int] | None = None) -> None:
    """A float32 tensor object becomes float16 or bfloat16 (truncated bits), in place; `poison`
    = (flat index, raw 16 bits) puts e.g. an infinity there."""
    values = _values(tensor)
    bits = values.astype("<f2").view("<u2") if dtype == "float16" else (values.view("<u4") >> 16).astype("<u2")
    bits = bits.copy()
    if poison is not None:
        bits.reshape(-1)[poison[0]] = poison[1]
    tensor.update(dtype=dtype, data=b64(bits))


def int8_wq(edit=None):
    """The base model with wq stored as int8 in blocks of 2 (scales [4, 2]), then edit(wq)."""
    def apply(doc):
        doc["format_version"] = 2
        wq = doc["weights"]["layers"][0]["wq"]
        as_int8(wq, 2)
        if edit is not None:
            edit(wq)
    return apply


def _poison_scale(wq: dict, value: float) -> None:
    scales = _values(wq["scales"]).copy()
    scales[1, 0] = value
    wq["scales"]["data"] = b64(scales)


def _with_source(edit=None, shape=(2, 3, 8), nan_at=None):
    def apply(doc):
        logits = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
        if nan_at is not None:
            logits[nan_at] = np.nan
        doc["source"] = {"weight_dtype": "float32", "logits": {"shape": list(shape), "dtype": "float32",
                                                               "encoding": "base64", "data": b64(logits)}}
        if edit is not None:
            edit(doc["source"])
    return apply


def _all_weights(doc, convert):
    w = doc["weights"]
    for name in ("tok_embedding", "final_rms", "lm_head"):
        convert(name, w[name])
    for name, tensor in w["layers"][0].items():
        convert(name, tensor)


MATRICES_TEXT = "float32, float16, bfloat16 or int8"
DTYPE_CASES = {
    # name -> (edit of the base model, message after "<path>: ")
    "int8-no-scales": (int8_wq(lambda t: t.pop("scales")), "weights.layers[0].wq: int8 tensor has no 'scales'"),
    "int8-null-scales": (int8_wq(lambda t: t.update(scales=None)), "weights.layers[0].wq: int8 tensor has no 'scales'"),
    "int8-no-block-size": (int8_wq(lambda t: t.pop("block_size")),
                           "weights.layers[0].wq: int8 tensor has no 'block_size'"),
    "int8-block-size-0": (int8_wq(lambda t: t.update(block_size=0)),
                          "weights.layers[0].wq: block_size must be an integer in [1, 4], found 0"),
    "int8-block-size-beyond-the-row": (int8_wq(lambda t: t.update(block_size=5)),
                                       "weights.layers[0].wq: block_size must be an integer in [1, 4], found 5"),
    "int8-block-size-negative": (int8_wq(lambda t: t.update(block_size=-2)),
                                 "weights.layers[0].wq: block_size must be an integer in [1, 4], found -2"),
    "int8-block-size-string": (int8_wq(lambda t: t.update(block_size="2")),
                               'weights.layers[0].wq: block_size must be an integer in [1, 4], found "2"'),
    "int8-block-size-float": (int8_wq(lambda t: t.update(block_size=2.5)),
                              "weights.layers[0].wq: block_size must be an integer in [1, 4], found 2.5"),
    "int8-block-size-bool": (int8_wq(lambda t: t.update(block_size=True)),
                             "weights.layers[0].wq: block_size must be an integer in [1, 4], found true"),
    "int8-scales-count": (int8_wq(lambda t: t["scales"].update(shape=[4, 3])),
                          "weights.layers[0].wq.scales: shape expected [4, 2], found [4, 3]"),
    "int8-block-size-disagrees-with-scales": (int8_wq(lambda t: t.update(block_size=1)),
                                              "weights.layers[0].wq.scales: shape expected [4, 4], found [4, 2]"),
    "int8-scales-short": (int8_wq(lambda t: t["scales"].update(data=t["scales"]["data"][:-4])),
                          "weights.layers[0].wq.scales: data holds 40 base64 characters, expected 44 for "
                          "shape [4, 2] float32"),
    "int8-scales-nan": (int8_wq(lambda t: _poison_scale(t, np.nan)),
                        "weights.layers[0].wq.scales: non-finite value nan at index [1, 0] (1 in all)"),
    "int8-scales-inf": (int8_wq(lambda t: _poison_scale(t, -np.inf)),
                        "weights.layers[0].wq.scales: non-finite value -inf at index [1, 0] (1 in all)"),
    "int8-scales-float16": (int8_wq(lambda t: t["scales"].update(dtype="float16")),
                            "weights.layers[0].wq.scales: dtype expected float32, found 'float16'"),
    "int8-scales-not-a-tensor": (int8_wq(lambda t: t.update(scales=[1, 2])),
                                 "weights.layers[0].wq.scales: expected a tensor object, found list"),
    "int8-short-data": (int8_wq(lambda t: t.update(data=t["data"][:-4])),
                        "weights.layers[0].wq: data holds 20 base64 characters, expected 24 for shape [4, 4] int8"),
    "int8-on-a-norm": (lambda d: d["weights"]["final_rms"].update(dtype="int8"),
                       "weights.final_rms: dtype int8 is only allowed for 2-D weight matrices"),
    "int8-on-rope": (lambda d: d["rope"]["cos"].update(dtype="int8"), "rope.cos: dtype expected float32, found 'int8'"),
    "float16-inf": (lambda d: as_half(d["weights"]["final_rms"], "float16", (2, 0x7C00)),
                    "weights.final_rms: non-finite value inf at index [2] (1 in all)"),
    "bfloat16-nan": (lambda d: as_half(d["weights"]["layers"][0]["wk"], "bfloat16", (7, 0x7FC0)),
                     "weights.layers[0].wk: non-finite value nan at index [1, 3] (1 in all)"),
    "bfloat16-minus-inf": (lambda d: as_half(d["weights"]["tok_embedding"], "bfloat16", (0, 0xFF80)),
                           "weights.tok_embedding: non-finite value -inf at index [0, 0] (1 in all)"),
    "float16-with-float32-bytes": (lambda d: d["weights"]["layers"][0]["wo"].update(dtype="float16"),
                                   "weights.layers[0].wo: data holds 88 base64 characters, expected 44 for "
                                   "shape [4, 4] float16"),
    "weight-dtype-unknown": (lambda d: d["weights"]["final_rms"].update(dtype="float64"),
                             "weights.final_rms: dtype expected float32, float16 or bfloat16, found 'float64'"),
    "weight-dtype-int32": (lambda d: d["weights"]["layers"][0]["w_up"].update(dtype="int32"),
                           f"weights.layers[0].w_up: dtype expected {MATRICES_TEXT}, found 'int32'"),
    "weight-dtype-reserved": (lambda d: d["weights"]["layers"][0]["wq"].update(dtype="int4"),
                              f"weights.layers[0].wq: dtype int4 is not supported yet (format version 2 reads "
                              f"{MATRICES_TEXT} here)"),
    "norm-dtype-reserved": (lambda d: d["weights"]["final_rms"].update(dtype="float8_e4m3"),
                            "weights.final_rms: dtype float8_e4m3 is not supported yet (format version 2 reads "
                            "float32, float16 or bfloat16 here)"),
    "source-no-logits": (_with_source(lambda s: s.pop("logits")), "source.logits: missing from the model file"),
    "source-no-weight-dtype": (_with_source(lambda s: s.pop("weight_dtype")), "source.weight_dtype: missing from the model file"),
    "source-weight-dtype-number": (_with_source(lambda s: s.update(weight_dtype=32)),
                                   "source.weight_dtype: expected a string, found 32"),
    "source-not-an-object": (lambda d: d.update(source=[1]), "source: expected an object, found list"),
    "source-logits-shape": (_with_source(shape=(2, 3, 7)), "source.logits: shape expected [2, 3, 8], found [2, 3, 7]"),
    "source-logits-nan": (_with_source(nan_at=(1, 2, 5)),
                          "source.logits: non-finite value nan at index [1, 2, 5] (1 in all)"),
}
DTYPE_VALID = {
    # files both readers must load
    "int8-wq": int8_wq(),
    "int8-partial-last-block": lambda d: as_int8(d["weights"]["layers"][0]["w_down"], 3),  # C = 8: 3 + 3 + 2
    "int8-one-scale-per-row": lambda d: as_int8(d["weights"]["layers"][0]["w_gate"], 4),
    "int8-q-is-minus-128": int8_wq(lambda t: t.update(data=b64(np.full((4, 4), -128, np.int8)))),
    "int8-everything": lambda d: _all_weights(d, lambda name, t: as_int8(t, 2) if len(t["shape"]) == 2 else None),
    "float16-everything": lambda d: _all_weights(d, lambda name, t: as_half(t, "float16")),
    "bfloat16-everything": lambda d: _all_weights(d, lambda name, t: as_half(t, "bfloat16")),
    "mixed": lambda d: (as_half(d["weights"]["final_rms"], "float16"), as_int8(d["weights"]["lm_head"], 4),
                        as_half(d["weights"]["layers"][0]["wv"], "bfloat16")),
    "version-1-with-float16": lambda d: as_half(d["weights"]["layers"][0]["rms_attn"], "float16"),
    "source-record": _with_source(),
}


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_reduced_precision_hostile_file_is_refused_in_one_line(cli, tmp_path, name):
    edit, message = DTYPE_CASES[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(edited(edit))
    want = f"{path}: {message}"
    assert one_line(cli("inspect", path), "xvalid: error: ") == want
    out = tmp_path / "torch.npy"
    assert one_line(cli("run", path, "--backend", "torch", "-o", out), "xvalid: error: ") == want
    assert not out.exists()
    assert one_line(cli("compare", path, "--backends", "torch", "--repeat", "1", "--warmup", "0"),
                    "xvalid: error: ") == want


@pytest.mark.parametrize("name", DTYPE_VALID)
def test_reduced_precision_valid_files_are_read(cli, tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_bytes(edited(DTYPE_VALID[name]))
    result = cli("run", path, "--backend", "torch", "-o", tmp_path / "l.npy")
    assert result.code == 0, result.err
    assert np.isfinite(np.load(tmp_path / "l.npy")).all()


@pytest.mark.parametrize("name", [*DTYPE_CASES, *DTYPE_VALID])
def test_both_readers_agree_on_reduced_precision_files(tmp_path, name):
    path = tmp_path / f"{name}.json"
    if name in DTYPE_CASES:
        edit, message = DTYPE_CASES[name]
        path.write_bytes(edited(edit))
        assert verdicts(path) == (f"{path}: {message}",) * 2
    else:
        path.write_bytes(edited(DTYPE_VALID[name]))
        assert verdicts(path) == ("loaded", "loaded")
