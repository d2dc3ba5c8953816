"""Frozen CLIP text tower (open_clip) with exactness-preserving savings (DESIGN 1.2).

Only the text tower of an open_clip model is built (no vision tower). It is frozen, always in eval
mode and run under no_grad, and it is kept out of the module tree on purpose: its weights are not
in state_dict() (checkpoints stay small; the tower is rebuilt from config), not in parameters()
(optimisers, clipping and DDP never see it), while .to()/.cuda()/.half() still move it.

Savings, none of which changes a single output value:
- tokens: a per-word token cache (cliphand3d.models.tokens), exact for plain ASCII prompts;
- dedup: identical prompts in a batch are encoded once;
- cache: a bounded LRU of prompt -> embedding across batches;
- truncate_to_eot: the causal tower runs only up to the longest EOT position in the batch. Under a
  causal mask position i attends to positions <= i only, so padding after the EOT token cannot
  change the EOT feature, which is the only one read.

A random tower (pretrained=None) is initialised from a fixed seed, so rebuilding it from config
(checkpoint reload, every DDP rank) gives the same weights.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, PretrainedWeightsError
from .pretrained import open_clip_weights, read_state_dict
from .tokens import CachedTokenizer

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TOWER_KEYS = ("layers", "width", "heads", "context_length", "embed_dim", "mlp_ratio")
# Names of the text tower's tensors in open_clip CLIP / OpenAI checkpoints and in TextTransformer.
_TOWER_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


# --------------------------------------------------------------------------- building
def _model_config(model_name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(
            f"text.model_name={model_name!r} is not an open_clip model config; known e.g. ViT-B-32, "
            f"ViT-B-16, ViT-L-14 (open_clip.list_models())"
        )
    return cfg


def _text_cfg(model_name: str, tower: Mapping | None) -> tuple[dict, int, bool]:
    """(text_cfg, embed_dim, model quick_gelu) with the `tower` overrides applied."""
    cfg = _model_config(model_name)
    text_cfg = dict(cfg["text_cfg"])
    embed_dim = int(cfg["embed_dim"])
    overrides = dict(tower or {})
    unknown = sorted(set(overrides) - set(TOWER_KEYS))
    if unknown:
        raise ConfigError(f"text.tower has unknown keys {unknown}; allowed: {list(TOWER_KEYS)}")
    if "embed_dim" in overrides:
        embed_dim = int(overrides.pop("embed_dim"))
    text_cfg.update(overrides)
    if text_cfg.get("hf_model_name"):
        raise ConfigError(
            f"text.model_name={model_name!r} has a Hugging Face text tower; TextEncoder supports the "
            f"CLIP-style causal text towers (e.g. ViT-B-32)"
        )
    width, heads = int(text_cfg.get("width", 512)), int(text_cfg.get("heads", 8))
    if width % heads != 0:
        raise ConfigError(f"text.tower: heads={heads} must divide width={width}")
    return text_cfg, embed_dim, bool(cfg.get("quick_gelu", False))


def tower_context_length(model_name: str, tower: Mapping | None = None) -> int:
    """Token context of the tower TextEncoder(model_name, tower=tower) builds, without building it."""
    return int(_text_cfg(model_name, tower)[0].get("context_length", 77))


def build_text_tower(text_cfg: dict, embed_dim: int, quick_gelu: bool, seed: int) -> nn.Module:
    """open_clip's text tower alone, initialised from `seed` without touching the global RNG."""
    from open_clip.model import _build_text_tower  # the same builder open_clip's CLIP uses

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
    if getattr(tower, "attn_mask", None) is None or getattr(tower, "cls_emb", None) is not None \
            or tower.pool_type not in ("argmax", "eos"):
        raise ConfigError(
            "TextEncoder needs a causal text tower pooled at the EOT token (open_clip pool_type "
            f"'argmax' or 'eos', no class token); got pool_type={tower.pool_type!r}"
        )
    return tower


