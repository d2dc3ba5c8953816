"""Reading files without running code from them: the project's one `torch.load` and its plain-data unpickler.

Checkpoints, pretrained weight files and the authors' released file are read by `load_torch_file`, always
with `weights_only=True` (tensors, numbers, str, containers; nothing that executes); callers add, by name,
the few extra globals a file of theirs needs (numpy scalars in the released file). Annotation pickles (RHD)
go through `PlainDataUnpickler`. Callers turn failures into their own errors, which name the file and fix.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
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
