"""The reference cache (docs/cache.md): a hit skips the reference (and torch), a changed file or
option misses, a damaged or stale entry is recomputed and said so, the cap evicts the least
recently used entries, --no-cache writes nothing, and cached and uncached reports agree.

Every test runs with XVALID_CACHE_DIR set to an empty directory of its own (conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import generate_flags, run_xvalid
from xvalid import compare, refcache
from xvalid.refcache import ReferenceCache


@pytest.fixture
def counted_reference(monkeypatch):
    """How many times compare computed the reference (the torch forwards) in this process."""
    calls = []
    real = compare.compute_reference

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "compute_reference", counting)
    return calls


def report_of(cli, tmp_path, model, *args, name="report.json"):
    """`xvalid compare MODEL ARGS --json` in-process: (CliResult, report)."""
    out = tmp_path / name
    result = cli("compare", model, "--repeat", 1, "--warmup", 0, "--json", out, *args)
    assert result.code == 0, result.out + result.err
    return result, json.loads(out.read_text())


def entry_files(cache_dir: Path) -> list[Path]:
    directory = cache_dir / "reference"
    return sorted(directory.iterdir()) if directory.exists() else []


def only_entry(cache_dir: Path) -> tuple[Path, Path]:
    """The one entry's (npz, manifest)."""
    files = entry_files(cache_dir)
    assert [f.suffix for f in files] == [".json", ".npz"], files
    return files[1], files[0]


def judged(report: dict) -> list[dict]:
    """What a report says about each candidate, without what is measured anew (timing, load)."""
    return [{k: v for k, v in c.items() if k not in ("timing", "load_ms")}
            for c in report["candidates"]]


# ---- hits -----------------------------------------------------------------------------------


def test_second_compare_takes_the_reference_from_the_cache(cli, tmp_path, tiny_model,
                                                           counted_reference):
    _, first = report_of(cli, tmp_path, tiny_model, "--backends", "torch,cpp", name="1.json")
    assert len(counted_reference) == 1
    assert first["reference_cache"]["source"] == "computed"
    assert first["reference_cache"]["lookup"] == "miss" and first["reference_cache"]["stored"]
    result, second = report_of(cli, tmp_path, tiny_model, "--backends", "torch,cpp",
                               name="2.json")
    assert len(counted_reference) == 1, "the reference was computed again"
    cache = second["reference_cache"]
    assert cache["source"] == "cache" and cache["lookup"] == "hit"
    assert cache["entry"] == first["reference_cache"]["entry"]
    assert "reference: from the reference cache" in result.out
    torch_row = second["candidates"][0]
    assert torch_row["timing"]["cached"] is True and "cached" in result.out
    assert "cached" not in second["candidates"][1]["timing"]  # cpp was timed now
    assert second["versions"]["backends"]["torch"] == first["versions"]["backends"]["torch"]


