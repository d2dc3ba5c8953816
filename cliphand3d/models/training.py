"""Everything that trains, in one module so DDP sees every trainable parameter: the vision model,
the frozen text encoder with its trainable per-axis adapters, and the loss (which owns the logit scales).

The text branch lives here and not in `CLIPHand3D`: it exists only while training (DESIGN 1.2).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError


class TrainingModule(nn.Module):
    def __init__(self, model: nn.Module, criterion: nn.Module, text_encoder: nn.Module | None = None,
                 adapters: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        use_text = getattr(criterion, "uses_text", False)
        if use_text and (text_encoder is None or adapters is None):
            raise ConfigError("the contrastive loss is on but no text encoder/adapters were given; "
                             "set text=... or turn the term off with loss.weights.clip=0")
        self.text_encoder = text_encoder if use_text else None
        self.adapters = adapters if use_text else None
        self.frozen = self._freeze_untrained()

    def parameter_terms(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefix -> the loss terms that train it: the model's map plus the text side
        (each axis's adapter and logit scale serve only that axis's contrastive term)."""
        terms = {f"model.{k}": v for k, v in self.model.parameter_terms().items()}
        if self.adapters is not None:
            terms.update({f"adapters.heads.{a}": (f"clip_{a}",) for a in self.adapters.axes})
        contrastive = getattr(self.criterion, "contrastive", None)
        if contrastive is not None:
            terms.update({f"criterion.contrastive.logit_scale.{a}": (f"clip_{a}",) for a in contrastive.axes})
        return terms

    def _freeze_untrained(self) -> list[str]:
        """Freeze every trainable parameter that only zero-weighted terms reach; returns their names.

        Why: DDP (without find_unused_parameters, which would cost every step) waits for a gradient
        of every trainable parameter and fails on the next step when one never comes.
        """
        terms = self.parameter_terms()
        frozen = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            owners = [k for k in terms if name == k or name.startswith(k + ".")]
            if not owners:
                raise ValueError(f"parameter {name} has no entry in parameter_terms() (the model's "
                                 "CLIPHand3D.parameter_terms or TrainingModule.parameter_terms): add the loss "
                                 "terms whose gradient reaches it, so a zero weight can freeze it")
            if not any(self.criterion.weighs(t) for t in terms[max(owners, key=len)]):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen

    def forward(self, batch: dict):
        use_text = self.text_encoder is not None
        outputs = self.model(batch["image"], pose_features=use_text)
        text_feats = None
        if use_text:
            prompts = batch["prompts"]
            missing = [a for a in outputs["pose_feats"] if a not in prompts]
            if missing:
                raise ConfigError(f"no prompts for axes {missing}: the prompt config's axes must include the "
                                 "model's axes (prompt.axes / model.axes)")
            # one pass over all axes, so identical sentences are encoded once across axes too
            raw = self.text_encoder.encode_axes({a: list(prompts[a]) for a in outputs["pose_feats"]})
            text_feats = self.adapters(raw)
        terms = self.criterion(outputs, batch, text_feats=text_feats)
        return outputs, terms


class TextBranch:
    """prompts {axis: [str]} -> adapted text features (the frozen encoder, then the trained adapters in eval
    mode): what train-time validation and eval.py score pose -> text retrieval with."""

    def __init__(self, encoder, adapters):
        self.encoder, self.adapters = encoder, adapters

    def __call__(self, prompts: dict) -> dict:
        was = self.adapters.training
        self.adapters.eval()
        try:
            return self.adapters(self.encoder.encode_axes(prompts))
        finally:
            self.adapters.train(was)
