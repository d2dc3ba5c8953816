"""Annotation files parsed once into arrays on disk and memory-mapped when read: the label cache.

FreiHAND's annotation json (training_verts.json is 1.7 GB in the release) takes about a minute and
several GB to parse, and RHD's pickles a few seconds; train, val, eval.py and every DDP rank would each
parse them at every start. `cached_arrays` parses a file once into one .npy per array, and every later
reader (the other splits, eval.py's baseline, the template, every rank, every loader worker) maps those
files read-only (`np.load(mmap_mode="r")`): the page cache holds one copy for all of them. The arrays are
the parser's output saved as they are, so they are bit for bit what a fresh parse gives.

Where: `<data root>/.cliphand3d_cache/labels/` (beside the mesh template's cache). When that folder cannot
be written (a read-only dataset), `<cache_dir>/labels/<root name>-<hash of the root's path>/`, cache_dir =
the dataset's `cache_dir` argument, else $CLIPHAND3D_CACHE, else `data/cache` (as model_template.cache_dir).
A valid cache found in either place is used, wherever it is.

Staleness: a small sidecar (`<key>.json`) records the source file's size, modification time (ns) and a
digest of its first and last 64 KiB, the parse recipe (the parser, dtype and shapes) and each array's
dtype and shape; any difference, or a cache file that does not load, and the file is parsed again.

Concurrency: the builder holds an exclusive `fcntl.flock` on `<key>.lock` beside the cache; any other
process (a DDP rank, a second job) blocks on it, then finds the cache valid and maps what the builder
wrote. Each file is written to a temp file, fsynced and put in place with `os.replace`, the arrays first
and the sidecar last, so no reader ever sees a torn file.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..serialization import write_atomic
from .base import require_file

try:  # POSIX; elsewhere the cache is built without a lock (atomic writes still keep it whole)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is cached for the same file and recipe changes: old caches are rebuilt
CACHE_FOLDER = ".cliphand3d_cache"  # inside the data root, shared with the mesh template's cache
ENV = "CLIPHAND3D_CACHE"
DEFAULT_CACHE_DIR = "data/cache"
DIGEST_BYTES = 1 << 16
_MAPPED: dict[tuple, np.ndarray] = {}  # one mapping per cache file and version in this process


# --------------------------------------------------------------------------- where, and is it current
def cache_folders(root: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(the folder beside the data, the fallback folder under cache_dir) for data root `root`."""
    root = Path(root).expanduser().resolve()
    base = Path(cache_dir if cache_dir is not None else os.environ.get(ENV) or DEFAULT_CACHE_DIR).expanduser()
    tag = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return root / CACHE_FOLDER / "labels", base / "labels" / f"{root.name}-{tag}"