# --------------------------------------------------------------------------- pretrained weights
# (found by models/pretrained.py: local files, caches, downloads when online)
SAVE_FIX = "save the CLIP (or text tower) weights with torch.save(model.state_dict(), path)"


def text_tower_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's tensors from a full CLIP checkpoint (flat or CustomTextCLIP `text.` keys)
    or from a text-tower-only state dict."""
    if any(k.startswith("text.") for k in state):
        state = {k[5:]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.startswith(_TOWER_PREFIXES)}


def load_tower_weights(tower: nn.Module, path: str, allow_torchscript: bool = False) -> None:
    sd = text_tower_state(read_state_dict(path, key="text.pretrained", fix=SAVE_FIX,
                                          allow_torchscript=allow_torchscript))
    try:
        tower.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PretrainedWeightsError(
            f"text.pretrained={path!r} does not match the text tower built from text.model_name / "
            f"text.tower: {e}"
        ) from None


# --------------------------------------------------------------------------- the module
class TextEncoder(nn.Module):
    """Frozen open_clip text tower: list of prompts -> (B, embed_dim) unnormalised EOT features,
    the same values as open_clip's encode_text.

    model_name: open_clip model config ("ViT-B-32").
    pretrained: None (random weights from `seed`), an open_clip tag ("openai") or a local file.
    tower: overrides of the text config: layers, width, heads, context_length, embed_dim, mlp_ratio.
    embed_dim: optional check of the output width (lets configs interpolate ${text.embed_dim}).
    quick_gelu: None = from the tag / model config. OpenAI weights need True.
    cache_size: LRU entries (prompt -> embedding); 0 disables the cache.
    dedup: encode identical prompts of a batch once.
    truncate_to_eot: run the tower only up to the batch's longest EOT position.
    precision: "auto" (bf16, else fp16, autocast on CUDA; fp32 on CPU), "fp32", "fp16", "bf16".
    seed: initialisation seed of a random tower.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        tower: Mapping | None = None,
        embed_dim: int | None = None,
        quick_gelu: bool | None = None,
        cache_size: int = 4096,
        dedup: bool = True,
        truncate_to_eot: bool = True,
        precision: str = "auto",
        seed: int = 0,
    ):
        super().__init__()
        import open_clip

        if precision not in PRECISIONS:
            raise ConfigError(f"text.precision={precision!r} is unknown; use one of {list(PRECISIONS)}")
        if cache_size < 0:
            raise ConfigError(f"text.cache_size must be >= 0 (0 disables the cache), got {cache_size}")
        text_cfg, built_dim, model_quick_gelu = _text_cfg(model_name, tower)
        if embed_dim is not None and int(embed_dim) != built_dim:
            raise ConfigError(
                f"text.embed_dim={embed_dim} but text.model_name={model_name!r} with text.tower gives "
                f"{built_dim}; set text.tower.embed_dim or fix text.embed_dim"
            )
        path, pcfg = (None, {}) if pretrained is None else open_clip_weights(model_name, str(pretrained))
        if quick_gelu is None:
            quick_gelu = bool(pcfg.get("quick_gelu", model_quick_gelu))
        tower_module = build_text_tower(text_cfg, built_dim, quick_gelu, seed)
        if path is not None:
            load_tower_weights(tower_module, path, allow_torchscript=bool(pcfg))
        tower_module.requires_grad_(False)
        tower_module.eval()
        # Plain attribute, not a registered submodule: see the module docstring.
        object.__setattr__(self, "_tower", tower_module)

        self.model_name = model_name
        self.pretrained = pretrained
        self.embed_dim = built_dim
        self.context_length = int(tower_module.context_length)
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)
        self.tokenize = CachedTokenizer(self.tokenizer, self.context_length)
        self.cache_size = int(cache_size)
        self.dedup = bool(dedup)
        self.truncate_to_eot = bool(truncate_to_eot)
        self.precision = precision
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # -- frozen tower plumbing
    @property
    def tower(self) -> nn.Module:
        return self._tower

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._tower._apply(fn, recurse)
        self.clear_cache()  # device or dtype may have changed
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._tower.eval()
        return self

    # -- cache
    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def clear_cache(self) -> None:
        self._cache.clear()

    def reset_stats(self) -> None:
        self.hits = self.misses = 0

    # -- encoding
    def _autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.precision == "auto":
            if device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (EOT) token of each row, by the tower's own pooling rule."""
        if self._tower.pool_type == "eos":
            return (tokens == self._tower.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary

    def encode_tokens(self, tokens: torch.Tensor, truncate_to_eot: bool | None = None) -> torch.Tensor:
        """(N, context_length) token ids -> (N, embed_dim) float32 features."""
        t = self._tower
        device = t.token_embedding.weight.device
        tokens = tokens.to(device)
        eot = self.eot_positions(tokens)
        trunc = self.truncate_to_eot if truncate_to_eot is None else truncate_to_eot
        length = int(eot.max()) + 1 if trunc else tokens.shape[1]
        tokens = tokens[:, :length]
        dtype = self._autocast_dtype(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            cast = t.transformer.get_cast_dtype()
            x = t.token_embedding(tokens).to(cast) + t.positional_embedding[:length].to(cast)
            x = t.transformer(x, attn_mask=t.attn_mask[:length, :length])
            x = t.ln_final(x)
            x = x[torch.arange(x.shape[0], device=device), eot]
            if t.text_projection is not None:
                x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
        return x.float()

    def _encode_strings(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(prompts))

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("TextEncoder expects a list of prompt strings (one per sample)")
        prompts = list(prompts)
        device = self._tower.token_embedding.weight.device
        if not prompts:
            return torch.zeros(0, self.embed_dim, device=device)
        with torch.no_grad():
            keys = list(dict.fromkeys(prompts)) if self.dedup else prompts
            rows: list[torch.Tensor | None] = [None] * len(keys)
            todo: list[int] = []
            for i, key in enumerate(keys):
                hit = self._cache.get(key) if self.cache_size else None
                if hit is None:
                    todo.append(i)
                else:
                    self._cache.move_to_end(key)
                    rows[i] = hit
            if self.cache_size:
                self.hits += len(keys) - len(todo)
                self.misses += len(todo)
            if todo:
                fresh = self._encode_strings([keys[i] for i in todo])
                for i, row in zip(todo, fresh):
                    rows[i] = row
                    if self.cache_size:
                        self._store(keys[i], row)
            out = torch.stack([r.to(device) for r in rows])
            if self.dedup and len(keys) < len(prompts):
                where = {k: i for i, k in enumerate(keys)}
                out = out[torch.tensor([where[p] for p in prompts], device=device)]
        return out

    def _store(self, key: str, row: torch.Tensor) -> None:
        if row.is_inference():
            # An inference-mode tensor (validation under torch.inference_mode) could not be used
            # later in a graph that saves it for backward; keep an ordinary copy instead.
            with torch.inference_mode(False):
                row = row.clone()
        else:
            row = row.clone()  # own storage: `fresh` is freed, the cache keeps one row
        self._cache[key] = row
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def encode_axes(self, prompts: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
        """{axis: list of B prompts} -> {axis: (B, embed_dim)} in one tower pass (shared dedup)."""
        axes = list(prompts)
        flat = [p for a in axes for p in prompts[a]]
        feats = self(flat)
        out, start = {}, 0
        for a in axes:
            n = len(prompts[a])
            out[a] = feats[start:start + n]
            start += n
        return out

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, embed_dim={self.embed_dim}, "
                f"cache_size={self.cache_size}, dedup={self.dedup}, truncate_to_eot={self.truncate_to_eot}, "
                f"precision={self.precision!r} (frozen tower not in state_dict)")
