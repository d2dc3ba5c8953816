"""Every exception the project raises on purpose, in one place.

Each is a user error unless its docstring says otherwise: its message names the file or config key that is
wrong and the fix, and the scripts print it alone (`error: ...`, exit code 1; apps/cli.py) instead of a
traceback, which a programming error keeps. Every message is listed in docs/faq_errors.md. Kept free of
imports: every module may raise these.
"""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix. A ValueError, so callers
    that catch ValueError still do."""


class DatasetError(RuntimeError):
    """Bad or missing data. The message names the file or key and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model / config it is loaded into."""


class ReleasedCheckpointError(CheckpointError):
    """The file is not the released CLIP-Hand3D checkpoint, or not all of it."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights (ImageNet backbone, CLIP text tower) were asked for but cannot be found, read or
    downloaded, or do not fit the network. The message names the override that fixes it."""


class InputError(ValueError):
    """One input of the demo it cannot use (unreadable, too small, box off the image); it is reported and
    skipped, the other inputs still run."""


class MissingExtraError(ImportError):
    """An optional dependency (an extra of pyproject.toml, e.g. `onnx`) is not installed."""


class ParityError(RuntimeError):
    """An exported graph does not compute what the PyTorch model computes."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and the last good checkpoint is kept."""


class NonFiniteGradientError(NonFiniteLossError):
    """Gradients stayed non-finite for trainer.max_nonfinite_steps batches in a row. A subclass, so
    whatever stops a run on a non-finite loss stops it on this too."""
