"""Everything that trains, in one module so DDP sees every trainable parameter: the vision model,
the frozen text encoder with its trainable per-axis adapters, and the loss (which owns the logit scales).

The text branch lives here and not in `CLIPHand3D`: it exists only while training (DESIGN 1.2).
"""
from __future__ import annotations

from torch import nn


class TrainingModule(nn.Module):
    def __init__(self, model: nn.Module, criterion: nn.Module, text_encoder: nn.Module | None = None,
                 adapters: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        use_text = getattr(criterion, "uses_text", False)
        if use_text and (text_encoder is None or adapters is None):
            raise ValueError("the contrastive loss is on but no text encoder/adapters were given; "
                             "set text=... or turn the term off with loss.weights.clip=0")
        self.text_encoder = text_encoder if use_text else None
        self.adapters = adapters if use_text else None

    def forward(self, batch: dict):
        use_text = self.text_encoder is not None
        outputs = self.model(batch["image"], pose_features=use_text)
        text_feats = None
        if use_text:
            prompts = batch["prompts"]
            missing = [a for a in outputs["pose_feats"] if a not in prompts]
            if missing:
                raise ValueError(f"no prompts for axes {missing}: the prompt config's axes must include the "
                                 "model's axes (prompt.axes / model.axes)")
            # one pass over all axes, so identical sentences are encoded once across axes too
            raw = self.text_encoder.encode_axes({a: list(prompts[a]) for a in outputs["pose_feats"]})
            text_feats = self.adapters(raw)
        terms = self.criterion(outputs, batch, text_feats=text_feats)
        return outputs, terms
