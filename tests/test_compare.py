"""`xvalid compare` against external engines kept as fixtures: a correct one must PASS; each
classic engine bug must FAIL with exit 1 and the right first divergence; every protocol
failure is a clear error. Then the report's JSON schema, plots and usage errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ENGINES, compare_json, engine_row

ENGINE = f"{sys.executable} {ENGINES / 'numpy_engine.py'} {{model}} {{out}}"
SCHEMA = Path(__file__).parent.parent / "python" / "xvalid" / "schemas" / "compare-report.schema.json"


@pytest.mark.parametrize("fmt,name", [("raw", "made_up.f32"), ("npy", "logits.npy"),
                                      ("raw", None)])
def test_correct_engine_passes(cli, tmp_path, bug_model, fmt, name):
    command = ENGINE + f" --format {fmt}" + (f" --output-name {name}" if name else "")
    extra = ["--engine-output", name] if name and not name.endswith((".npy", ".bin")) else []
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", command, *extra)
    assert result.code == 0, result.out + result.err
    row = engine_row(report)
    assert row["status"] == "pass" and row["divergence"]["first"] is None
    assert 0 < row["metrics"]["max_abs"] < report["tolerance"]["atol"]
    assert row["metrics"]["top1"]["agree"] == row["metrics"]["top1"]["decisive_rows"] > 0
    assert "PASS" in result.out


def test_engine_without_intermediates_is_still_judged(cli, tmp_path, bug_model):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine",
                                  ENGINE + " --no-intermediates --bug gqa")
    assert result.code == 1
    assert "divergence" not in engine_row(report)


# bug -> (layer, sublayer) where it first shows; measured independently on this config
BUGS = {
    "gqa": (0, "attn_heads"),
    "rope-k-missing": (0, "k"),
    "rope-interleaved": (0, "q"),
    "no-padding-mask": (0, "attn_heads"),
    "attn-lost": (0, "attn_out"),
    "norm-weight-ignored": (0, "attn_norm"),
    "causal-off-by-one": (0, "attn_heads"),
    "nan": (None, "logits"),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_broken_engine_fails_with_the_right_first_divergence(cli, tmp_path, bug_model, bug):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE + f" --bug {bug}")
    assert result.code == 1, result.out + result.err
    row = engine_row(report)
    assert row["status"] == "fail" and report["verdict"] == "fail"
    first = row["divergence"]["first"]
    assert (first["layer"], first["point"]) == BUGS[bug]
    layer, point = BUGS[bug]
    where = f"layer {layer}, {point}" if layer is not None else point
    assert f"first divergence: {where}" in result.out
    assert "reproduce: xvalid generate" in result.out and f"--bug {bug}" in result.out
    if bug == "nan":
        assert row["metrics"]["nonfinite"]["count"] == 1
        assert row["metrics"]["max_abs"] == "inf"  # a NaN is infinitely far off, not NaN
        assert row["metrics"]["nonfinite"]["first"][:2] == [0, 7]


@pytest.mark.parametrize("mode,needle", [
    ("exit3", "exited with code 3"),
    ("short", "logits.bin: 12284 bytes of raw float32, expected 12288 (4 x 3 x 8 x 128 for shape [3, 8, 128])"),
    ("long", "logits.bin: 12292 bytes of raw float32, expected 12288"),
    ("none-written", "wrote no .npy or .bin file"),
    ("two-files", "name one with --engine-output"),
])
def test_engine_protocol_failures_are_clear_errors(cli, tmp_path, bug_model, mode, needle):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE + f" --fail {mode}")
    assert result.code == 3, result.out + result.err
    assert "Traceback" not in result.out + result.err
    row = engine_row(report)
    assert row["status"] == "error" and needle in row["error"]
    assert needle in result.out


def test_engine_timeout_kills_it(cli, tmp_path, bug_model):
    import time
    start = time.monotonic()
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE + " --fail sleep",
                                  "--engine-timeout", 1)
    assert result.code == 3 and "timed out after 1 s" in engine_row(report)["error"]
    assert time.monotonic() - start < 30


def test_wrong_npy_shape_or_dtype_and_named_output_missing(cli, tmp_path, bug_model):
    script = tmp_path / "wrong_shape.py"
    script.write_text("import sys, numpy as np\n"
                      "np.save(sys.argv[2] + '/logits.npy', np.zeros(eval(sys.argv[3]), sys.argv[4]))\n")
    engine = f"{sys.executable} {script} {{model}} {{out}}"
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", engine + " '(2, 3)' float32")
    assert result.code == 3 and "logits.npy: shape [2, 3], expected [3, 8, 128]" in engine_row(report)["error"]
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", engine + " '(3, 8, 128)' int32")
    assert result.code == 3 and "logits.npy: dtype int32, expected float32" in engine_row(report)["error"]
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE,
                                  "--engine-output", "nothere.bin")
    assert result.code == 3 and "wrote no nothere.bin" in engine_row(report)["error"]


def test_hostile_npy_headers_are_refused_before_reading_data(cli, tmp_path, bug_model):
    """A header claiming 10^12 floats must not make xvalid allocate them."""
    script = tmp_path / "liar.py"
    script.write_text(
        "import sys\n"
        "header = \"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }\"\n"
        "header = header.ljust(118) + '\\n'\n"
        "open(sys.argv[2] + '/logits.npy', 'wb').write(b'\\x93NUMPY\\x01\\x00' + bytes([len(header), 0])"
        " + header.encode() + b'\\x00' * 64)\n")
    result, report = compare_json(cli, tmp_path, bug_model,
                                  "--engine", f"{sys.executable} {script} {{model}} {{out}}")
    assert result.code == 3, result.out + result.err
    assert "shape [1000000000000], expected [3, 8, 128]" in engine_row(report)["error"]


def test_engine_intermediates_in_another_layout_or_the_wrong_size(cli, tmp_path, bug_model):
    """(B, S, NH*hd) for q is the same data as (B, S, NH, hd): accepted. A wrong size is an
    engine error naming the file."""
    out = tmp_path / "ref"
    cli("run", bug_model, "-o", tmp_path / "l.npy", "--intermediates", out)
    script = tmp_path / "replay.py"
    script.write_text(
        "import sys, shutil, numpy as np\n"
        f"src = {str(out)!r}\n"
        "shutil.copytree(src, sys.argv[2] + '/intermediates')\n"
        f"shutil.copy({str(tmp_path / 'l.npy')!r}, sys.argv[2] + '/logits.npy')\n"
        "q = np.load(src + '/layer0.q.npy')\n"
        "q = q.reshape(q.shape[0], q.shape[1], -1) if sys.argv[3] == 'flat' else q[:, :-1]\n"
        "np.save(sys.argv[2] + '/intermediates/layer0.q.npy', q)\n")
    engine = f"{sys.executable} {script} {{model}} {{out}}"
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", engine + " flat")
    assert result.code == 0, result.out + result.err
    assert engine_row(report)["divergence"]["points"][2]["name"] == "layer0.q"
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", engine + " short")
    assert result.code == 3
    assert "intermediates/layer0.q.npy: shape [3, 7, 8, 8], expected [3, 8, 8, 8]" in engine_row(report)["error"]


def test_engine_sees_quoted_paths_with_spaces(cli, tmp_path, bug_model):
    spaced = tmp_path / "a dir" / "m m.json"
    spaced.parent.mkdir()
    spaced.write_bytes(bug_model.read_bytes())
    result, _ = compare_json(cli, tmp_path, spaced, "--engine", ENGINE)
    assert result.code == 0, result.out + result.err


def test_report_matches_its_json_schema(cli, tmp_path, bug_model):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    for args in (["--engine", ENGINE], ["--engine", ENGINE + " --bug nan"],
                 ["--engine", ENGINE + " --fail exit3"], ["--decode", 2]):
        _, report = compare_json(cli, tmp_path, bug_model, *args)
        jsonschema.validate(report, schema)
    broken = dict(report, verdict="maybe")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_torch_reference_row_reports_its_noise_floor_and_timing(cli, tmp_path, bug_model):
    result, report = compare_json(cli, tmp_path, bug_model, "--decode", 3, "--backends", "cpp,torch")
    assert result.code == 0
    cpp, ref = report["candidates"]
    assert ref["kind"] == "reference" and ref["metrics"]["max_abs"] == report["tolerance"]["reference_noise"]
    assert 0 < report["tolerance"]["reference_noise"] < 1e-5
    assert "divergence" not in ref  # the reference is not compared with itself
    # Speed relative to torch: the C++ row (listed first) against torch's median, torch 1.0.
    assert ref["timing"]["median_ms"] > 0 and ref["timing"]["ratio_to_torch"] == 1.0
    assert cpp["timing"]["median_ms"] != ref["timing"]["median_ms"]
    assert cpp["timing"]["ratio_to_torch"] == pytest.approx(
        cpp["timing"]["median_ms"] / ref["timing"]["median_ms"], rel=1e-12)
    steps = ref["decode"]["steps"]
    assert [s["position"] for s in steps] == [5, 6, 7] and all(s["pass"] for s in steps)


def test_explicit_tolerance_overrides_and_smallest_passing_atol(cli, tmp_path, bug_model):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE + " --bug rope-k-missing")
    needed = engine_row(report)["metrics"]["min_passing_atol"]
    result, report = compare_json(cli, tmp_path, bug_model, "--engine",
                                  ENGINE + " --bug rope-k-missing", "--atol", needed * 1.01)
    assert result.code == 0 and report["tolerance"]["atol_source"] == "--atol"
    result, report = compare_json(cli, tmp_path, bug_model, "--engine",
                                  ENGINE + " --bug rope-k-missing", "--atol", needed * 0.99)
    assert result.code == 1


def test_plot_formats(cli, tmp_path, bug_model):
    """One run, every format: an SVG document of the figure's size, a complete PDF."""
    import xml.etree.ElementTree as ET
    svg, pdf = tmp_path / "err.svg", tmp_path / "err.pdf"
    for plot in (svg, pdf):
        result, _ = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE, "--plot", plot)
        assert result.code == 0
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == "1080pt"  # 15 inches at 72 pt
    assert len(list(root.iter("{http://www.w3.org/2000/svg}path"))) > 50
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF") and len(data) > 5_000
    assert not list(tmp_path.glob(".err*.tmp")), "temporary files left behind"


