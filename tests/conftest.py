"""Shared fixtures: model files made by the real CLI, and the CLI run as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The reference cache (docs/cache.md) never touches the user's: the whole session writes into a
# temporary directory, and each test into its own (fresh_reference_cache), so that a test that
# plants a defect in the reference cannot hand its outputs to another.
SESSION_CACHE = tempfile.mkdtemp(prefix="xvalid-test-cache-")
os.environ["XVALID_CACHE_DIR"] = SESSION_CACHE
os.environ.pop("XVALID_CACHE_MAX_MB", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_reference_cache(tmp_path_factory, monkeypatch) -> Path:
    """XVALID_CACHE_DIR: an empty directory of this test's own (subprocesses inherit it)."""
    directory = tmp_path_factory.mktemp("xvalid-cache", numbered=True)
    monkeypatch.setenv("XVALID_CACHE_DIR", str(directory))
    return directory


ENGINES = Path(__file__).parent / "engines"
REPO = Path(__file__).resolve().parents[1]

FLAG_NAMES = {"hidden", "layers", "heads", "kv_heads", "vocab", "intermediate", "max_pos",
              "rope_theta", "eps", "seq_len", "batch_size", "pad", "pad_len", "seed", "init_std",
              "preset"}


def run_xvalid(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m xvalid ARGS` in a subprocess: exit codes and stderr exactly as a user sees them."""
    proc = subprocess.run([sys.executable, "-m", "xvalid", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"xvalid {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def find_runner() -> str | None:
    """The standalone runner xvalid-run: XVALID_RUN, else the one installed beside this Python
    (an editable install's is a launcher for the build tree's runner), else xvalid-run on
    PATH, else the newest plain cmake build in build/*/."""
    candidates = [os.environ.get("XVALID_RUN"), str(Path(sys.executable).parent / "xvalid-run"),
                  shutil.which("xvalid-run")]
    candidates += sorted(map(str, REPO.glob("build/*/xvalid-run")), key=os.path.getmtime, reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def generate_flags(**flags) -> list[str]:
    unknown = set(flags) - FLAG_NAMES
    assert not unknown, f"unknown generate flags {unknown}"
    return [arg for key, value in flags.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture
def make_model(tmp_path_factory):
    """make_model(hidden=64, layers=2, ...) -> path of a model written by `xvalid generate`."""
    counter = iter(range(1_000_000))

    def make(**flags) -> Path:
        path = tmp_path_factory.mktemp("models") / f"model{next(counter)}.json"
        run_xvalid("generate", *generate_flags(**flags), "-o", path, check=True)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default model (seed flags): generated once per session."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.json"
    run_xvalid("generate", "-o", path, check=True)
    return path


@pytest.fixture(scope="session")
def bug_model(tmp_path_factory) -> Path:
    """GQA 8/2, B=3 S=8, the last two rows padded (left, right), random norm weights: a model
    on which every classic engine bug shows (tests/test_compare.py, test_kernel_mutations.py)."""
    path = tmp_path_factory.mktemp("bugs") / "m.json"
    run_xvalid("generate", *generate_flags(seq_len=8, batch_size=3, pad=2, seed=11), "-o", path,
               check=True)
    return path


def compare_json(cli, tmp_path, model, *args):
    """`xvalid compare MODEL --backends torch ... ARGS --json`, in-process, one timing run:
    (CliResult, the JSON report or None)."""
    report = tmp_path / "report.json"
    result = cli("compare", model, "--backends", "torch", "--repeat", 1, "--warmup", 0,
                 "--json", report, *args)
    return result, (json.loads(report.read_text()) if report.exists() else None)


def engine_row(report, index: int = 1):
    """The report row of the index-th (1-based) external engine."""
    return [c for c in report["candidates"] if c["kind"] == "engine"][index - 1]


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def assert_one_line_error(self, code: int, *needles: str) -> None:
        """The contract for bad input: one line on stderr naming the problem, no traceback."""
        assert self.code == code, f"exit {self.code}, expected {code}\n{self.out}\n{self.err}"
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        assert "Traceback" not in self.err and "internal error" not in self.err, self.err
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def cli(capsys):
    """cli(*args) runs the real entry point in-process (fast) and returns exit code + output."""
    from xvalid.cli import main

    def invoke(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


# CI runs the same hypothesis examples every time (CI=true there): a red build is always
# reproducible, and new examples are explored in local runs.
if os.environ.get("CI"):
    from hypothesis import settings as _hypothesis_settings
    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    _hypothesis_settings.load_profile("ci")
