"""The reference cache: compare's torch reference outputs kept on disk between runs, so that a
compare whose model file and reference options did not change neither recomputes the
reference nor imports torch (docs/cache.md).

Where: $XVALID_CACHE_DIR, else $XDG_CACHE_HOME/xvalid, else ~/.cache/xvalid; the entries live
in its reference/ folder. An entry is two files named by the key's hash:

    KEY.npz   the arrays (np.savez, no pickled objects), read with allow_pickle=False
    KEY.json  the manifest: the key's fields, the arrays' names, dtypes and shapes, the sha256
              of KEY.npz, and small JSON results beside the arrays (the caller's `meta`)

The key covers everything the stored outputs depend on: the sha256 of the model file's bytes,
the caller's options, the xvalid, torch and numpy versions, a digest of xvalid's Python
modules and this cache's format (reference_key). Each file is written to a temporary name and
renamed into place, the manifest last: a reader sees a whole entry or none. An entry whose manifest is
unreadable, whose key differs, whose arrays are short or do not match their checksum is
"damaged" or "stale": the caller recomputes and overwrites it, and says so.

The total size is capped (XVALID_CACHE_MAX_MB, default 2048 MiB); after each write the entries
used longest ago go first (a hit touches its manifest). Reading the file's digest costs one
sha256 pass over it (about 1.3 GB/s here), skipped when its (device, inode, size, mtime,
ctime) equal those recorded with the digest in digests.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, cut

CACHE_FORMAT = 1
MANIFEST_FORMAT = "xvalid-reference-cache"
DIR_VARIABLE = "XVALID_CACHE_DIR"
CAP_VARIABLE = "XVALID_CACHE_MAX_MB"
DEFAULT_CAP_MB = 2048
MIB = 1024 * 1024
DIGEST_INDEX = "digests.json"
DIGEST_INDEX_LIMIT = 512   # files remembered in digests.json; the least recent are dropped
ENTRY_SUFFIXES = (".npz", ".json")


def cache_dir() -> Path:
    """$XVALID_CACHE_DIR, else $XDG_CACHE_HOME/xvalid, else ~/.cache/xvalid."""
    given = os.environ.get(DIR_VARIABLE)
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "xvalid"


def cap_bytes() -> tuple[int, str]:
    """The size cap in bytes and where it came from; ConfigError for a bad variable."""
    text = os.environ.get(CAP_VARIABLE, "")
    if not text:
        return DEFAULT_CAP_MB * MIB, "default"
    if not (len(text) <= 12 and text.isascii() and text.isdigit()):
        raise ConfigError(f"{CAP_VARIABLE}: expected a whole number of MiB (0 turns the "
                          f"cache's writes off), found '{cut(text)}'")
    return int(text) * MIB, CAP_VARIABLE


# ---------------------------------------------------------------------------------------------
# the key


def torch_version() -> str | None:
    """torch.__version__ without importing torch (a second or more): read from the installed
    package's version.py (a few ms; importlib.metadata takes about 45 ms), else from its
    metadata; None when torch is not installed."""
    import importlib.util
    import re
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        try:
            text = (Path(location) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _source_digest() -> str:
    """A digest of xvalid's own Python modules (the reference, the file reader, compare): in a
    checkout between releases, an edit to any of them is a new reference. About 2 ms; a C++
    edit leaves it unchanged."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def default_threads_fingerprint() -> dict:
    """What torch's default thread count follows (its OpenMP/MKL variables and the CPUs this
    process may use): the same fingerprint, the same default, so a key can name the default
    without importing torch to ask for it."""
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else None}


def reference_key(model_digest: str, options: dict) -> dict:
    """The key's fields: the model file's sha256, the caller's options (JSON values), and what
    else decides the outputs."""
    key = {"cache_format": CACHE_FORMAT, "model_sha256": model_digest, "options": options,
           "xvalid": __version__, "reference_source": _source_digest(),
           "torch": torch_version(), "numpy": np.__version__}
    return json.loads(json.dumps(key))  # as the manifest will hold it: tuples become lists


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the model file's digest