def test_save_logits_and_plot(cli, tmp_path, bug_model):
    out = tmp_path / "logits"
    plot = tmp_path / "err.png"
    result, _ = compare_json(cli, tmp_path, bug_model, "--engine", ENGINE + " --bug gqa",
                             "--save-logits", out, "--plot", plot)
    assert result.code == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["reference.npy", "reference-float64.npy", "torch.npy",
                            "numpy_engine.py.npy"])
    assert np.load(out / "reference.npy").shape == (3, 8, 128)
    # The PNG decodes to the figure's pixels (14 inches wide at 110 dpi) and shows something:
    # the heatmap's colours, not a blank or grey page.
    from matplotlib.image import imread
    image = imread(plot)  # (height, width, RGBA) floats in [0, 1]
    assert image.shape[1] == 15 * 110 and image.shape[2] == 4 and image.shape[0] > 300
    rgb = image[..., :3]
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.05  # not blank
    assert (rgb.max(axis=-1) - rgb.min(axis=-1) > 0.3).mean() > 0.02  # coloured


@pytest.mark.parametrize("args,needle", [
    (["--decode", 8], "--decode 8 needs at least one prefill token"),
    (["--backends", "bogus"], "unknown backend 'bogus'"),
    (["--backends", ""], "nothing to compare"),
    (["--engine", "echo no-out-dir {model}"], "must contain {out}"),
    (["--repeat", 0], "--repeat"),
    (["--threads", 0], "--threads"),
    (["--engine-timeout", -1], "--engine-timeout"),
    (["--plot", "errors.jpgx"], "must end in .png, .svg, .pdf"),
])
def test_usage_errors(cli, bug_model, args, needle):
    cli("compare", bug_model, *args).assert_one_line_error(2, needle)


