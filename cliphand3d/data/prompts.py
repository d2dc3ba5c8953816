"""Labels -> one sentence per axis (DESIGN 1.1): the template and naming registries, the generator
and the CLIP token-length check.

For each axis the joints are sorted ascending in the camera frame (x left->right, y top->bottom since
camera y points down, z near->far) and their names are written into the axis's sentence.

Token lengths are checked once, at construction, not per sample. This is sound because the CLIP
tokenizer splits text into words and punctuation *before* byte-pair encoding, so a sentence's token
count is the sum of its pieces' counts and does not depend on the order of the names: the worst
case over all samples is the sentence built from the k names with the most tokens. Registration
checks keep that true (no letter or digit may touch a name, see `_check_boundaries`).
"""
from __future__ import annotations

import functools
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..skeleton import ANATOMICAL_JOINT_NAMES, JOINT_NAMES, NUM_JOINTS

AXES: tuple[str, ...] = ("x", "y", "z")
# What ascending order means on each axis of the OpenCV camera frame.
AXIS_DIRECTIONS: dict[str, str] = {"x": "left to right", "y": "top to bottom", "z": "near to far"}
CLIP_CONTEXT_LENGTH = 77


# --------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class Template:
    """Per-axis format strings, each with one `{joints}` slot, and how the name list is joined."""

    formats: Mapping[str, str]
    sep: str = ", "
    last_sep: str = " and "

    def sentence(self, axis: str, names: Sequence[str]) -> str:
        return self.formats[axis].format(joints=join_names(names, self.sep, self.last_sep))


_TEMPLATES: dict[str, Template] = {}
_NAMINGS: dict[str, tuple[str, ...]] = {}


def join_names(names: Sequence[str], sep: str = ", ", last_sep: str = " and ") -> str:
    """"a, b and c"; a single name stands alone."""
    if len(names) == 0:
        raise ValueError("join_names: no names to join")
    if len(names) == 1:
        return names[0]
    return sep.join(names[:-1]) + last_sep + names[-1]


def _touches_word(s: str, at_start: bool) -> bool:
    if not s:
        return False
    return (s[0] if at_start else s[-1]).isalnum()


def _check_boundaries(where: str, fmt: str) -> None:
    # A letter next to the slot would fuse with the first/last name into one BPE word, making the
    # token count depend on which joint comes first or last and breaking the worst-case check.
    before, after = fmt.split("{joints}")
    if _touches_word(before, at_start=False) or _touches_word(after, at_start=True):
        raise ValueError(
            f"{where}: '{{joints}}' must be separated from surrounding text by a space or punctuation "
            f"(got {fmt!r})"
        )


def register_template(
    name: str,
    formats: str | Mapping[str, str],
    *,
    sep: str = ", ",
    last_sep: str = " and ",
    overwrite: bool = False,
) -> Template:
    """Add a template. `formats` is one format string for every axis or a mapping with keys x, y, z;
    each holds exactly one `{joints}` slot. Returns the registered Template."""
    if isinstance(formats, str):
        formats = {a: formats for a in AXES}
    formats = {str(k): str(v) for k, v in dict(formats).items()}
    if set(formats) != set(AXES):
        raise ValueError(
            f"register_template({name!r}): formats needs exactly the keys {list(AXES)}, got {sorted(formats)}"
        )
    for axis, fmt in formats.items():
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
        if fields != ["joints"]:
            raise ValueError(
                f"register_template({name!r}): format for axis {axis!r} must have exactly one "
                f"'{{joints}}' slot and no other fields (got {fmt!r}; write literal braces as '{{{{')"
            )
        _check_boundaries(f"register_template({name!r}) axis {axis!r}", fmt)
    for label, s in (("sep", sep), ("last_sep", last_sep)):
        if not s or _touches_word(s, True) or _touches_word(s, False):
            raise ValueError(
                f"register_template({name!r}): {label}={s!r} must start and end with a space or punctuation"
            )
    if name in _TEMPLATES and not overwrite:
        raise ValueError(f"template {name!r} is already registered; pass overwrite=True to replace it")
    _TEMPLATES[name] = Template(formats=formats, sep=sep, last_sep=last_sep)
    return _TEMPLATES[name]