def _stat_signature(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def stat_signature(path: Path) -> list[int] | None:
    """What changes when a file is written or replaced: (device, inode, size, mtime, ctime);
    None when it cannot be read."""
    try:
        return _stat_signature(Path(path).stat())
    except OSError:
        return None


def _hash_file(path: Path) -> str:
    with open(path, "rb") as fp:
        return _hash_stream(fp)


def _hash_stream(fp) -> str:
    """sha256 of what is left in a binary file object, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    while chunk := fp.read(4 * MIB):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# entries


@dataclass
class Entry:
    arrays: dict[str, np.ndarray]
    meta: dict          # the caller's JSON results stored beside the arrays
    key_hash: str


@dataclass
class Lookup:
    """A lookup's outcome: the entry on a hit; status "hit", "miss", "damaged" or "stale"
    (the last two: an entry existed and was not trusted, `reason` says why)."""

    status: str
    entry: Entry | None = None
    reason: str | None = None


@dataclass
class EntryFile:
    """One entry on disk, for eviction and `xvalid cache info`."""

    key_hash: str
    bytes: int
    last_used: float    # the manifest's mtime: written, or touched on a hit


class EntryDamaged(Exception):
    """An entry that cannot be trusted; the message says why."""


class ReferenceCache:
    """The cache at `directory` (cache_dir()) with a cap in bytes (cap_bytes())."""

    def __init__(self, directory: Path | None = None, cap: int | None = None):
        self.root = cache_dir() if directory is None else Path(directory)
        self.entries_dir = self.root / "reference"
        self.cap = cap_bytes()[0] if cap is None else cap

    # --- the model file's digest ---------------------------------------------------------

    def file_digest(self, path: Path) -> str:
        """sha256 of the file's bytes; recorded with the file's stat signature, and taken
        from that record while the signature is unchanged."""
        path = Path(path).resolve()
        before = _stat_signature(path.stat())
        index = self._read_index()
        recorded = index.get(str(path))
        if isinstance(recorded, dict) and recorded.get("stat") == before:
            digest = recorded.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest
        digest = _hash_file(path)
        if _stat_signature(path.stat()) == before:  # not written to while hashed
            index.pop(str(path), None)
            index[str(path)] = {"stat": before, "sha256": digest}
            while len(index) > DIGEST_INDEX_LIMIT:
                index.pop(next(iter(index)))
            self._write_quietly(self.root / DIGEST_INDEX,
                                json.dumps(index, indent=0).encode())
        return digest

    def _read_index(self) -> dict:
        try:
            index = json.loads((self.root / DIGEST_INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    # --- lookup --------------------------------------------------------------------------

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.entries_dir / f"{name}.npz", self.entries_dir / f"{name}.json"

    def load(self, key: dict) -> Lookup:
        """The entry of `key`, verified: hit, or miss (none), or damaged / stale (not used)."""
        name = key_hash(key)
        npz, manifest_path = self.paths(name)
        if not manifest_path.exists() and not npz.exists():
            return Lookup("miss")
        try:
            manifest = self._read_manifest(manifest_path)
            if manifest.get("key") != key:
                return Lookup("stale", reason="its key differs from this run's")
            arrays = self._read_arrays(npz, manifest)
        except EntryDamaged as exc:
            return Lookup("damaged", reason=str(exc))
        try:
            os.utime(manifest_path)  # last use, for the eviction order
        except OSError:
            pass
        return Lookup("hit", Entry(arrays, manifest["meta"], name))

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EntryDamaged("its manifest is missing") from None
        except (OSError, ValueError) as exc:
            raise EntryDamaged(f"its manifest is unreadable ({cut(str(exc))})") from None
        if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
                or not isinstance(manifest.get("arrays"), dict)
                or not isinstance(manifest.get("meta"), dict)
                or not isinstance(manifest.get("npz_sha256"), str)):
            raise EntryDamaged("its manifest is not a cache manifest")
        return manifest

    @staticmethod
    def _read_arrays(path: Path, manifest: dict) -> dict[str, np.ndarray]:
        """The arrays, hashed and then read through one open file (a file renamed over this
        one meanwhile cannot be hashed in part and read in part)."""
        import zipfile
        try:
            with open(path, "rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                if size != manifest.get("npz_bytes"):
                    raise EntryDamaged(f"its arrays file has {size} bytes, the manifest says "
                                       f"{manifest.get('npz_bytes')}")
                if _hash_stream(fp) != manifest["npz_sha256"]:
                    raise EntryDamaged("its arrays do not match their checksum")
                fp.seek(0)
                with np.load(fp, allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise EntryDamaged(f"its arrays are unreadable ({cut(reason)})") from None
        described = {name: {"dtype": str(a.dtype), "shape": list(a.shape)}
                     for name, a in arrays.items()}
        if described != manifest["arrays"]:
            raise EntryDamaged("its arrays differ from the manifest's list")
        return arrays

    # --- store and evict -----------------------------------------------------------------

    def store(self, key: dict, arrays: dict[str, np.ndarray], meta: dict) -> str | None:
        """Write the entry of `key` (replacing any), then evict down to the cap. Returns None
        when stored, else why not (too large for the cap, or the directory not writable): the
        cache only saves time, so a failed write is reported, not an error."""
        name = key_hash(key)
        npz, manifest_path = self.paths(name)
        nbytes = sum(a.nbytes for a in arrays.values())
        if nbytes > self.cap:  # before writing anything
            return self._too_large(nbytes)
        tmp = None
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{npz.name}.", suffix=".tmp",
                                       dir=self.entries_dir)
            with os.fdopen(fd, "w+b") as fp:
                np.savez(fp, **{k: np.ascontiguousarray(a) for k, a in arrays.items()})
                size = fp.tell()
                fp.seek(0)
                digest = _hash_stream(fp)
            manifest = {"format": MANIFEST_FORMAT, "key": key,
                        "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape)}
                                   for k, a in arrays.items()},
                        "npz_bytes": size, "npz_sha256": digest,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta}
            text = json.dumps(manifest, indent=1).encode()
            if size + len(text) > self.cap:
                return self._too_large(size + len(text))
            os.replace(tmp, npz)
            tmp = None
            _atomic_write_bytes(manifest_path, text)  # last: the entry is whole from here on
        except OSError as exc:
            return f"cannot write in {self.entries_dir} ({exc.strerror or exc})"
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self.evict(keep=name)
        return None

    def _too_large(self, nbytes: int) -> str:
        return (f"the entry ({nbytes / MIB:.1f} MiB) is larger than the cache's cap "
                f"({self.cap / MIB:.0f} MiB, {CAP_VARIABLE})")

    def list_entries(self) -> list[EntryFile]:
        """Every entry (a manifest and its arrays, or either alone), oldest use first."""
        sizes: dict[str, int] = {}
        used: dict[str, float] = {}
        try:
            files = list(self.entries_dir.iterdir())
        except OSError:
            return []
        for path in files:
            if path.suffix not in ENTRY_SUFFIXES or not _is_entry_name(path.stem):
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            sizes[path.stem] = sizes.get(path.stem, 0) + st.st_size
            if path.suffix == ".json" or path.stem not in used:
                used[path.stem] = st.st_mtime
        return sorted((EntryFile(name, sizes[name], used[name]) for name in sizes),
                      key=lambda e: (e.last_used, e.key_hash))

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used entries (never `keep`) until the total fits the cap;
        returns the removed names."""
        entries = self.list_entries()
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= self.cap:
                break
            if entry.key_hash == keep:
                continue
            self._remove(entry.key_hash)
            total -= entry.bytes
            removed.append(entry.key_hash)
        return removed

    def clear(self) -> tuple[int, int]:
        """Remove every entry and the digest index (nothing else in the directory): (entries
        removed, bytes freed)."""
        entries = self.list_entries()
        for entry in entries:
            self._remove(entry.key_hash)
        for stray in self._temporary_files():
            stray.unlink(missing_ok=True)
        (self.root / DIGEST_INDEX).unlink(missing_ok=True)
        return len(entries), sum(e.bytes for e in entries)

    def _remove(self, name: str) -> None:
        for path in self.paths(name):  # the arrays, then the manifest
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def _temporary_files(self) -> list[Path]:
        try:
            return [p for p in self.entries_dir.iterdir()
                    if p.name.startswith(".") and p.name.endswith(".tmp")]
        except OSError:
            return []

    def _write_quietly(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(path, data)
        except OSError:
            pass  # the digest index only saves a hash pass


def _is_entry_name(stem: str) -> bool:
    return len(stem) == 64 and all(ch in "0123456789abcdef" for ch in stem)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """A temporary file beside `path`, then a rename: readers see the old file or the new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
