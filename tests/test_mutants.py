"""The validator's mutation check (scripts/mutation_check.py) stays applicable: every planted
defect of python/xvalid/mutants.toml still matches the source exactly once, and its tests
exist. The check itself is too slow for CI; its result is in the note that closed issue 12."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("mutation_check",
                                                  REPO / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_exactly_once(mc):
    mutants = mc.load_mutants()
    assert len(mutants) >= 45
    for m in mutants:
        assert m.occurrences() == 1, (
            f"mutant {m.name}: its snippet occurs {m.occurrences()} times in python/xvalid/"
            f"{m.file}, not once; update python/xvalid/mutants.toml:\n{m.old}")


def test_every_mutant_names_tests_that_exist(mc):
    for m in mc.load_mutants():
        paths = [arg.split("::")[0] for arg in m.tests if arg.startswith("tests/")]
        assert paths, f"mutant {m.name}: no test file"
        for path in paths:
            assert (REPO / path).is_file(), f"mutant {m.name}: no {path}"


def test_the_defects_of_issue_12_are_all_there(mc):
    assert len([m for m in mc.load_mutants() if m.issue == 12]) == 11


def test_a_planted_mutant_is_restored_whatever_happens(mc, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "PACKAGE", tmp_path / "pkg")
    monkeypatch.setattr(mc, "BACKUP", tmp_path / "backup")
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "mod.py"
    source.write_text("x = 1\ny = 2\n")
    m = mc.Mutant("m", "mod.py", "y = 2", "y = 3", "why", ["tests/x.py"])
    with pytest.raises(KeyboardInterrupt):
        with mc.Planted(m):
            assert source.read_text() == "x = 1\ny = 3\n"
            assert (tmp_path / "backup" / "mod.py").read_text() == "x = 1\ny = 2\n"
            raise KeyboardInterrupt
    assert source.read_text() == "x = 1\ny = 2\n" and not list((tmp_path / "backup").iterdir())
    # A run killed hard leaves its backup: the next run puts it back first.
    (tmp_path / "backup" / "mod.py").write_text("x = 1\ny = 2\n")
    source.write_text("x = 1\ny = 3\n")
    mc.restore_leftovers()
    assert source.read_text() == "x = 1\ny = 2\n" and not list((tmp_path / "backup").iterdir())


def test_a_stale_snippet_is_not_applicable_not_killed(mc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mc, "PACKAGE", tmp_path)
    (tmp_path / "mod.py").write_text("a = 1\na = 1\n")
    gone = mc.Mutant("gone", "mod.py", "b = 2", "b = 3", "why", ["tests/x.py"])
    twice = mc.Mutant("twice", "mod.py", "a = 1", "a = 2", "why", ["tests/x.py"])
    results = [mc.check(gone, 1, 2, 10), mc.check(twice, 2, 2, 10)]
    assert results == ["not applicable: snippet not found in mod.py",
                       "not applicable: snippet occurs 2 times in mod.py"]
    assert mc.summary([gone, twice], results, 1.0, 0.9) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "killed 0 of 0 mutants"


def test_malformed_mutant_lists_are_refused(mc, tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('[[mutant]]\nname = "a"\nfile = "metrics.py"\nold = "x"\nnew = "y"\n'
                   'why = "w"\ntests = "nosuchsuite"\n')
    with pytest.raises(ValueError, match="no suite named 'nosuchsuite'"):
        mc.load_mutants(bad)
    bad.write_text('[[mutant]]\nname = "a"\nfile = "metrics.py"\nold = "x"\n')
    with pytest.raises(ValueError, match="missing new, tests, why"):
        mc.load_mutants(bad)