def register_naming(name: str, names: Sequence[str], *, overwrite: bool = False) -> tuple[str, ...]:
    """Add a joint naming scheme: 21 distinct names in the MPII joint order (cliphand3d.skeleton)."""
    names = tuple(str(n) for n in names)
    if len(names) != NUM_JOINTS or len(set(names)) != NUM_JOINTS:
        raise ValueError(
            f"register_naming({name!r}): need {NUM_JOINTS} distinct names in MPII order, got "
            f"{len(names)} ({len(set(names))} distinct)"
        )
    for n in names:
        # Same reason as _check_boundaries: names must not fuse with separators or template text.
        if not (n and n[0].isalnum() and n[-1].isalnum()):
            raise ValueError(
                f"register_naming({name!r}): joint name {n!r} must start and end with a letter or digit"
            )
    if name in _NAMINGS and not overwrite:
        raise ValueError(f"naming {name!r} is already registered; pass overwrite=True to replace it")
    _NAMINGS[name] = names
    return names


def available_templates() -> tuple[str, ...]:
    return tuple(sorted(_TEMPLATES))


def available_namings() -> tuple[str, ...]:
    return tuple(sorted(_NAMINGS))


def get_template(name: str) -> Template:
    if name not in _TEMPLATES:
        raise ConfigError(
            f"unknown prompt template {name!r}; known: {list(available_templates())}. Add one with "
            f"cliphand3d.data.prompts.register_template(name, formats) and a config in configs/prompt/ "
            f"(see docs/prompts.md)"
        )
    return _TEMPLATES[name]


def get_naming(name: str) -> tuple[str, ...]:
    if name not in _NAMINGS:
        raise ConfigError(
            f"unknown joint naming {name!r}; known: {list(available_namings())}. Add one with "
            f"cliphand3d.data.prompts.register_naming(name, names)"
        )
    return _NAMINGS[name]


# The demo repository's wording, the same sentence shape on every axis.
register_template("order_are", "Order are: {joints}.")
# The paper's Figure 3 wording; with all 21 joints it is 83 tokens, over CLIP's 77.
register_template(
    "figure3",
    {a: f"From {d}, the joints are: {{joints}}." for a, d in AXIS_DIRECTIONS.items()},
)
register_naming("demo", JOINT_NAMES)
register_naming("anatomical", ANATOMICAL_JOINT_NAMES)


# --------------------------------------------------------------------------- tokens
@functools.lru_cache(maxsize=1)
def _tokenizer():
    # Imported lazily: open_clip pulls in torch and torchvision, which plain prompt generation
    # does not need. The BPE vocabulary ships inside the package, so nothing is downloaded.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_tokens(text: str) -> int:
    """CLIP token count of `text` including the start and end tokens (compare with 77)."""
    return len(_tokenizer().encode(text)) + 2


# --------------------------------------------------------------------------- sorting
def axis_order(joints_xyz: np.ndarray, axis: str, subset: Sequence[int] | None = None) -> np.ndarray:
    """Joint indices (all, or `subset`) sorted ascending along `axis`; ties keep joint index order."""
    col = AXES.index(axis)
    idx = np.arange(NUM_JOINTS) if subset is None else np.sort(np.asarray(subset, dtype=np.int64))
    return idx[np.argsort(joints_xyz[idx, col], kind="stable")]


def _as_joints(joints_xyz) -> np.ndarray:
    if hasattr(joints_xyz, "detach"):  # torch tensor, possibly on GPU
        joints_xyz = joints_xyz.detach().cpu().numpy()
    j = np.asarray(joints_xyz, dtype=np.float64)
    if j.shape != (NUM_JOINTS, 3):
        raise ValueError(f"joints_xyz: expected shape ({NUM_JOINTS}, 3) in metres, got {j.shape}")
    if not np.isfinite(j).all():
        raise ValueError("joints_xyz: contains NaN or inf; the joint order would be meaningless")
    return j