def source_stamp(path: Path) -> dict:
    """What identifies the file's content: size, modification time (ns), a digest of its ends."""
    st = path.stat()
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(DIGEST_BYTES))
        if st.st_size > 2 * DIGEST_BYTES:
            f.seek(-DIGEST_BYTES, os.SEEK_END)
        h.update(f.read(DIGEST_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": h.hexdigest()}


def _map(path: Path) -> np.ndarray:
    """The .npy at `path`, memory-mapped read-only; the same mapping for the same file version."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _MAPPED:
        _MAPPED[key] = np.load(path, mmap_mode="r", allow_pickle=False)
    return _MAPPED[key]


def _read(folder: Path, key: str, stamp: dict, recipe: str) -> dict[str, np.ndarray] | None:
    """The cached arrays of `key` in `folder` if they are current for `stamp` and `recipe`, else None."""
    try:
        side = json.loads((folder / f"{key}.json").read_text())
        if side.get("format") != FORMAT or side.get("recipe") != recipe or side.get("source") != stamp:
            return None
        out = {}
        for name, spec in side["arrays"].items():
            a = _map(folder / f"{key}.{name}.npy")
            if a.dtype.str != spec["dtype"] or list(a.shape) != spec["shape"]:
                return None
            out[name] = a
        return out
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, torn by hand, or from another version: parse again


# --------------------------------------------------------------------------- building
def cached_arrays(root: str | Path, source: str | Path, key: str, recipe: str,
                  parse: Callable[[], dict[str, np.ndarray]], fix: str,
                  cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """`parse()`'s arrays for annotation file `source` of the dataset at `root`, read-only and mapped.

    key: the cache files' name (unique per source and recipe in the root); recipe: what `parse` does
    (parser, dtype, shapes), stored and compared; fix: the message's fix when `source` is missing.
    Parsing errors are `parse`'s own (they name the file and the fix); nothing is cached then."""
    source = require_file(source, fix)
    stamp = source_stamp(source)
    folders = cache_folders(root, cache_dir)
    for folder in folders:
        found = _read(folder, key, stamp, recipe)
        if found is not None:
            return found
    folder, fd = _open_lock(folders, key, source)
    try:
        locked = _lock(fd, folder / f"{key}.lock")
        found = _read(folder, key, stamp, recipe)  # built by the process we waited for
        if found is None:
            found = _build(folder, key, stamp, recipe, source, parse, locked)
        return found
    finally:
        os.close(fd)  # releases the lock


def _open_lock(folders: tuple[Path, Path], key: str, source: Path) -> tuple[Path, int]:
    """(the first folder this process can write, an open descriptor of its lock file)."""
    reasons = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            fd = os.open(folder / f"{key}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as e:
            reasons.append(f"{folder}: {e.strerror or e}")
            continue
        if folder != folders[0]:
            log.warning("label cache: %s; caching %s in %s instead", reasons[0], source.name, folder)
        return folder, fd
    raise DatasetError(f"cannot write the label cache of {source} ({'; '.join(reasons)}).\n"
                       f"  fix: set the {ENV} environment variable (or the dataset's cache_dir) to a writable "
                       f"folder, e.g. {ENV}=/tmp/cliphand3d_cache, or make {folders[0].parent} writable")


def _lock(fd: int, path: Path) -> bool:
    """Hold an exclusive lock on the open lock file, waiting (and saying so) while another process builds;
    False where the file system has no locks (then each process builds, and the atomic writes keep it whole)."""
    if fcntl is None:  # pragma: no cover - Windows
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("label cache: waiting for another process to finish %s", path.with_suffix(""))
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        log.warning("label cache: %s cannot be locked (%s); building without a lock", path, e.strerror or e)
        return False
    return True


def _build(folder: Path, key: str, stamp: dict, recipe: str, source: Path,
           parse: Callable[[], dict[str, np.ndarray]], locked: bool) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    log.info("label cache: parsing %s (%.0f MB) once into %s", source, stamp["size"] / 2 ** 20, folder)
    arrays = {name: np.asarray(a) for name, a in parse().items()}
    for stale in folder.glob(f".{glob.escape(key)}.*.tmp") if locked else ():  # a killed builder's (none is running)
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    try:
        for name, a in arrays.items():
            write_atomic(folder / f"{key}.{name}.npy", lambda f, a=a: np.save(f, a, allow_pickle=False))
        side = {"format": FORMAT, "recipe": recipe, "source": stamp, "file": str(source),
                "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()}}
        write_atomic(folder / f"{key}.json", lambda f: f.write(json.dumps(side, indent=1).encode()))
    except OSError as e:
        need = sum(a.nbytes for a in arrays.values()) / 2 ** 20
        raise DatasetError(f"cannot write the label cache of {source} in {folder} ({e.strerror or e}).\n"
                           f"  fix: free space there (the cache needs {need:.0f} MB) or set the {ENV} "
                           f"environment variable (or the dataset's cache_dir) to a folder with room") from None
    log.info("label cache: %s cached in %.1f s", source.name, time.perf_counter() - t0)
    found = _read(folder, key, stamp, recipe)
    return found if found is not None else arrays


# --------------------------------------------------------------------------- datasets that travel
class _Mapped:
    """A mapped array in a pickled dataset: its file region, mapped again where it is unpickled."""

    def __init__(self, a: np.memmap):
        self.filename, self.offset, self.dtype, self.shape = a.filename, a.offset, a.dtype, a.shape

    def remap(self) -> np.ndarray:
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.filename, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def mapped_rows(labels: np.ndarray, index, dtype=None) -> np.ndarray:
    """A copy of `labels[index]` (a read-only map of the cache, or any array), as `dtype`: read through a plain
    ndarray view, which indexes in a quarter of np.memmap's time (a loader worker reads rows for every item)."""
    return np.array(labels.view(np.ndarray)[index], dtype=dtype)


def picklable(state: dict) -> dict:
    """A dataset's __dict__ with its whole mapped arrays replaced by their files: a dataset pickled to a
    spawned loader worker maps the cache again instead of carrying a copy of every label."""
    return {k: _Mapped(v) if isinstance(v, np.memmap) and isinstance(v.base, mmap.mmap) else v
            for k, v in state.items()}


def unpickled(state: dict) -> dict:
    """`picklable`'s inverse."""
    return {k: v.remap() if isinstance(v, _Mapped) else v for k, v in state.items()}