@pytest.mark.parametrize("backends", ["torch,cpp", "cpp"])
def test_a_cached_compare_does_not_import_torch(tiny_model, tmp_path, backends):
    """A user's compare in a fresh process: the second one neither imports torch nor computes."""
    script = ("import sys\nfrom xvalid.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit as exc:\n    code = exc.code\n"
              "print('torch imported:', 'torch' in sys.modules, 'exit:', code, file=sys.stderr)")
    outputs = []
    for run in range(2):
        report = tmp_path / f"{run}.json"
        proc = subprocess.run([sys.executable, "-c", script, "compare", str(tiny_model),
                               "--backends", backends, "-q", "--json", str(report)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append((proc.stderr.strip().splitlines()[-1], json.loads(report.read_text())))
    assert outputs[0][0] == "torch imported: True exit: 0"
    assert outputs[1][0] == "torch imported: False exit: 0", outputs[1]
    assert outputs[1][1]["reference_cache"]["source"] == "cache"
    assert outputs[1][1]["versions"]["torch"] == outputs[0][1]["versions"]["torch"]


def test_cached_and_uncached_reports_agree(cli, tmp_path, bug_model):
    """Metrics, budgets, divergence and decode drift are the same whether the reference was
    computed (with and without the cache) or read back."""
    args = ("--backends", "torch,cpp,cpp-clear", "--decode", 3)
    _, uncached = report_of(cli, tmp_path, bug_model, *args, "--no-cache", name="off.json")
    _, stored = report_of(cli, tmp_path, bug_model, *args, name="stored.json")
    _, cached = report_of(cli, tmp_path, bug_model, *args, name="cached.json")
    assert [r["reference_cache"]["source"] for r in (uncached, stored, cached)] == \
        ["computed", "computed", "cache"]
    assert uncached["tolerance"] == stored["tolerance"] == cached["tolerance"]
    assert judged(uncached) == judged(stored) == judged(cached)
    assert all("divergence" in c and "decode" in c for c in cached["candidates"][1:])
    assert cached["threads"] == uncached["threads"]


def test_a_half_precision_reference_comes_back_whole_from_the_cache(cli, tmp_path, bug_model):
    """--dtype bfloat16 keeps PyTorch's bfloat16 run (the budget's source, the torch row) and
    its intermediates with the entry: the cached report is the computed one."""
    args = ("--backends", "torch,cpp", "--dtype", "bfloat16", "--decode", 2)
    _, stored = report_of(cli, tmp_path, bug_model, *args, name="stored.json")
    _, cached = report_of(cli, tmp_path, bug_model, *args, name="cached.json")
    assert [r["reference_cache"]["source"] for r in (stored, cached)] == ["computed", "cache"]
    assert stored["tolerance"] == cached["tolerance"]
    assert cached["tolerance"]["dtype"] == "bfloat16" and cached["tolerance"]["rmse_max"] > 0
    assert judged(stored) == judged(cached)
    assert cached["candidates"][0]["compute_dtype"]["actual"] == "bfloat16"


def test_saved_reference_logits_are_the_same_from_the_cache(cli, tmp_path, tiny_model):
    for run in ("computed", "cached"):
        report_of(cli, tmp_path, tiny_model, "--backends", "torch", "--save-logits",
                  tmp_path / run)
    for name in ("reference", "reference-float64", "torch"):
        computed, cached = (np.load(tmp_path / run / f"{name}.npy") for run in ("computed", "cached"))
        assert computed.dtype == cached.dtype and np.array_equal(computed, cached), name


# ---- misses ---------------------------------------------------------------------------------


def test_a_file_rewritten_in_place_misses(cli, tmp_path, counted_reference):
    model = tmp_path / "m.json"
    run_xvalid("generate", *generate_flags(seed=1), "-o", model, check=True)
    _, before = report_of(cli, tmp_path, model, "--backends", "torch", name="1.json")
    run_xvalid("generate", *generate_flags(seed=2), "-o", model, check=True)  # same path
    _, after = report_of(cli, tmp_path, model, "--backends", "torch", name="2.json")
    assert len(counted_reference) == 2
    assert after["reference_cache"]["lookup"] == "miss"
    assert after["reference_cache"]["entry"] != before["reference_cache"]["entry"]
    _, fresh = report_of(cli, tmp_path, model, "--backends", "torch", "--no-cache",
                         name="3.json")
    assert judged(after) == judged(fresh) != judged(before)


def test_a_file_rewritten_while_compare_reads_it_is_not_cached(cli, tmp_path, make_model,
                                                                 monkeypatch,
                                                                 fresh_reference_cache):
    """The reference is computed from the bytes read; were the file replaced before its digest
    is taken, the entry would file the old reference under the new bytes: nothing is stored."""
    model, other = make_model(seed=1), make_model(seed=2)
    real_prepare = compare.prepare

    def prepare_then_replace(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        model.write_bytes(other.read_bytes())
        return prepared

    monkeypatch.setattr(compare, "prepare", prepare_then_replace)
    _, report = report_of(cli, tmp_path, model, "--backends", "torch", name="1.json")
    assert report["reference_cache"]["lookup"] == "off" and not report["reference_cache"]["stored"]
    assert "changed while compare read it" in report["reference_cache"]["reason"]
    assert entry_files(fresh_reference_cache) == []
    monkeypatch.setattr(compare, "prepare", real_prepare)
    _, after = report_of(cli, tmp_path, model, "--backends", "torch", name="2.json")
    _, expected = report_of(cli, tmp_path, other, "--backends", "torch", name="3.json")
    assert after["reference_cache"]["lookup"] == "miss"
    assert expected["reference_cache"]["lookup"] == "hit"  # same bytes as the rewritten file
    assert judged(after) == judged(expected)


def test_the_digest_follows_the_bytes_not_the_timestamps(tmp_path):
    """Same size, the old mtime put back: the recorded digest is not reused (the inode's change
    time moved), and a copy elsewhere with the same bytes has the same digest."""
    cache = ReferenceCache(tmp_path / "cache")
    model = tmp_path / "m.bin"
    model.write_bytes(b"a" * 1000)
    first = cache.file_digest(model)
    st = model.stat()
    time.sleep(0.01)
    model.write_bytes(b"b" * 1000)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.file_digest(model) != first
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"b" * 1000)
    assert cache.file_digest(copy) == cache.file_digest(model)
    recorded = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert set(recorded) == {str(model.resolve()), str(copy.resolve())}


@pytest.mark.parametrize("changed, hits", [
    (("--no-intermediates",), False),
    (("--decode", 2), False),
    (("--threads", 1), False),
    (("--repeat", 2), False),             # the torch row's timing is stored with the reference
    (("--backends", "cpp"), False),       # no torch row
    (("--dtype", "bfloat16"), False),     # another compute dtype: PyTorch's half run and budget
    (("--atol", 1e-3), True),             # the verdict's options do not touch the reference
    (("--rtol", 1e-3), True),
])
def test_an_option_that_changes_the_reference_misses(cli, tmp_path, tiny_model,
                                                      counted_reference, changed, hits):
    base = ("--backends", "torch", "--threads", 2)
    report_of(cli, tmp_path, tiny_model, *base, name="1.json")
    args = list(base)
    if changed[0] in args:
        args[args.index(changed[0]) + 1] = changed[1]
        changed = ()
    _, report = report_of(cli, tmp_path, tiny_model, *args, *changed, name="2.json")
    assert report["reference_cache"]["lookup"] == ("hit" if hits else "miss")
    assert len(counted_reference) == (1 if hits else 2)


def test_default_threads_are_keyed_by_what_decides_them(tiny_model, tmp_path):
    """No --threads: torch's default, which OMP_NUM_THREADS changes; a cached run at one
    setting never answers for another, and reports the thread count it ran at."""
    reports = []
    for run, omp in enumerate(["1", "2", "1"]):
        out = tmp_path / f"{run}.json"
        env = dict(os.environ, OMP_NUM_THREADS=omp)
        proc = subprocess.run([sys.executable, "-m", "xvalid", "compare", str(tiny_model),
                               "--backends", "torch", "-q", "--json", str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(out.read_text()))
    assert [r["reference_cache"]["lookup"] for r in reports] == ["miss", "miss", "hit"]
    assert [r["threads"] for r in reports] == [1, 2, 1]


def test_every_compare_option_is_classified_for_the_key():
    """A new CompareOptions field must be put in REFERENCE_OPTIONS (it changes the reference
    step's outputs: then in reference_options too) or in NON_REFERENCE_OPTIONS."""
    fields = {f.name for f in dataclasses.fields(compare.CompareOptions)}
    assert fields == set(compare.REFERENCE_OPTIONS) | set(compare.NON_REFERENCE_OPTIONS)
    assert not set(compare.REFERENCE_OPTIONS) & set(compare.NON_REFERENCE_OPTIONS)
    base = compare.CompareOptions(threads=2)
    for name, other in [("backends", ("cpp",)), ("intermediates", False), ("decode", 2),
                        ("threads", 3), ("warmup", 4), ("repeat", 7)]:
        changed = dataclasses.replace(base, **{name: other})
        assert compare.reference_options(changed) != compare.reference_options(base), name


def test_the_key_names_versions_and_the_reference_code(tmp_path):
    key = refcache.reference_key("0" * 64, {"x": 1})
    import torch
    assert key["torch"] == torch.__version__ and key["xvalid"] and key["reference_source"]
    assert refcache.reference_key("0" * 64, {"x": 2}) != key
    assert refcache.reference_key("1" * 64, {"x": 1}) != key


# ---- damaged and stale entries --------------------------------------------------------------


def truncate(npz: Path, manifest: Path) -> None:
    npz.write_bytes(npz.read_bytes()[:-100])


def flip_a_byte(npz: Path, manifest: Path) -> None:
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x40
    npz.write_bytes(bytes(data))


def garbage_manifest(npz: Path, manifest: Path) -> None:
    manifest.write_text('{"format": "xvalid-reference-cache", "key": ')


def manifest_gone(npz: Path, manifest: Path) -> None:
    manifest.unlink()


def arrays_gone(npz: Path, manifest: Path) -> None:
    npz.unlink()


def other_key(npz: Path, manifest: Path) -> None:
    """A whole, consistent entry whose key is not this run's (a file copied over, say)."""
    doc = json.loads(manifest.read_text())
    doc["key"]["options"]["intermediates"] = False
    manifest.write_text(json.dumps(doc))


def consistent_lie(npz: Path, manifest: Path) -> None:
    """Arrays replaced and the checksum updated to match: the contents must still fit."""
    import hashlib
    import io
    with np.load(npz) as arrays:
        data = {name: arrays[name] for name in arrays.files}
    data["logits"] = data["logits"][:, :-1]
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    npz.write_bytes(buffer.getvalue())
    doc = json.loads(manifest.read_text())
    doc["npz_bytes"] = len(buffer.getvalue())
    doc["npz_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    doc["arrays"]["logits"]["shape"] = list(data["logits"].shape)
    manifest.write_text(json.dumps(doc))


def pickled_object(npz: Path, manifest: Path) -> None:
    """An entry holding a pickled object array with a matching checksum: never unpickled."""
    import hashlib
    import io
    buffer = io.BytesIO()
    np.savez(buffer, logits=np.array([{"boom": 1}], dtype=object))
    npz.write_bytes(buffer.getvalue())
    doc = json.loads(manifest.read_text())
    doc.update(npz_bytes=len(buffer.getvalue()),
               npz_sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    manifest.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage, lookup, says", [
    (truncate, "damaged", "the manifest says"),
    (flip_a_byte, "damaged", "do not match their checksum"),
    (garbage_manifest, "damaged", "manifest is unreadable"),
    (manifest_gone, "damaged", "manifest is missing"),
    (arrays_gone, "damaged", "arrays are unreadable"),
    (other_key, "stale", "key differs"),
    (consistent_lie, "damaged", "do not fit"),
    (pickled_object, "damaged", "arrays"),
])
def test_a_damaged_or_stale_entry_is_recomputed_and_said(cli, tmp_path, tiny_model,
                                                         fresh_reference_cache, damage, lookup,
                                                         says):
    _, good = report_of(cli, tmp_path, tiny_model, "--backends", "torch", name="good.json")
    damage(*only_entry(fresh_reference_cache))
    result, again = report_of(cli, tmp_path, tiny_model, "--backends", "torch", "-q",
                              name="again.json")
    cache = again["reference_cache"]
    assert cache["source"] == "computed" and cache["lookup"] == lookup and cache["stored"]
    assert says in cache["reason"]
    warning = [line for line in result.err.splitlines() if "cached reference" in line]
    assert len(warning) == 1 and f"was {lookup}" in warning[0] and says in warning[0]
    assert "recomputed and replaced" in warning[0]
    assert judged(again) == judged(good)
    # replaced: the next run is a hit again, silently
    result, third = report_of(cli, tmp_path, tiny_model, "--backends", "torch", "-q",
                              name="third.json")
    assert third["reference_cache"]["lookup"] == "hit" and "cache" not in result.err


def test_a_damaged_entry_is_named_in_the_full_text_report(cli, tmp_path, tiny_model,
                                                          fresh_reference_cache):
    report_of(cli, tmp_path, tiny_model, "--backends", "torch")
    flip_a_byte(*only_entry(fresh_reference_cache))
    result = cli("compare", tiny_model, "--backends", "torch", "--repeat", 1, "--warmup", 0)
    assert result.code == 0, result.err
    assert "reference: recomputed (the cached entry was damaged: its arrays do not match" \
        in result.out
    assert result.err.count("cached reference was damaged") == 1


# ---- size cap and eviction --------------------------------------------------------------------


def entry_arrays(seed: int, nbytes: int = 100_000) -> dict[str, np.ndarray]:
    return {"logits": np.random.default_rng(seed).standard_normal(nbytes // 8)}


def test_the_least_recently_used_entries_are_evicted_first(tmp_path):
    cache = ReferenceCache(tmp_path, cap=350_000)  # room for three entries of ~100 kB
    keys = [{"n": n} for n in range(5)]
    for n in range(3):
        assert cache.store(keys[n], entry_arrays(n), {}) is None
        time.sleep(0.02)  # file times are coarser than a loop iteration
    assert cache.load(keys[0]).status == "hit"  # used last now
    time.sleep(0.02)
    assert cache.store(keys[3], entry_arrays(3), {}) is None
    assert [cache.load(k).status for k in keys[:4]] == ["hit", "miss", "hit", "hit"]
    time.sleep(0.02)
    assert cache.store(keys[4], entry_arrays(4), {}) is None  # keys[0] was used before 2 and 3
    statuses = [cache.load(k).status for k in keys]
    assert statuses.count("hit") == 3 and statuses[4] == "hit"
    assert sum(e.bytes for e in cache.list_entries()) <= cache.cap


def test_an_entry_larger_than_the_cap_is_not_stored(tmp_path):
    cache = ReferenceCache(tmp_path, cap=50_000)
    reason = cache.store({"n": 1}, entry_arrays(1), {})
    assert reason is not None and "larger than the cache's cap" in reason
    assert cache.list_entries() == []


def test_the_cap_applies_to_compare(cli, tmp_path, make_model, monkeypatch,
                                    fresh_reference_cache):
    """XVALID_CACHE_MAX_MB=1: after each compare the cache holds at most 1 MiB, the newest
    entry kept, the oldest gone."""
    monkeypatch.setenv("XVALID_CACHE_MAX_MB", "1")
    models = [make_model(seed=seed) for seed in range(4)]  # entries of about 0.3 MiB
    entries = []
    for n, model in enumerate(models):
        _, report = report_of(cli, tmp_path, model, "--backends", "torch", name=f"{n}.json")
        assert report["reference_cache"]["stored"], report["reference_cache"]
        entries.append(report["reference_cache"]["entry"])
        time.sleep(0.02)
        total = sum(f.stat().st_size for f in entry_files(fresh_reference_cache))
        assert total <= 1024 * 1024
    kept = {f.stem for f in entry_files(fresh_reference_cache)}
    assert entries[-1] in kept and entries[0] not in kept and 1 < len(kept) < 4


def test_a_zero_cap_stores_nothing_and_says_so(cli, tmp_path, tiny_model, monkeypatch,
                                               fresh_reference_cache):
    monkeypatch.setenv("XVALID_CACHE_MAX_MB", "0")
    result, report = report_of(cli, tmp_path, tiny_model, "--backends", "torch")
    assert report["reference_cache"]["stored"] is False
    assert "larger than the cache's cap" in report["reference_cache"]["not_stored"]
    assert result.err.count("the reference was not cached") == 1
    assert entry_files(fresh_reference_cache) == []


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", "99999999999999"])
def test_a_bad_cap_variable_is_one_line(cli, tiny_model, monkeypatch, value):
    monkeypatch.setenv("XVALID_CACHE_MAX_MB", value)
    cli("compare", tiny_model, "--backends", "torch").assert_one_line_error(
        2, "XVALID_CACHE_MAX_MB", "whole number of MiB")
    cli("cache", "info").assert_one_line_error(2, "XVALID_CACHE_MAX_MB")


def test_an_unwritable_cache_is_a_warning_not_a_failure(cli, tmp_path, tiny_model, monkeypatch):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("XVALID_CACHE_DIR", str(blocked))
    result, report = report_of(cli, tmp_path, tiny_model, "--backends", "torch", "-q")
    assert report["verdict"] == "pass" and report["reference_cache"]["stored"] is False
    assert "cannot write" in report["reference_cache"]["not_stored"]
    assert result.err.count("the reference was not cached") == 1


# ---- --no-cache, cache info and clear -----------------------------------------------------------


def test_no_cache_reads_and_writes_nothing(cli, tmp_path, tiny_model, fresh_reference_cache,
                                           counted_reference):
    report_of(cli, tmp_path, tiny_model, "--backends", "torch", "--no-cache", name="1.json")
    assert not fresh_reference_cache.exists() or list(fresh_reference_cache.iterdir()) == []
    report_of(cli, tmp_path, tiny_model, "--backends", "torch", name="2.json")  # stores
    result, report = report_of(cli, tmp_path, tiny_model, "--backends", "torch", "--no-cache",
                               name="3.json")
    assert len(counted_reference) == 3
    assert report["reference_cache"] == {"source": "computed", "lookup": "off",
                                         "reason": "--no-cache", "stored": False,
                                         "not_stored": None, "entry": None, "dir": None}
    assert "reference: computed; the cache is off (--no-cache)" in \
        cli("compare", tiny_model, "--backends", "torch", "--no-cache").out


def test_cache_info_and_clear(cli, tmp_path, tiny_model, fresh_reference_cache, monkeypatch):
    info = cli("cache", "info")
    assert info.code == 0
    assert f"directory  {fresh_reference_cache}" in info.out and "entries    0" in info.out
    assert "cap        2048 MiB (default)" in info.out
    for decode in (0, 1):
        report_of(cli, tmp_path, tiny_model, "--backends", "torch", "--decode", decode)
    files = entry_files(fresh_reference_cache)
    total = sum(f.stat().st_size for f in files)
    mine = fresh_reference_cache / "notes.txt"  # not the cache's: kept
    mine.write_text("mine")
    monkeypatch.setenv("XVALID_CACHE_MAX_MB", "64")
    info = cli("cache", "info")
    assert "entries    2" in info.out and f"({total} bytes)" in info.out
    assert "cap        64 MiB (XVALID_CACHE_MAX_MB)" in info.out
    cleared = cli("cache", "clear")
    assert cleared.code == 0
    assert cleared.out.startswith(f"removed 2 entries ({total / 2**20:.1f} MiB) from ")
    assert entry_files(fresh_reference_cache) == [] and mine.read_text() == "mine"
    assert not (fresh_reference_cache / "digests.json").exists()
    assert "entries    0" in cli("cache", "info").out


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XVALID_CACHE_DIR", str(tmp_path / "mine"))
    assert refcache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("XVALID_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert refcache.cache_dir() == tmp_path / "xdg" / "xvalid"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored (XDG spec)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert refcache.cache_dir() == tmp_path / "home" / ".cache" / "xvalid"
