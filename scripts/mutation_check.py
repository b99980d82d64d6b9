#!/usr/bin/env python3
"""Mutation check of the validator: do the tests notice realistic defects?

Plants each defect of python/xvalid/mutants.toml, one at a time, into the source, runs the
tests listed for it (pytest -x -q), and restores the file, always (an error, Ctrl-C or SIGTERM
included; a run killed harder is repaired at the next start from build/mutation-check/backup).
A mutant is killed when its tests fail. A mutant whose snippet is no longer in the source
(or is there more than once) is "not applicable": reported and counted apart, never as killed.

    .venv/bin/python scripts/mutation_check.py               # every mutant, ~10 min on 2 cores
    .venv/bin/python scripts/mutation_check.py --only kl     # names containing "kl"
    .venv/bin/python scripts/mutation_check.py --list

Before the mutants, the unmutated source must pass every test the mutants use (otherwise a
"killed" would mean nothing). The last line is `killed K of N mutants`. Exit 0 when at least
--min-score of them are killed and every mutant applied, else 1; 2 for bad usage or a failing
baseline. Logs of each run: build/mutation-check/logs/NAME.log.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "xvalid"
MUTANTS = PACKAGE / "mutants.toml"
WORK = REPO / "build" / "mutation-check"
BACKUP = WORK / "backup"


@dataclass
class Mutant:
    name: str
    file: str  # relative to python/xvalid
    old: str
    new: str
    why: str
    tests: list[str]  # pytest arguments
    issue: int | None = None

    @property
    def path(self) -> Path:
        return PACKAGE / self.file

    def occurrences(self) -> int:
        return self.path.read_text().count(self.old) if self.path.is_file() else 0


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    """The mutant list; ValueError names the first malformed entry."""
    doc = tomllib.loads(path.read_text())
    suites = doc.get("suites", {})
    mutants, seen = [], set()
    for index, entry in enumerate(doc.get("mutant", [])):
        where = f"{path.name}: mutant {index + 1} ({entry.get('name', '?')})"
        missing = {"name", "file", "old", "new", "why", "tests"} - set(entry)
        if missing:
            raise ValueError(f"{where}: missing {', '.join(sorted(missing))}")
        unknown = set(entry) - {"name", "file", "old", "new", "why", "tests", "issue"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        tests = entry["tests"]
        if isinstance(tests, str):
            if tests not in suites:
                raise ValueError(f"{where}: no suite named {tests!r} in [suites]")
            tests = suites[tests]
        if entry["name"] in seen:
            raise ValueError(f"{where}: the name is used twice")
        if entry["old"] == entry["new"] or not entry["old"]:
            raise ValueError(f"{where}: old must be non-empty and differ from new")
        seen.add(entry["name"])
        mutants.append(Mutant(entry["name"], entry["file"], entry["old"], entry["new"],
                              entry["why"], list(tests), entry.get("issue")))
    return mutants


# ---- planting and restoring ----------------------------------------------------------------------


def _drop_bytecode(path: Path) -> None:
    """A cached .pyc of the same size and second as the mutant would hide it: remove it."""
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


def restore_leftovers() -> None:
    """Put back any source a hard-killed earlier run left mutated."""
    for saved in sorted(BACKUP.glob("*")) if BACKUP.is_dir() else []:
        target = PACKAGE / saved.name.replace("%", "/")
        target.write_bytes(saved.read_bytes())
        _drop_bytecode(target)
        saved.unlink()
        print(f"mutation_check: restored {target} from an interrupted run", file=sys.stderr)


class Planted:
    """Context manager: the mutant in its file, the original back on exit (whatever happens)."""

    def __init__(self, mutant: Mutant):
        self.mutant = mutant

    def __enter__(self):
        path = self.mutant.path
        self.original = path.read_bytes()
        BACKUP.mkdir(parents=True, exist_ok=True)
        self.backup = BACKUP / self.mutant.file.replace("/", "%")
        self.backup.write_bytes(self.original)
        text = self.original.decode()
        path.write_text(text.replace(self.mutant.old, self.mutant.new, 1))
        _drop_bytecode(path)
        return self

    def __exit__(self, *exc):
        path = self.mutant.path
        path.write_bytes(self.original)
        _drop_bytecode(path)
        self.backup.unlink(missing_ok=True)
        return False


# ---- running tests ---------------------------------------------------------------------------------


def run_pytest(args: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """pytest -x -q ARGS in its own process group; (exit code or None on timeout, seconds)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    # Without the cache and hypothesis plugins: a second less per run (x 2 runs a mutant).
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-p", "no:hypothesispytest", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        except BaseException:  # Ctrl-C: take the test run (and its engines) down with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if code is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, time.monotonic() - start


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only mutants whose name contains TEXT (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the tests on the unmutated source first")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test run [300]")
    parser.add_argument("--min-score", type=float, default=0.9,
                        help="share of mutants that must be killed for exit 0 [0.9]")
    args = parser.parse_args(argv)
    try:
        mutants = load_mutants()
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"mutation_check: error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        mutants = [m for m in mutants if any(text in m.name for text in args.only)]
    if not mutants:
        print("mutation_check: error: no mutant selected", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name:36} {m.file:13} {m.why}")
        return 0

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    restore_leftovers()
    start = time.monotonic()
    try:
        if not args.no_baseline and not baseline(mutants, args.timeout):
            return 2
        results = [check(m, i, len(mutants), args.timeout) for i, m in enumerate(mutants, 1)]
    except KeyboardInterrupt:
        restore_leftovers()
        print("mutation_check: interrupted; the source is restored", file=sys.stderr)
        return 130
    return summary(mutants, results, time.monotonic() - start, args.min_score)


