"""ONNX export of the inference path, and an onnxruntime runner (scripts/export.py's work).

The graph takes `images` (B, 3, S, S) float32, normalised as in training ((rgb / 255 - 0.5) / 0.5, so
[-1, 1]; cliphand3d.data.transforms.normalize_image), and returns the model's own outputs: `joints`
(B, 21, 3) and `verts` (B, V, 3) in normalised uvd (u, v in [0, 1] of the crop, d root-relative depth);
a joints-only model (no mesh template) returns `joints` alone. B is a dynamic axis named "batch".
The text branch, the coarse heatmap joints, the deep-supervision stages and the logits are cut.

Weights whose attention runs across the batch (model.attention_over=batch, the released network's
compatibility switch) give a graph that computes the same thing: each sample's output depends on the
whole batch it is run in, so it matches PyTorch only for the same batch in the same order, and a batch of
one differs from a batch of 32. Export with model.attention_over=nodes to cut that dependence (it changes
the outputs of those weights).

The exporter is torch.export + onnxscript (`torch.onnx.export(dynamo=True)`), the only path that is right
here: the legacy TorchScript exporter refuses the joint features' `unfold`, and with that worked around it
writes a graph whose outputs are off by ~1 even at the trace batch size. The dynamo exporter emits opset 18
natively and cannot lower this graph to 17 (no Pad adapter from 18 to 17), hence MIN_OPSET.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import pathlib

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from ..build import load_model, model_overrides
from ..errors import ConfigError, MissingExtraError, ParityError
from ..preflight import check_writable

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[onnx]"'
INPUT = "images"
OUTPUTS = ("joints", "verts")
MIN_OPSET = 18
PARITY_TOL = 1e-4
FORMATS = ("onnx",)
# The graph optimiser logs every rewrite at INFO, hundreds of lines under the scripts' stdout logging.
CHATTY_LOGGERS = ("onnxscript", "onnx_ir")


def require(*modules: str):
    """Import the extra's modules, or stop with the command that installs them."""
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise MissingExtraError(f"ONNX export and inference need the optional packages {', '.join(modules)} "
                                f"(missing: {e.name or e}); install them with: {INSTALL_HINT}") from None


def has_mesh(model: nn.Module) -> bool:
    return not model.regressor.joints_only


class InferenceGraph(nn.Module):
    """model(images) reduced to the tensors a deployment reads: (joints, verts), or joints alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.mesh = has_mesh(model)

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        return (out["joints"], out["verts"]) if self.mesh else out["joints"]


def export_onnx(model: nn.Module, out, *, img_size: int, opset: int = MIN_OPSET,
                batch_size: int = 2) -> pathlib.Path:
    """Write the eval-mode inference path of `model` to the ONNX file `out` (one file, weights inside);
    batch_size is the trace example's (>= 2: torch.export specialises a dimension of size 1 to a constant)."""
    require("onnx", "onnxscript")
    if int(opset) < MIN_OPSET:
        raise ConfigError(f"opset={opset}: the exporter writes opset {MIN_OPSET} or later (it cannot lower this "
                          f"graph further); set opset={MIN_OPSET}")
    if int(batch_size) < 2:
        raise ConfigError(f"batch_size={batch_size}: the trace example needs at least 2 images, or the batch axis "
                          "is fixed to 1; set batch_size=2")
    out = pathlib.Path(out).expanduser()
    was_training = model.training
    graph = InferenceGraph(model).eval()
    names = list(OUTPUTS if graph.mesh else OUTPUTS[:1])
    example = torch.rand(int(batch_size), 3, int(img_size), int(img_size),
                         generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = torch.export.Dim("batch")
    try:
        with quiet_loggers(CHATTY_LOGGERS):
            program = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=int(opset),
                                        input_names=[INPUT], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False)
    finally:
        model.train(was_training)
    got = program.model.opset_imports.get("")
    if got != int(opset):  # the exporter's version conversion only logs when it fails
        raise ConfigError(f"opset={opset}: the exporter wrote opset {got} instead; set opset={got}")
    program.model.metadata_props.update(graph_metadata(model, img_size))
    program.save(str(out), external_data=False)
    return out


@contextlib.contextmanager
def quiet_loggers(names, level=logging.WARNING):
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, before):
            lg.setLevel(lv)


