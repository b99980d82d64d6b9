"""Mutation tests of the C++ kernel: each classic engine bug is planted into a copy of the real
kernel source, the standalone runner is rebuilt, and `xvalid compare` must FAIL it (exit 1)
and name the layer and sublayer where the bug first shows. The unmutated copy must PASS.

The mutations are exact source edits: when the kernel's code changes so that an edit no
longer applies, the test fails and the mutation must be updated with it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(sys.executable).parent

# bug -> ([(file, old, new), ...], where it first shows (layer, sublayer))
MUTATIONS = {
    "gqa": ([("ops.cpp", "(size_t)(h / kv_mul) * hd;", "(size_t)(h % KVH) * hd;")],
            (0, "attn_heads")),
    "rope-k-missing": ([("transformer.cpp",
                         "rope_forward(k, B, T, KVH, hd, p0, w.rope_cos, w.rope_sin);", "")],
                       (0, "k")),
    "rope-interleaved": ([("ops.cpp", "float x1 = v[j], x2 = v[j + half];\n"
                                      "                    v[j] = x1 * c[j] - x2 * s[j];\n"
                                      "                    v[j + half] = x2 * c[j + half] + x1 * s[j + half];",
                           "float x1 = v[2 * j], x2 = v[2 * j + 1];\n"
                           "                    v[2 * j] = x1 * c[j] - x2 * s[j];\n"
                           "                    v[2 * j + 1] = x2 * c[j] + x1 * s[j];")],
                         (0, "q")),
    "no-padding-mask": ([("ops.cpp", "if (key_mask && key_mask[j] == 0) s += -1e9f;", "")],
                        (0, "attn_heads")),
    # the attention output is computed but never added to the residual stream
    "attn-lost": ([("transformer.cpp", "residual_forward(x, proj, (int64_t)rows * H);\n"
                                       "        record(capture, l, \"attn_residual\"",
                    "record(capture, l, \"attn_residual\"")],
                  (0, "attn_residual")),
    "norm-weight-ignored": ([("ops.cpp", "o[i] = (xr[i] * inv_rms) * weight[i];",
                              "o[i] = xr[i] * inv_rms;")],
                            (0, "attn_norm")),
    "causal-off-by-one": ([("ops.cpp", "int n_keys = p0 + i + 1;",
                            "int n_keys = std::min(p0 + i + 2, p0 + T);")],
                          (0, "attn_heads")),
    "nan": ([("transformer.cpp", "matmul_forward(s.logits.data(), xb, w.lm_head, rows, H, V);",
              "matmul_forward(s.logits.data(), xb, w.lm_head, rows, H, V);\n"
              "    s.logits[0] = __builtin_nanf(\"\");")],
            (None, "logits")),
}


@pytest.fixture(scope="module")
def kernel_tree(tmp_path_factory):
    """A copy of the C++ sources with a configured build of the runner; yields (src, build)."""
    for tool in ("cmake", "ninja"):
        if not (TOOLS / tool).exists() and shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    root = tmp_path_factory.mktemp("mutant")
    src, build = root / "src", root / "build"
    src.mkdir()
    shutil.copy(REPO / "CMakeLists.txt", src)
    shutil.copytree(REPO / "csrc", src / "csrc")
    cmake = str(TOOLS / "cmake") if (TOOLS / "cmake").exists() else "cmake"
    subprocess.run([cmake, "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja', path=str(TOOLS)) or 'ninja'}"],
                   check=True, capture_output=True)
    yield src, build, cmake


def build_runner(kernel_tree, edits) -> Path:
    src, build, cmake = kernel_tree
    for name in ("ops.cpp", "transformer.cpp"):  # start every mutant from the real kernel
        shutil.copy(REPO / "csrc" / "kernel" / name, src / "csrc" / "kernel" / name)
    for name, old, new in edits:
        path = src / "csrc" / "kernel" / name
        text = path.read_text()
        assert text.count(old) >= 1, f"mutation no longer applies to {name}: {old!r}"
        path.write_text(text.replace(old, new))
    proc = subprocess.run([cmake, "--build", build, "--target", "xvalid-run"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return build / "xvalid-run"


def compare_runner(cli, tmp_path, model, runner):
    report = tmp_path / "r.json"
    result = cli("compare", model, "--backends", "torch", "--repeat", 1, "--json", report,
                 "--engine", f"{runner} {{model}} {{out}} --intermediates")
    return result, json.loads(report.read_text())["candidates"][1]


def test_unmutated_kernel_passes(cli, tmp_path, kernel_tree, bug_model):
    result, engine = compare_runner(cli, tmp_path, bug_model, build_runner(kernel_tree, []))
    assert result.code == 0, result.out + result.err
    assert engine["divergence"]["first"] is None


@pytest.mark.parametrize("bug", sorted(MUTATIONS))
def test_mutated_kernel_fails_at_the_right_place(cli, tmp_path, kernel_tree, bug_model, bug):
    edits, (layer, point) = MUTATIONS[bug]
    result, engine = compare_runner(cli, tmp_path, bug_model, build_runner(kernel_tree, edits))
    assert result.code == 1, result.out + result.err
    first = engine["divergence"]["first"]
    assert (first["layer"], first["point"]) == (layer, point), first
