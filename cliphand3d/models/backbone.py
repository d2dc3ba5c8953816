"""ResNet image encoder returning the feature pyramid F0..F4 (DESIGN 1.3).

`pretrained` is None (random init), a torchvision weight tag ("IMAGENET1K_V1", "DEFAULT", ...) or a
local state-dict file, found by `pretrained.torchvision_weights` (caches first, offline-safe).
"""
from __future__ import annotations

import logging
import os

import torch
import torchvision
from torch import nn

from ..errors import ConfigError, PretrainedWeightsError
from .pretrained import BACKBONE_FIX, torchvision_weights

log = logging.getLogger(__name__)

CHOICES: dict[str, list[int]] = {
    # F0 (stem), F1..F4 (layer1..layer4) channels.
    "resnet18": [64, 64, 128, 256, 512],
    "resnet34": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
}
STRIDES = (4, 4, 8, 16, 32)
STAGES = (4, 3)  # residual stages kept: all four, or up to layer3
# What the first convolution sees. Every crop reaches the model as (x / 255 - 0.5) / 0.5 (data.transforms.model_input,
# the ONNX input, the demo), so one input contract serves all; `imagenet` maps it, inside the network, to the
# (x / 255 - mean) / std with ImageNet's statistics that torchvision's ImageNet weights were trained on.
INPUT_NORMS = ("symmetric", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResNetBackbone(nn.Module):
    """torchvision ResNet without avgpool/fc. forward(images) -> [F0, F1, F2, F3, F4].

    F0 is the stem after max-pooling (stride 4), F1..F4 are layer1..layer4 (strides 4, 8, 16, 32).
    Parameter names equal torchvision's, so torchvision checkpoints load as they are.

    stages=3 stops after layer3: F4 is then layer3's map (stride 16) and there is no layer4. On small
    crops layer4 works on a 2x2 map (64 px) yet holds most of the weights and half of ResNet-18's
    forward+backward time; `channels` and `strides` describe the F4 actually returned.
    """

    def __init__(self, name: str = "resnet50", pretrained: str | os.PathLike | None = None, stages: int = 4,
                 input_norm: str = "symmetric"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ConfigError(f"model.input_norm={input_norm!r} is unknown; choose from {list(INPUT_NORMS)} "
                              "(imagenet for ImageNet-pretrained weights, symmetric for the released network's)")
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
        self.input_norm = input_norm
        self._set_input_affine(input_norm)
        if pretrained is not None and str(pretrained) != "":
            if input_norm != "imagenet":
                log.warning("model.pretrained=%s with model.input_norm=%s: torchvision's ImageNet weights were "
                            "trained on ImageNet-normalised images; set model.input_norm=imagenet unless these "
                            "weights were trained otherwise", pretrained, input_norm)
            state, source = torchvision_weights(name, pretrained)
            self._load(state, source)

    def _set_input_affine(self, input_norm: str) -> None:
        # x in [-1, 1] -> (x * 0.5 + 0.5 - mean) / std, as one scale and shift per channel; not persistent, so
        # state dicts stay torchvision's and those of runs trained before the option existed
        if input_norm == "imagenet":
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            scale, shift = 0.5 / std, (0.5 - mean) / std
        else:
            scale, shift = torch.ones(3), torch.zeros(3)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

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
                f"state dict with torchvision parameter names, or {BACKBONE_FIX}.")
        self.load_state_dict(state)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.input_norm != "symmetric":
            images = images * self.input_scale + self.input_shift
        f0 = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3) if self.stages == 4 else f3
        return [f0, f1, f2, f3, f4]