def graph_metadata(model: nn.Module, img_size: int) -> dict[str, str]:
    """What a deployment must know that the graph's shapes do not say, stored in the file."""
    return {
        "cliphand3d.img_size": str(int(img_size)),
        "cliphand3d.input": "RGB crop, float32, (rgb / 255 - 0.5) / 0.5 in [-1, 1], NCHW",
        "cliphand3d.outputs": "normalised uvd: u, v in [0, 1] of the crop, d root-relative depth; MPII joint order",
        "cliphand3d.mixes_batch": "true" if model.mixes_batch else "false",
    }


class OnnxModel:
    """An exported file run by onnxruntime on the CPU: `OnnxModel(path)(images)` -> {"joints", "verts"}.

    `spin_wait=False` stops onnxruntime's threads from busy-waiting for more work after each run (its
    default, good for latency): otherwise they take the cores from whatever runs next on the CPU, e.g.
    PyTorch in a benchmark that alternates the two."""

    def __init__(self, path, threads: int | None = None, spin_wait: bool = True):
        (ort,) = require("onnxruntime")
        self.path = pathlib.Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; write one with "
                                    f"python scripts/export.py ckpt=PATH out={self.path}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        if not spin_wait:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, tuple(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        want = self.input_shape[1:]
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(want):
            raise ValueError(f"{self.path.name} takes images of shape (B, {', '.join(map(str, want))}), normalised "
                             f"to [-1, 1]; got {images.shape}")
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: images})))


def check_parity(model: nn.Module, onnx_path, images) -> float:
    """max |onnx - torch| over every output of the exported file (joints, verts) on `images`."""
    return _parity(model, onnx_path, images)[0]


def _parity(model: nn.Module, onnx_path, images) -> tuple[float, float]:
    """(max |onnx - torch|, max |torch|) over the file's outputs."""
    images = torch.as_tensor(images, dtype=torch.float32)
    got = OnnxModel(onnx_path)(images)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        model.train(was_training)
    ref = {k: out[k].cpu().numpy() for k in got}
    return (max(float(np.abs(got[k] - ref[k]).max()) for k in got),
            max(float(np.abs(ref[k]).max()) for k in got))


def sample_images(batch: int, img_size: int, seed: int = 1) -> torch.Tensor:
    """A batch spanning the normalised input range, for the parity check."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, img_size, img_size, generator=g) * 2 - 1


def check_export(model: nn.Module, onnx_path, batch: int, tol: float = PARITY_TOL) -> float:
    """check_parity on a sample batch; a file that fails is removed (nobody should deploy it)."""
    path = pathlib.Path(onnx_path)
    diff, scale = _parity(model, path, sample_images(batch, model.img_size))
    if not diff <= tol:
        path.unlink(missing_ok=True)
        raise ParityError(f"{path}: max |onnx - torch| = {diff:.3g} on a sample batch of {batch} exceeds {tol:g} "
                          f"(outputs up to {scale:.3g}; float32 rounding stays near 1e-6 of that). The file was "
                          "removed: export with check=false to keep it for inspection, and report the torch, "
                          "onnxscript and onnxruntime versions")
    return diff


def run_export(cfg: DictConfig) -> dict:
    """scripts/export.py: checkpoint -> ONNX file, with the parity check when cfg.check."""
    if str(cfg.format) not in FORMATS:
        raise ConfigError(f"format={cfg.format}: the formats are {', '.join(FORMATS)}")
    out = pathlib.Path(str(cfg.out)).expanduser()
    if out.is_dir():
        raise ConfigError(f"out={out} is a folder; name the file to write, e.g. out={out / 'model.onnx'}")
    check_writable(out.parent, "out")
    model, _, _ = load_model(pathlib.Path(str(cfg.ckpt)).expanduser(), model_overrides(cfg), "cpu",
                             use_ema=bool(cfg.use_ema))
    if model.mixes_batch:
        log.warning("model.attention_over=batch (the released network's bug): the graph keeps it, so each output "
                    "depends on the batch it is run in; model.attention_over=nodes exports without it")
    export_onnx(model, out, img_size=model.img_size, opset=int(cfg.opset), batch_size=int(cfg.batch_size))
    res = {"out": str(out), "img_size": model.img_size, "outputs": list(OUTPUTS if has_mesh(model) else OUTPUTS[:1]),
           "mixes_batch": model.mixes_batch, "max_abs_diff": None}
    if cfg.check:
        # another batch size than the trace's, so the dynamic batch axis is checked too
        res["max_abs_diff"] = check_export(model, out, int(cfg.batch_size) + 1)
    return res
