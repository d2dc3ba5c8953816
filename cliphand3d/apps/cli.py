"""What the scripts share: bad input ends with its message and exit code 1, not a traceback.

The project's own errors (missing data, unreadable checkpoints, unavailable weights) already say
which file or key is wrong and how to fix it; a stack trace under them only hides that. Hydra wraps
errors raised while instantiating a config in InstantiationException; the cause is unwrapped.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

from omegaconf.errors import MissingMandatoryValue
from tqdm import tqdm

from ..errors import (CheckpointError, ConfigError, DatasetError, MissingExtraError, ParityError,
                      PretrainedWeightsError)

# MissingMandatoryValue: a `???` key (eval.py's ckpt, the demo's input) not given on the command line
USER_ERRORS = (DatasetError, CheckpointError, PretrainedWeightsError, FileNotFoundError, ConfigError,
               MissingExtraError, ParityError, MissingMandatoryValue)


def _user_error(exc: BaseException) -> BaseException | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, USER_ERRORS):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextmanager
def friendly_errors():
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours
        err = _user_error(e)
        if err is None:
            raise
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def _close_progress_bars() -> None:
    """A tqdm bar that an exception left open ends its line only when it closes (at garbage collection,
    after our message), so the message would follow the bar on its line; closing it ends that line first."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