def test_bad_model_file_is_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    cli("compare", bad).assert_one_line_error(2, "not valid JSON")


def test_json_to_stdout_keeps_tables_on_stderr(cli, bug_model):
    result = cli("compare", bug_model, "--backends", "torch", "--repeat", 1, "--json", "-",
                 "--engine", ENGINE + " --bug gqa")
    assert result.code == 1
    report = json.loads(result.out)  # stdout is the JSON document alone
    assert report["verdict"] == "fail" and report["exit_code"] == 1
    assert "first divergence: layer 0, attn_heads" in result.err


def test_plot_colour_scale_follows_the_data_centred_on_the_budget():
    """log10(error/budget): the scale spans the data (no saturation), at least 0.1x..10x, and
    its ticks always include 1 (the budget)."""
    from xvalid.plot import _decade_ticks, _ratio, _scale
    assert _scale([-3.2, 0.5, 4.7]) == (-3.2, 4.7)
    assert _scale([-0.2, float("inf"), float("-inf")]) == (-1.0, 1.0)
    assert _ratio({"error": 2e-3, "budget": 2e-5}) == pytest.approx(2.0)
    assert _ratio({"error": "nan", "budget": 1e-5}) == float("inf")
    assert _ratio({"error": 0.0, "budget": 1e-5}) == float("-inf")
    # a half-precision point: the larger of its two shares (max abs 0.1x, RMSE 2x its bound)
    assert _ratio({"error": 1e-3, "budget": 1e-2, "rmse": 4e-4, "rmse_budget": 2e-4}) == \
        pytest.approx(np.log10(2.0))
    assert 0 in _decade_ticks(-3.2, 4.7) and len(_decade_ticks(-40, 40)) <= 11
