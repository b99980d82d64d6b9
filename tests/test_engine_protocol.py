"""The engine protocol's version-2 extensions (docs/engines.md), each tested with the bad engine
itself: misnamed intermediates, decode through the engine's own KV cache (and an engine that
cannot decode), threads, the engine's own timing, candidate names, -q reasons, and what an
engine wrote when its logits file is missing. Two independent engines implement every
extension: tests/engines/numpy_engine.py and the C++ runner xvalid-run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ENGINES
from xvalid.engines import EngineTiming, engine_names, parse_engine_spec, program_name
from xvalid.errors import EngineError, InputError

ENGINE = f"{sys.executable} {ENGINES / 'numpy_engine.py'} {{model}} {{out}}"
RUNNER = ("xvalid-run {model} {out} --intermediates --threads {threads} --decode {decode} "
          "--repeat {repeat} --warmup {warmup} --timing")
has_runner = shutil.which("xvalid-run", path=str(Path(sys.executable).parent)) is not None


def compare_json(cli, tmp_path, model, *args):
    report = tmp_path / "report.json"
    result = cli("compare", model, "--backends", "torch", "--repeat", 1, "--warmup", 0,
                 "--json", report, *args)
    return result, (json.loads(report.read_text()) if report.exists() else None)


def row(report, name):
    return next(c for c in report["candidates"] if c["name"] == name)


# ---- 1. intermediates under names xvalid does not know --------------------------------------

def test_misnamed_intermediates_are_listed_and_the_first_divergence_stays_right(
        cli, tmp_path, bug_model):
    """A gqa bug (first shows at layer0.attn_heads); the engine also writes layer1.attn_heads
    with an underscore and a made-up layer0.qq. The rest are named correctly, so the first
    divergence is still layer 0, attn_heads; the two files are listed with the nearest name."""
    engine = (f"bad={ENGINE} --bug gqa && cd {{out}}/intermediates && "
              "mv layer1.attn_heads.npy layer1_attn_heads.npy && cp layer0.q.npy layer0.qq.npy")
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", engine)
    assert result.code == 1, result.out + result.err
    bad = row(report, "bad")
    assert bad["unknown_intermediates"] == [
        {"file": "layer0.qq.npy", "nearest": "layer0.q.npy"},
        {"file": "layer1_attn_heads.npy", "nearest": "layer1.attn_heads.npy"}]
    assert ("intermediates/layer1_attn_heads.npy: not a known intermediate; did you mean "
            "layer1.attn_heads.npy?") in result.out
    div = bad["divergence"]
    assert (div["first"]["layer"], div["first"]["point"]) == (0, "attn_heads")
    assert (div["compared"], div["expected"], div["layers_without_points"]) == (26, 27, [])
    assert "first divergence: layer 0, attn_heads" in result.out
    assert "26 of 27 points compared" in result.out


def test_every_layer_file_misnamed_is_not_a_silent_skip(cli, tmp_path, bug_model):
    """The trial's engine: every per-layer file named layer0_attn_heads.npy style. Only
    embedding, final_norm and logits remain; the report says so, and that the first divergence
    it found comes after 24 points it could not compare."""
    rename = ("cd {out}/intermediates && for f in layer*.npy; do "
              "mv \"$f\" \"$(echo \"$f\" | sed 's/\\./_/')\"; done")
    result, report = compare_json(cli, tmp_path, bug_model, "--engine",
                                  f"{ENGINE} --bug gqa && {rename}")
    assert result.code == 1, result.out + result.err
    engine = row(report, "numpy_engine.py")
    assert len(engine["unknown_intermediates"]) == 24
    assert {"file": "layer0_attn_heads.npy", "nearest": "layer0.attn_heads.npy"} in \
        engine["unknown_intermediates"]
    div = engine["divergence"]
    assert (div["compared"], div["layers_without_points"]) == (3, [0, 1])
    assert div["first"]["name"] == "final_norm" and len(div["not_compared_before_first"]) == 24
    assert "3 of 27 points compared; 2 layers with none: 0, 1" in result.out
    assert "not compared before it (the engine wrote no such file): 24 points" in result.out


# ---- 2. decode through the engine's own KV cache ---------------------------------------------

def test_decode_kv_cache_bug_passes_prefill_and_fails_at_the_first_wrong_step(
        cli, tmp_path, bug_model):
    """Two independent engines decode correctly; the planted cache bug (position not advanced
    after a decode step) passes the full forward and step 1, and fails from step 2."""
    engines = ["--engine", f"good={ENGINE}", "--engine", f"kv={ENGINE} --bug kv-cache-position"]
    if has_runner:
        engines += ["--engine", f"runner={RUNNER}"]
    result, report = compare_json(cli, tmp_path, bug_model, "--decode", 3, *engines)
    assert result.code == 1, result.out + result.err
    kv = row(report, "kv")
    assert kv["metrics"]["pass"] and kv["status"] == "fail"
    decode = kv["decode"]
    assert decode["status"] == "fail" and decode["prefill"] == 5
    assert [s["pass"] for s in decode["steps"]] == [True, False, False]
    assert decode["first_failing_step"] == 2
    assert "FAIL from step 2" in result.out and "kv: decode drifts from step 2 (position 6" in result.out
    for name in ["good"] + ["runner"] * has_runner:
        good = row(report, name)["decode"]
        assert good["status"] == "pass" and [s["position"] for s in good["steps"]] == [5, 6, 7]
        assert all(s["max_abs"] < report["tolerance"]["atol"] for s in good["steps"])
    assert report["unchecked"] == []


def test_engine_without_decode_support_is_reported_never_a_silent_pass(cli, tmp_path, bug_model):
    """A seed-style engine (raw float32 logits only) with --decode and no built-in backend: the
    full forward passes, decode is 'not supported by this engine' in the table, the JSON and
    the verdict line, which says no candidate checked decode."""
    result, report = compare_json(cli, tmp_path, bug_model, "--backends", "", "--decode", 2,
                                  "--engine", f"seed={ENGINE} --seed-style")
    assert result.code == 0, result.out + result.err
    decode = row(report, "seed")["decode"]
    assert decode["status"] == "not supported" and decode["pass"] is None
    assert decode["reason"].startswith("not supported by this engine")
    assert report["unchecked"] == [{"candidate": "seed", "check": "decode",
                                    "reason": decode["reason"]}]
    verdict = next(line for line in result.out.splitlines() if line.startswith("verdict:"))
    assert "no candidate checked --decode 2; decode not checked: seed (not supported" in verdict
    assert "│ not supported" in result.out
    quiet = cli("compare", bug_model, "--backends", "", "--decode", 2, "--repeat", 1, "-q",
                "--engine", f"seed={ENGINE} --seed-style")
    assert quiet.out.splitlines()[0].startswith("NOTE no candidate checked --decode 2")
    assert quiet.out.splitlines()[-1] == f"PASS {bug_model}"


# ---- 3. threads and the other values reach the engine -----------------------------------------

def test_threads_and_protocol_values_reach_the_engine(cli, tmp_path, bug_model):
    """An engine that records its environment and its placeholders, then runs seed-style: so it
    is also timed as a process, in a second run asked for no decode and no intermediates."""
    log = tmp_path / "runs.txt"
    # (XVALID_CACHE_DIR: conftest's, for xvalid itself; not a protocol variable)
    record = (f"env | grep -E '^(XVALID_|OMP_NUM_THREADS=)' | grep -v '^XVALID_CACHE_DIR=' "
              f"| sort >> {log} && "
              f"echo args {{threads}} {{decode}} {{prefill}} {{repeat}} {{warmup}} {{dtype}} >> {log} && "
              f"echo --- >> {log}")
    result, report = compare_json(cli, tmp_path, bug_model, "--threads", 3, "--decode", 2,
                                  "--engine", f"{record} && {ENGINE} --seed-style")
    assert result.code == 0, result.out + result.err
    first, timing_run = (block.split("\n") for block in log.read_text().split("---\n")[:2])
    assert first == ["OMP_NUM_THREADS=3", "XVALID_DECODE_STEPS=2", "XVALID_DTYPE=float32",
                     "XVALID_INTERMEDIATES=1", "XVALID_PREFILL=6", "XVALID_PROTOCOL=3",
                     "XVALID_REPEAT=1", "XVALID_THREADS=3", "XVALID_WARMUP=0",
                     "args 3 2 6 1 0 float32", ""]
    assert "XVALID_DECODE_STEPS=0" in timing_run and "XVALID_INTERMEDIATES=0" in timing_run
    assert "OMP_NUM_THREADS=3" in timing_run
    assert report["threads"] == 3


# ---- 4. timing: the engine's own, or whole processes ------------------------------------------

def test_engine_reported_timing_appears_with_a_ratio_to_torch(cli, tmp_path, bug_model):
    """An engine that writes the reference's logits and a timing.json with known numbers:
    median 3, min 2, max 4 ms, ratio to torch's median; it says it ran 7 threads, which the
    table points out. A seed-style engine is timed as --repeat whole processes instead."""
    cli("run", bug_model, "-o", tmp_path / "ref.npy")
    script = tmp_path / "timed.py"
    script.write_text(
        "import json, shutil, sys\n"
        f"shutil.copy({str(tmp_path / 'ref.npy')!r}, sys.argv[2] + '/logits.npy')\n"
        "json.dump({'load_ms': 7.5, 'forward_ms': [4, 2, 3], 'warmup': 1, 'threads': 7},\n"
        "          open(sys.argv[2] + '/timing.json', 'w'))\n")
    result, report = compare_json(cli, tmp_path, bug_model, "--repeat", 2,
                                  "--engine", f"timed={sys.executable} {script} {{model}} {{out}}",
                                  "--engine", f"proc={ENGINE} --seed-style")
    assert result.code == 0, result.out + result.err
    timed = row(report, "timed")
    torch_ms = row(report, "torch")["timing"]["median_ms"]
    assert timed["load_ms"] == 7.5
    t = timed["timing"]
    assert (t["median_ms"], t["min_ms"], t["max_ms"], t["repeat"], t["warmup"]) == (3, 2, 4, 3, 1)
    assert t["measures"] == "forward" and t["ratio_to_torch"] == pytest.approx(3 / torch_ms)
    assert t["threads"] == 7
    line = [line for line in result.out.splitlines() if line.startswith("│ timed")][-1]  # timing
    assert "3.000" in line and ("slower" in line or "faster" in line) and "ran 7 threads" in line
    proc = row(report, "proc")["timing"]
    assert proc["measures"] == "process" and proc["repeat"] == 2 and "ratio_to_torch" not in proc
    assert "2 (process, load included)" in result.out


@pytest.mark.parametrize("content,needle", [
    ("{", "timing.json: not valid JSON"),
    ('{"load_ms": 1}', "timing.json: forward_ms (a list of ms) is missing"),
    ('{"forward_ms": []}', "timing.json: forward_ms must be a non-empty list of ms"),
    ('{"forward_ms": [1, -2]}', "timing.json: forward_ms[1] must be a non-negative number of ms"),
    ('{"forward_ms": [1], "warmup": 1.5}', "timing.json: warmup must be a non-negative integer"),
    ('{"forward_ms": [1], "decode_ms": [1]}', "timing.json: decode_ms has 1 values, expected 2"),
    ("[1]", "timing.json: expected a JSON object"),
])
def test_a_malformed_timing_file_is_refused(tmp_path, content, needle):
    (tmp_path / "timing.json").write_text(content)
    with pytest.raises(EngineError) as error:
        EngineTiming.read(tmp_path / "timing.json", decode_steps=2)
    assert str(error.value).startswith(needle)


def test_a_malformed_timing_file_is_an_engine_error(cli, tmp_path, bug_model):
    (tmp_path / "timing.json").write_text('{"forward_ms": "fast"}')
    engine = f"t={ENGINE} --seed-style && cp {tmp_path / 'timing.json'} {{out}}/"
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", engine)
    assert result.code == 3, result.out + result.err
    assert row(report, "t")["error"] == ("t: timing.json: forward_ms must be a non-empty list of "
                                         "ms, got 'fast'")


# ---- 5. names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("mine=./eng {model} {out}", ("mine", "./eng {model} {out}")),
    ("v1.2_x-y=a=b {out}", ("v1.2_x-y", "a=b {out}")),
    ("./eng --opt=1 {out}", (None, "./eng --opt=1 {out}")),       # a space before the '='
    ("python -c 'x=1' {out}", (None, "python -c 'x=1' {out}")),
    ("env OMP_PROC_BIND=1 ./eng {out}", (None, "env OMP_PROC_BIND=1 ./eng {out}")),
    ("OMP_PROC_BIND=1 ./eng {out}", ("OMP_PROC_BIND", "1 ./eng {out}")),  # documented: use env
])
def test_engine_name_rule(spec, expected):
    assert parse_engine_spec(spec) == expected


def test_default_names_are_the_program_and_unique():
    assert program_name("python3 /x/y/my_engine.py {model} {out}") == "my_engine.py"
    assert program_name("env OMP_NUM_THREADS=1 ./build/eng {model} {out}") == "eng"
    assert program_name("echo boom >&2; exit 5 {out}") == "echo"
    specs = [(None, "./a {out}"), ("a-2", "./b {out}"), (None, "./a {out}"), (None, "./a {out}")]
    assert engine_names(specs, {"torch"}) == ["a", "a-2", "a-3", "a-4"]
    assert engine_names([(None, "torch {out}")], {"torch"}) == ["torch-2"]
    with pytest.raises(InputError, match="the name 'x' is used twice"):
        engine_names([("x", "./a {out}"), ("x", "./b {out}")], set())


def test_names_in_the_report_and_a_duplicate_name_is_a_usage_error(cli, tmp_path, bug_model):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE + " --seed-style",
                                  "--engine", f"mine={ENGINE} --seed-style --output-name=x.bin")
    assert [c["name"] for c in report["candidates"]] == ["torch", "numpy_engine.py", "mine"]
    assert result.code == 0, result.out + result.err
    cli("compare", bug_model, "--engine", "torch=./a {out}").assert_one_line_error(
        2, "the name 'torch' is used twice")


# ---- 6. -q says why ---------------------------------------------------------------------------

def test_quiet_prints_one_reason_per_failing_candidate_then_the_verdict(cli, bug_model):
    result = cli("compare", bug_model, "--backends", "torch", "--repeat", 1, "-q",
                 "--engine", f"crash={ENGINE} --fail exit3",
                 "--engine", "missing=/nonexistent/engine {model} {out}",
                 "--engine", f"gqa={ENGINE} --bug gqa")
    assert result.code == 3
    lines = result.out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("ERROR crash: exited with code 3: numpy_engine: simulated failure")
    assert lines[1].startswith("ERROR missing: exited with code 127: ")
    assert "not found" in lines[1]
    assert lines[2].startswith("FAIL gqa: logits max abs ") and lines[2].endswith(
        "first divergence: layer 0, attn_heads")
    assert lines[3] == f"ERROR {bug_model}"


# ---- 7. --engine-output names a file the engine did not write ----------------------------------

def test_missing_engine_output_lists_what_the_engine_wrote(cli, tmp_path, bug_model):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE,
                                  "--engine-output", "nothere.bin")
    assert result.code == 3
    assert row(report, "numpy_engine.py")["error"] == (
        "numpy_engine.py: wrote no nothere.bin in its output directory (it wrote: "
        "engine.json, intermediates/ (27 files), logits.bin, timing.json)")
    result, report = compare_json(cli, tmp_path, bug_model, "--engine",
                                  f"{ENGINE} --seed-style && mv {{out}}/logits.bin {{out}}/l.f32")
    assert "wrote no .npy or .bin file in its output directory (it wrote: l.f32)" in \
        row(report, "numpy_engine.py")["error"]


# ---- the seed-style engine keeps working, decode file conventions ----------------------------

def test_decode_file_conventions(cli, tmp_path, bug_model):
    """decode_logits.npy or .bin, never taken for the logits; both at once is an error; a wrong
    shape names the file."""
    result, report = compare_json(cli, tmp_path, bug_model, "--decode", 2, "--engine",
                                  f"npy={ENGINE} --format npy", "--engine", f"raw={ENGINE}")
    assert result.code == 0, result.out + result.err
    assert row(report, "npy")["decode"]["status"] == row(report, "raw")["decode"]["status"] == "pass"
    both = f"b={ENGINE} --decode 2 && cp {{out}}/decode_logits.bin {{out}}/decode_logits.npy"
    short = f"s={ENGINE} --decode 1"
    result, report = compare_json(cli, tmp_path, bug_model, "--decode", 2, "--engine", both,
                                  "--engine", short)
    assert result.code == 3
    assert "wrote both decode_logits.npy and decode_logits.bin" in row(report, "b")["error"]
    assert row(report, "s")["error"].startswith("s: decode_logits.bin: 1536 bytes of raw float32, "
                                                "expected 3072")


def test_report_with_every_extension_matches_the_schema(cli, tmp_path, bug_model):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[1] / "python" / "xvalid" / "schemas" /
                         "compare-report.schema.json").read_text())
    _, report = compare_json(cli, tmp_path, bug_model, "--decode", 2,
                             "--engine", f"a={ENGINE} --bug kv-cache-position && "
                                         "mv {out}/intermediates/embedding.npy {out}/intermediates/emb.npy",
                             "--engine", f"b={ENGINE} --seed-style")
    jsonschema.validate(report, schema)
    assert report["schema_version"] == 2 and report["engine_protocol"] == 3
