"""The C++ dev loop (docs/dev-loop.md): in an editable install, touching a kernel file makes
the next `xvalid` call rebuild the module, keep the rebuild off stdout, and give a verdict."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_touch_kernel_then_compare_rebuilds_quietly_and_passes(tiny_model):
    core = pytest.importorskip("xvalid._core")
    module = Path(core.__file__)
    if not module.is_relative_to(REPO / "build"):
        pytest.skip("not an editable install with rebuild-on-import (see docs/dev-loop.md)")
    kernel = REPO / "csrc" / "kernel" / "ops.cpp"
    before = module.stat().st_mtime
    time.sleep(0.01)
    os.utime(kernel)  # an "edit": newer than the last build
    proc = subprocess.run([sys.executable, "-m", "xvalid", "compare", str(tiny_model), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == f"PASS {tiny_model}\n"  # rebuild messages stay off stdout
    assert module.stat().st_mtime > before, "the module was not rebuilt"
    # How fast the loop is, is measured by scripts/measure_dev_loop.sh, not asserted here.


def test_failed_rebuild_is_a_one_line_error_with_exit_3(cli, tiny_model, monkeypatch):
    """A compile error in an edited kernel: the compiler's output (on stderr, from the build)
    and then one line from xvalid, exit 3; never a traceback."""
    from xvalid import backends

    def failing_rebuild():
        raise subprocess.CalledProcessError(1, ["cmake", "--build", "."])

    monkeypatch.setattr(backends, "_import_core", failing_rebuild)
    monkeypatch.setattr(backends, "_core_import", None)
    cli("compare", tiny_model, "-q").assert_one_line_error(3, "the C++ rebuild failed")
    monkeypatch.setattr(backends, "_core_import", None)
    cli("run", tiny_model, "--backend", "cpp").assert_one_line_error(3, "the C++ rebuild failed")


def test_missing_module_is_a_one_line_error(cli, tiny_model, monkeypatch):
    from xvalid import backends

    def not_built():
        raise ImportError("No module named 'xvalid._core'")

    monkeypatch.setattr(backends, "_import_core", not_built)
    monkeypatch.setattr(backends, "_core_import", None)
    cli("compare", tiny_model).assert_one_line_error(2, "the C++ backend is not built")


def test_the_rebuild_runs_outside_the_import_lock(monkeypatch):
    """The editable finder rebuilds inside the import of _core, under Python's global import
    lock; xvalid runs the rebuild itself first, so the main thread keeps importing (and reading
    the model file) while the compiler runs. A stand-in finder whose rebuild waits for the main
    thread to import a module: under the import lock that import could not finish."""
    import threading

    from xvalid import backends

    pytest.importorskip("xvalid._core")
    started, imported = threading.Event(), threading.Event()

    class RebuildingFinder:
        known_wheel_files = {"xvalid._core": "_core.so"}
        rebuild_flag, rebuilt = True, False
        calls = 0

        def find_spec(self, *args):
            return None

        def rebuild(self):
            type(self).calls += 1
            started.set()
            assert imported.wait(timeout=20), "the main thread's import waited for the rebuild"

    finder = RebuildingFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr(backends, "_core_import", None)
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    backends.start_loading_core()
    assert started.wait(timeout=20)
    import colorsys  # noqa: F401  (a module nothing imported yet)
    imported.set()
    assert backends.load_core() is sys.modules["xvalid._core"]
    assert finder.rebuilt is True and RebuildingFinder.calls == 1