def baseline(mutants: list[Mutant], timeout: float) -> bool:
    """The unmutated source passes every test file the mutants use (one run: a superset of
    every selection), or a "killed" would mean nothing."""
    files = list(dict.fromkeys(a.split("::")[0] for m in mutants for a in m.tests
                               if a.startswith("tests/")))
    log = WORK / "logs" / "baseline.log"
    code, seconds = run_pytest(files, log, timeout * len(files))
    print(f"baseline: {' '.join(files)}: {'pass' if code == 0 else 'FAIL'} ({seconds:.0f} s)",
          flush=True)
    if code != 0:
        print(f"mutation_check: error: the unmutated source fails its tests (log: {log})",
              file=sys.stderr)
    return code == 0


def check(m: Mutant, index: int, total: int, timeout: float) -> str:
    """'killed', 'survived', 'timeout' (counted as killed), 'not applicable: ...' or 'no tests'."""
    count = m.occurrences()
    if count != 1:
        result = (f"not applicable: snippet not found in {m.file}" if count == 0 else
                  f"not applicable: snippet occurs {count} times in {m.file}")
        seconds = 0.0
    else:
        with Planted(m):
            code, seconds = run_pytest(m.tests, WORK / "logs" / f"{m.name}.log", timeout)
        result = {None: "timeout", 0: "survived", 5: "no tests"}.get(code, "killed")
    print(f"[{index:2}/{total}] {result:9} {m.name} ({seconds:.0f} s)", flush=True)
    return result


def summary(mutants: list[Mutant], results: list[str], seconds: float, min_score: float) -> int:
    applied = [(m, r) for m, r in zip(mutants, results) if not r.startswith("not applicable")]
    killed = [m for m, r in applied if r in ("killed", "timeout")]
    survivors = [(m, r) for m, r in applied if r not in ("killed", "timeout")]
    inapplicable = [(m, r) for m, r in zip(mutants, results) if r.startswith("not applicable")]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\n{len(mutants)} mutants in {seconds / 60:.1f} min "
          f"(test processes used {(cpu.ru_utime + cpu.ru_stime) / 60:.1f} min of CPU)")
    issue = [(m, r) for m, r in zip(mutants, results) if m.issue]
    if issue:
        print(f"defects of issue 12's table killed: "
              f"{sum(r in ('killed', 'timeout') for _, r in issue)} of {len(issue)}")
    for m, r in inapplicable:
        print(f"NOT APPLICABLE {m.name}: {r} (update python/xvalid/mutants.toml)")
    for m, r in survivors:
        print(f"SURVIVED {m.name} ({m.file}): {m.why}" + (" [no tests ran]" if r == "no tests" else ""))
    if inapplicable:
        print(f"not applicable: {len(inapplicable)}")
    print(f"killed {len(killed)} of {len(applied)} mutants")
    ok = applied and len(killed) >= min_score * len(applied) and not inapplicable
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
