"""Files read without running code from them, and written whole: the project's one `torch.load`, its
plain-data unpickler, and the one atomic write (checkpoints, the label cache, the template cache).

Checkpoints, pretrained weight files and the authors' released file are read by `load_torch_file`, always
with `weights_only=True` (tensors, numbers, str, containers; nothing that executes); callers add, by name,
the few extra globals a file of theirs needs (numpy scalars in the released file). Annotation pickles (RHD)
go through `PlainDataUnpickler`. Callers turn failures into their own errors, which name the file and fix.
"""
from __future__ import annotations

import glob
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

# How torch's weights-only unpickler says "this object type is not allowed" (as opposed to a corrupt stream,
# which it reports as e.g. "Unsupported operand").
REFUSAL_MARKS = ("Unsupported global", "Unsupported class", "unrecognized function")


def load_torch_file(path: str | os.PathLike, *, map_location: Any = "cpu", safe_globals: Sequence = ()) -> Any:
    """torch.load(path, weights_only=True), admitting also the globals in `safe_globals`."""
    if not safe_globals:
        return torch.load(path, map_location=map_location, weights_only=True)
    with torch.serialization.safe_globals(list(safe_globals)):
        return torch.load(path, map_location=map_location, weights_only=True)


def refused_object(error: BaseException) -> str | None:
    """When `load_torch_file` failed because the file holds an object weights-only loading refuses: the
    refusal's first line, shortened to what was refused ("Unsupported global: GLOBAL x.Y"); else None
    (a truncated, corrupt or foreign file)."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    lines = [ln.strip() for ln in str(error).splitlines() if any(m in ln for m in REFUSAL_MARKS)]
    return lines[0].split(" was not an allowed global")[0] if lines else None


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    # Python 3 writes numpy byte buffers in protocol-2 pickles through _codecs.encode (a pure function)
    ("_codecs", "encode"),
}


class PlainDataUnpickler(pickle.Unpickler):
    """Admits only plain data: builtins (dict, list, tuple, str, numbers) and numpy arrays/scalars."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data and numpy arrays "
                                     "are allowed in annotation pickles")


def load_plain_pickle_stream(stream: BinaryIO, encoding: str = "ASCII") -> Any:
    """One pickle from `stream` through PlainDataUnpickler (pickle.UnpicklingError for anything else)."""
    return PlainDataUnpickler(stream, encoding=encoding).load()


# --------------------------------------------------------------------------- atomic writes
def temp_pattern(path: Path) -> str:
    """The glob of the temp files `write_atomic` makes for `path` (.<name>.<random>.tmp, beside it)."""
    return f".{glob.escape(path.name)}.*.tmp"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """write(binary file) into a temp file in `path`'s folder (the same file system, so the rename is atomic),
    flushed and fsynced before os.replace puts it in place and the folder is fsynced: a crash at any point
    leaves the old file or the new one, never a part. On any error the temp file is removed and the error
    re-raised. The file gets the mode a plain open() would give (mkstemp's is 0600), so colleagues sharing a
    run or a dataset folder can read it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _default_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