# --------------------------------------------------------------------------- generator
class PromptGenerator:
    """Camera-frame joints (21, 3) -> {axis: sentence}.

    template: a registered template name ("order_are", "figure3", ...).
    axes: which axes get a sentence, any of "x", "y", "z".
    num_joints: None = all 21 joints; k = a random k-subset per sample, listed in sorted order.
    shared_subset: with num_joints=k, False draws a fresh subset for each axis (each axis has its
        own text head and similarity matrix, so independent draws cost nothing and give more
        distinct sentences); True uses one subset for all axes of a sample.
    joint_subset: fixed joint indices (MPII order) used for every sample, for ablations; excludes
        num_joints.
    naming: a registered naming scheme ("demo", "anatomical").
    truncate: False = a template whose worst case exceeds context_length is an error at
        construction; True = build the sentences anyway and let the text encoder cut them at
        context_length (the tail of the joint list is lost).
    context_length: the text encoder's token limit, start and end tokens included.

    Calls are pure: the same joints and the same rng state give the same sentences. An rng is
    required only when subsets are random (num_joints set).
    """

    def __init__(
        self,
        template: str = "order_are",
        axes: Sequence[str] = AXES,
        num_joints: int | None = None,
        shared_subset: bool = False,
        joint_subset: Sequence[int] | None = None,
        naming: str = "demo",
        truncate: bool = False,
        context_length: int = CLIP_CONTEXT_LENGTH,
    ):
        self.template_name = str(template)
        self.template = get_template(self.template_name)
        self.naming = str(naming)
        self.names = get_naming(self.naming)
        self.axes = self._check_axes(axes)
        self.num_joints, self.joint_subset = self._check_subset(num_joints, joint_subset)
        self.shared_subset = bool(shared_subset)
        self.truncate = bool(truncate)
        self.context_length = int(context_length)
        if self.context_length < 3:
            raise ConfigError(f"prompt.context_length must be >= 3, got {context_length}")
        self.max_tokens, worst_axis = self._worst_case(self.num_joints, self.joint_subset)
        if self.max_tokens > self.context_length:
            self._overflow(worst_axis)

    @staticmethod
    def _check_axes(axes) -> tuple[str, ...]:
        axes = (axes,) if isinstance(axes, str) else tuple(str(a) for a in axes)
        if not axes or len(set(axes)) != len(axes) or not set(axes) <= set(AXES):
            raise ConfigError(f"prompt.axes must be distinct values from {list(AXES)}, got {list(axes)}")
        return axes

    @staticmethod
    def _check_subset(num_joints, joint_subset):
        if num_joints is not None and joint_subset is not None:
            raise ConfigError("prompt.num_joints and prompt.joint_subset are exclusive; set one to null")
        if joint_subset is not None:
            subset = tuple(sorted(int(i) for i in joint_subset))
            if not subset or len(set(subset)) != len(subset) or not all(0 <= i < NUM_JOINTS for i in subset):
                raise ConfigError(
                    f"prompt.joint_subset must be distinct joint indices in [0, {NUM_JOINTS - 1}], got "
                    f"{list(joint_subset)}"
                )
            return None, subset
        if num_joints is not None:
            num_joints = int(num_joints)
            if not 1 <= num_joints <= NUM_JOINTS:
                raise ConfigError(f"prompt.num_joints must be in [1, {NUM_JOINTS}] or null, got {num_joints}")
            if num_joints == NUM_JOINTS:
                num_joints = None  # every joint: nothing to draw
        return num_joints, None

    @property
    def needs_rng(self) -> bool:
        return self.num_joints is not None

    def _worst_case(self, num_joints, joint_subset) -> tuple[int, str]:
        """Largest token count any sample can produce, and the axis it happens on."""
        if joint_subset is not None:
            names = [self.names[i] for i in joint_subset]
        else:
            k = NUM_JOINTS if num_joints is None else num_joints
            # Stable sort so the choice among equally long names is reproducible.
            names = sorted(self.names, key=lambda n: -count_tokens(n))[:k]
        counts = {a: count_tokens(self.template.sentence(a, names)) for a in self.axes}
        axis = max(self.axes, key=counts.__getitem__)
        return counts[axis], axis

    def _overflow(self, axis: str) -> None:
        what = (
            f"joint_subset of {len(self.joint_subset)} joints" if self.joint_subset is not None
            else f"num_joints={self.num_joints or NUM_JOINTS}"
        )
        if self.truncate:
            warnings.warn(
                f"prompt template {self.template_name!r} ({what}, naming {self.naming!r}) reaches "
                f"{self.max_tokens} tokens > {self.context_length}; the text encoder will truncate",
                stacklevel=3,
            )
            return
        fits = [k for k in range(NUM_JOINTS, 0, -1) if self._worst_case(k, None)[0] <= self.context_length]
        hint = f" (at most {fits[0]} fits)" if fits else ""
        raise ConfigError(
            f"prompt template {self.template_name!r} with {what} and naming {self.naming!r} is "
            f"{self.max_tokens} CLIP tokens on axis {axis!r} in the worst case, over the context "
            f"length {self.context_length}. Set prompt.truncate=true to let the text encoder cut it, "
            f"or use a smaller prompt.num_joints{hint}."
        )

    def __call__(self, joints_xyz, rng: np.random.Generator | None = None) -> dict[str, str]:
        j = _as_joints(joints_xyz)
        subsets: dict[str, Sequence[int] | None]
        if self.num_joints is None:
            subsets = {a: self.joint_subset for a in self.axes}
        else:
            if rng is None:
                raise ValueError(
                    f"PromptGenerator(num_joints={self.num_joints}) draws random joint subsets: pass "
                    f"rng=np.random.default_rng(seed) so prompts are reproducible"
                )
            if self.shared_subset:
                shared = rng.choice(NUM_JOINTS, self.num_joints, replace=False)
                subsets = {a: shared for a in self.axes}
            else:
                subsets = {a: rng.choice(NUM_JOINTS, self.num_joints, replace=False) for a in self.axes}
        if all(subsets[a] is None for a in self.axes):  # every joint: one stable sort per column, in one call
            return self._every_joint(j[None])[0]
        return {
            a: self.template.sentence(a, [self.names[i] for i in axis_order(j, a, subsets[a])])
            for a in self.axes
        }

    def batch(self, joints_xyz, rngs: Sequence[np.random.Generator | None]) -> list[dict[str, str]]:
        """`self(joints_xyz[i], rngs[i])` for each hand of a stack (B, 21, 3), each exactly as alone. With every
        joint in every sentence the hands' joints are sorted in one call (a loader worker's batch); random or
        fixed subsets, and hands that fail `__call__`'s checks, go one by one."""
        j = np.asarray(joints_xyz, dtype=np.float64)
        if len(rngs) != len(j):
            raise ValueError(f"PromptGenerator.batch: {len(j)} hands but {len(rngs)} generators")
        if (self.num_joints is not None or self.joint_subset is not None or j.ndim != 3
                or j.shape[1:] != (NUM_JOINTS, 3) or not np.isfinite(j).all()):
            return [self(x, rng) for x, rng in zip(j, rngs)]
        return self._every_joint(j)

    def _every_joint(self, j: np.ndarray) -> list[dict[str, str]]:
        """Checked hands (B, 21, 3) -> each hand's sentences naming every joint, in order along each axis (ties
        in joint index order: a stable sort of each column, all hands in one call)."""
        cols = [AXES.index(a) for a in self.axes]
        orders = np.argsort(j[..., cols], axis=1, kind="stable").transpose(0, 2, 1).tolist()
        names, sentence = self.names, self.template.sentence
        return [{a: sentence(a, [names[i] for i in order]) for a, order in zip(self.axes, hand)} for hand in orders]

    def __repr__(self) -> str:
        return (
            f"PromptGenerator(template={self.template_name!r}, axes={self.axes}, "
            f"num_joints={self.num_joints}, shared_subset={self.shared_subset}, "
            f"joint_subset={self.joint_subset}, naming={self.naming!r}, truncate={self.truncate}, "
            f"context_length={self.context_length})"
        )
