"""Mutation tests of both C++ kernels (clear and fast): each classic engine bug is planted into a
copy of the real kernel source, the standalone runner is rebuilt, and `xvalid compare` must FAIL
it (exit 1) and name the layer and sublayer where the bug first shows. The unmutated copy must
PASS.

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

# Edits shared by both kernels: transformer_forward is written once.
ATTN_LOST = [("transformer.cpp", "op.residual_rmsnorm(x, proj, lw.rms_ffn",
              "op.residual_rmsnorm(x, nullptr, lw.rms_ffn")]
NAN = [("transformer.cpp", "op.matmul(Op::head, s.logits.data(), xb, w.lm_head, rows, H, V);",
        "op.matmul(Op::head, s.logits.data(), xb, w.lm_head, rows, H, V);\n"
        "    s.logits[0] = __builtin_nanf(\"\");")]



def rope_interleaved(file: str, indent: str) -> list[tuple[str, str, str]]:
    """Rotate interleaved pairs (x[2j], x[2j+1]) instead of the halves (x[j], x[j+half])."""
    rows = lambda *lines: f"\n{indent}".join(lines)  # noqa: E731
    return [(file, rows("float x1 = v[j], x2 = v[j + half];", "v[j] = x1 * c[j] - x2 * s[j];",
                        "v[j + half] = x2 * c[j + half] + x1 * s[j + half];"),
             rows("float x1 = v[2 * j], x2 = v[2 * j + 1];", "v[2 * j] = x1 * c[j] - x2 * s[j];",
                  "v[2 * j + 1] = x2 * c[j] + x1 * s[j];"))]


# kernel -> bug -> ([(file under csrc/kernel, old, new), ...], where it first shows (layer, sublayer))
MUTATIONS = {
    "clear": {
        "gqa": ([("ops.cpp", "((size_t)b * KVH + h / kv_mul)", "((size_t)b * KVH + h % KVH)")],
                (0, "attn_heads")),
        "rope-k-missing": ([("ops.cpp", "rope_forward(k, B, T, KVH, hd, p0, cos_table, sin_table);", "")],
                           (0, "k")),
        "rope-interleaved": (rope_interleaved("ops.cpp", " " * 20), (0, "q")),
        "no-padding-mask": ([("ops.cpp", "if (key_mask && key_mask[j] == 0) s += -1e9f;", "")],
                            (0, "attn_heads")),
        # the attention output is computed but never added to the residual stream
        "attn-lost": (ATTN_LOST, (0, "attn_residual")),
        "norm-weight-ignored": ([("ops.cpp", "o[i] = (xr[i] * inv_rms) * weight[i];",
                                  "o[i] = xr[i] * inv_rms;")],
                                (0, "attn_norm")),
        "causal-off-by-one": ([("ops.cpp", "int n_keys = p0 + i + 1;",
                                "int n_keys = std::min(p0 + i + 2, p0 + T);")],
                              (0, "attn_heads")),
        "nan": (NAN, (None, "logits")),
    },
    "fast": {
        "gqa": ([("fast/simd_attention.cpp", "size_t slab = ((size_t)b * KVH + g) * capacity * hd;\n"
                                       "    const float* keys",
                  "size_t slab = ((size_t)b * KVH + (g + 1) % KVH) * capacity * hd;\n"
                  "    const float* keys")],
                (0, "attn_heads")),
        "rope-k-missing": ([("fast/simd_ops.cpp", "rotate_half(kg, c, s, half);", "")], (0, "k")),
        "rope-interleaved": (rope_interleaved("fast/simd_ops.cpp", " " * 8), (0, "q")),
        "no-padding-mask": ([("fast/simd_attention.cpp", "if (key_mask[j0 + j] == 0) s[j / 8][j % 8] += -1e9f;", ";")],
                            (0, "attn_heads")),
        "attn-lost": (ATTN_LOST, (0, "attn_residual")),
        "norm-weight-ignored": ([("fast/simd_ops.cpp", "o[i] = (xr[i] * inv_rms) * weight[i];",
                                  "o[i] = xr[i] * inv_rms;")],
                                (0, "attn_norm")),
        "causal-off-by-one": ([("fast/simd_attention.cpp", "int key_end = p0 + i1;",
                                "int key_end = std::min(p0 + i1 + 1, p0 + T);"),
                               ("fast/simd_attention.cpp", "int n = std::min(nk, p0 + i + 1 - j0);",
                                "int n = std::min(nk, std::min(p0 + i + 2, p0 + T) - j0);")],
                              (0, "attn_heads")),
        "nan": (NAN, (None, "logits")),
    },
}
MUTATED_FILES = sorted({name for bugs in MUTATIONS.values() for edits, _ in bugs.values()
                        for name, _, _ in edits})


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
    shutil.copytree(REPO / "cmake", src / "cmake")
    shutil.copytree(REPO / "csrc", src / "csrc")
    shutil.copytree(REPO / "python" / "xvalid" / "schemas", src / "python" / "xvalid" / "schemas")  # the format
    cmake = str(TOOLS / "cmake") if (TOOLS / "cmake").exists() else "cmake"
    subprocess.run([cmake, "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Debug",  # -O0: the fastest rebuilds
                    f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja', path=str(TOOLS)) or 'ninja'}"],
                   check=True, capture_output=True)
    yield src, build, cmake


def build_runner(kernel_tree, edits) -> Path:
    src, build, cmake = kernel_tree
    for name in MUTATED_FILES:  # start every mutant from the real kernel
        shutil.copy(REPO / "csrc" / "kernel" / name, src / "csrc" / "kernel" / name)
    for name, old, new in edits:
        path = src / "csrc" / "kernel" / name
        text = path.read_text()
        assert text.count(old) == 1, f"mutation no longer applies to {name}: {old!r}"
        path.write_text(text.replace(old, new))
    proc = subprocess.run([cmake, "--build", build, "--target", "xvalid-run"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return build / "xvalid-run"


def compare_runner(cli, tmp_path, model, runner, kernel):
    report = tmp_path / "r.json"
    result = cli("compare", model, "--backends", "torch", "--repeat", 1, "--json", report,
                 "--engine", f"{runner} {{model}} {{out}} --intermediates --kernel {kernel}")
    return result, json.loads(report.read_text())["candidates"][1]


@pytest.mark.parametrize("kernel", sorted(MUTATIONS))
def test_unmutated_kernel_passes(cli, tmp_path, kernel_tree, bug_model, kernel):
    result, engine = compare_runner(cli, tmp_path, bug_model, build_runner(kernel_tree, []), kernel)
    assert result.code == 0, result.out + result.err
    assert engine["divergence"]["first"] is None


@pytest.mark.parametrize("kernel,bug", [(k, b) for k in sorted(MUTATIONS) for b in sorted(MUTATIONS[k])])
def test_mutated_kernel_fails_at_the_right_place(cli, tmp_path, kernel_tree, bug_model, kernel, bug):
    edits, (layer, point) = MUTATIONS[kernel][bug]
    result, engine = compare_runner(cli, tmp_path, bug_model, build_runner(kernel_tree, edits), kernel)
    assert result.code == 1, result.out + result.err
    first = engine["divergence"]["first"]
    assert (first["layer"], first["point"]) == (layer, point), first
