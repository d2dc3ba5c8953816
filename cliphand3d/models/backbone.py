"""ResNet image encoder returning the feature pyramid F0..F4 (DESIGN 1.3).

`pretrained` is None (random init), a torchvision weight tag ("IMAGENET1K_V1", "DEFAULT", ...) or a
local state-dict file. Tags are resolved from the torch hub cache first; the network is touched only
when a quick probe says it is reachable, so an offline run fails at once with one readable error.
"""
from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import ConfigError

CHOICES: dict[str, list[int]] = {
    # F0 (stem), F1..F4 (layer1..layer4) channels.
    "resnet18": [64, 64, 128, 256, 512],
    "resnet34": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
}
STRIDES = (4, 4, 8, 16, 32)
STAGES = (4, 3)  # residual stages kept: all four, or up to layer3

_OVERRIDE_HINT = ("set model.pretrained=null (random init) or "
                  "model.pretrained=/path/to/state_dict.pth (a local file)")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be obtained or do not fit the network."""


class ResNetBackbone(nn.Module):
    """torchvision ResNet without avgpool/fc. forward(images) -> [F0, F1, F2, F3, F4].

    F0 is the stem after max-pooling (stride 4), F1..F4 are layer1..layer4 (strides 4, 8, 16, 32).
    Parameter names equal torchvision's, so torchvision checkpoints load as they are.

    stages=3 stops after layer3: F4 is then layer3's map (stride 16) and there is no layer4. On small
    crops layer4 works on a 2x2 map (64 px) yet holds most of the weights and half of ResNet-18's
    forward+backward time; `channels` and `strides` describe the F4 actually returned.
    """

    def __init__(self, name: str = "resnet50", pretrained: str | os.PathLike | None = None, stages: int = 4):
        super().__init__()
        if name not in CHOICES:
            raise ConfigError(f"model.backbone={name!r} is not supported; "
                             f"choose one of {sorted(CHOICES)}")
        if stages not in STAGES:
            raise ConfigError(f"model.backbone_stages={stages!r} is not supported; choose one of {list(STAGES)} "
                              "(4: up to layer4, F4 at stride 32; 3: up to layer3, F4 at stride 16)")
        self.name, self.stages = name, int(stages)
        self.channels: list[int] = list(CHOICES[name])
        self.strides: list[int] = list(STRIDES)
        net = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        if self.stages == 4:
            self.layer4 = net.layer4
        else:
            self.channels[4], self.strides[4] = self.channels[3], self.strides[3]
        if pretrained is not None and str(pretrained) != "":
            state, source = resolve_pretrained(name, pretrained)
            self._load(state, source)

    def _load(self, state: dict, source: str) -> None:
        # The classifier is not part of the encoder; ignoring it lets full torchvision files load, as
        # a truncated backbone ignores the layers it does not have.
        unused = ("fc.",) if self.stages == 4 else ("fc.", "layer4.")
        state = {k: v for k, v in state.items() if not k.startswith(unused)}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or wrong:
            raise PretrainedWeightsError(
                f"{source} does not fit a {self.name} backbone: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, wrong shape {wrong[:4]} (showing up to 4 each). Use a {self.name} "
                f"state dict with torchvision parameter names, or {_OVERRIDE_HINT}.")
        self.load_state_dict(state)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        f0 = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3) if self.stages == 4 else f3
        return [f0, f1, f2, f3, f4]


def resolve_pretrained(name: str, pretrained: str | os.PathLike) -> tuple[dict, str]:
    """(state_dict, description of where it came from) for a tag or a local file."""
    text = str(pretrained)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return _load_file(path), f"local file {path}"
    if os.sep in text or path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        raise PretrainedWeightsError(f"model.pretrained={text!r}: no such file; "
                                     f"{_OVERRIDE_HINT}")
    tags = torchvision.models.get_model_weights(name)
    if text not in tags.__members__:
        raise PretrainedWeightsError(
            f"model.pretrained={text!r} is neither a file nor a torchvision tag for {name} "
            f"(tags: {sorted(tags.__members__)}); {_OVERRIDE_HINT}")
    weights = tags[text]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return _load_file(cached), f"torch hub cache {cached}"
    if _offline_env() or not _reachable(weights.url):
        raise PretrainedWeightsError(
            f"model.pretrained={text!r}: {name} weights {weights} are not in the torch hub "
            f"cache ({cached}) and {weights.url} cannot be reached (offline); {_OVERRIDE_HINT}")
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # network failures surface as many exception types
        raise PretrainedWeightsError(
            f"model.pretrained={text!r}: downloading {weights.url} failed "
            f"({type(err).__name__}: {err}); {_OVERRIDE_HINT}") from None
    return state, f"torchvision {weights}"


def _load_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"cannot read weights file {path} ({type(err).__name__}: {err}); "
                                     f"{_OVERRIDE_HINT}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict (name -> tensor); "
                                     f"{_OVERRIDE_HINT}")
    return state


def _offline_env() -> bool:
    # The project runs offline with HF_HUB_OFFLINE=1; honour it (and TORCH_HUB_OFFLINE) here too.
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE"))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """HEAD request in a daemon thread: bounds the wait even when name resolution hangs."""
    ok = threading.Event()

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                ok.set()
        except Exception:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return ok.is_set()
