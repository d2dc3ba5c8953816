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

import hashlib
import os
import socket
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from ..errors import ConfigError
from .tokens import CachedTokenizer

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TOWER_KEYS = ("layers", "width", "heads", "context_length", "embed_dim", "mlp_ratio")
# Names of the text tower's tensors in open_clip CLIP / OpenAI checkpoints and in TextTransformer.
_TOWER_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_FIX = (
    "use random text weights with the override text.pretrained=null, or download the checkpoint on a "
    "machine with internet and pass its local path: text.pretrained=/path/to/checkpoint.pt"
)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained text weights cannot be found or read. The message names the override that fixes it."""


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
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached_tag_file(pcfg: dict) -> str | None:
    """The tag's weights if already in open_clip's (URL) or the Hugging Face cache; never downloads."""
    url = pcfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        # open_clip writes downloads in place, so an interrupted one leaves a partial file behind.
        expected = url.split("/")[-2] if "openaipublic" in url else ""
        if path.is_file() and (not expected or _sha256(path).startswith(expected)):
            return str(path)
    hub = pcfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            return None
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        # open_clip's convention: "org/repo/" means the default file names, "org/repo/file" one file.
        repo, filename = os.path.split(hub)
        for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            try:
                return hf_hub_download(repo_id=repo, filename=name, local_files_only=True)
            except Exception:  # not cached: the caller reports it
                continue
    return None


def _download_host(pcfg: dict) -> str | None:
    """The host open_clip will download from (the Hub is preferred when installed)."""
    try:
        import huggingface_hub  # noqa: F401

        if pcfg.get("hf_hub"):
            return "huggingface.co"
    except ImportError:
        pass
    return urlparse(pcfg.get("url", "")).hostname


def _reachable(host: str, timeout: float = 3.0) -> bool:
    # The Hub client retries for about a minute before failing; a quick probe fails in seconds.
    # Behind a proxy a direct connection says nothing, so trust the download to report instead.
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(model_name: str, pretrained: str) -> tuple[str, dict]:
    """A local file for `pretrained` (a path or an open_clip tag) and the tag's config ({} for paths).

    Downloads only when online; offline (HF_HUB_OFFLINE=1) or on any download failure raises ONE
    PretrainedWeightsUnavailable naming the fix, never a raw network traceback.
    """
    import open_clip
    from open_clip import pretrained as oc_pretrained

    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        return str(path), {}
    pcfg = oc_pretrained.get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        if _looks_like_path(pretrained):
            raise PretrainedWeightsUnavailable(
                f"text.pretrained={pretrained!r}: file not found. Fix: give an existing checkpoint path, "
                f"or text.pretrained=null for random text weights"
            )
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise PretrainedWeightsUnavailable(
            f"text.pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name} "
            f"(tags: {tags}). Fix: {_FIX}"
        )
    cached = _cached_tag_file(pcfg)
    if cached:
        return cached, pcfg
    where = f"open_clip tag {pretrained!r} of {model_name}"
    if _offline():
        raise PretrainedWeightsUnavailable(
            f"text encoder: pretrained weights ({where}) are not in the local cache and HF_HUB_OFFLINE=1 "
            f"forbids downloading. Fix: {_FIX}"
        )
    host = _download_host(pcfg)
    if host and not _reachable(host):
        raise PretrainedWeightsUnavailable(
            f"text encoder: pretrained weights ({where}) are not in the local cache and {host} cannot be "
            f"reached (no network?). Fix: {_FIX}"
        )
    try:
        return oc_pretrained.download_pretrained(pcfg), pcfg
    except Exception as e:  # network, hub and checksum errors all mean the same thing to the user
        raise PretrainedWeightsUnavailable(
            f"text encoder: could not download pretrained weights ({where}): {type(e).__name__}: {e}. "
            f"Fix: {_FIX}"
        ) from None


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: str, allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or torch.load(weights_only=True) of a state dict or of
    {"state_dict": ...}. TorchScript archives (OpenAI's own .pt) only when `allow_torchscript`:
    loading one runs code, so only official tag downloads (checksummed by open_clip) are trusted."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    elif _is_torchscript(path):
        if not allow_torchscript:
            raise PretrainedWeightsUnavailable(
                f"text.pretrained={path!r} is a TorchScript archive, which is not loaded from a path "
                f"(it executes code). Fix: convert it once to a state dict: torch.save(torch.jit.load(p, "
                f"map_location='cpu').state_dict(), 'clip_state_dict.pt') and pass that file"
            )
        obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PretrainedWeightsUnavailable(
                f"text.pretrained={path!r}: not a readable state dict ({type(e).__name__}: {e}). Fix: "
                f"save the CLIP (or text tower) weights with torch.save(model.state_dict(), path)"
            ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsUnavailable(f"text.pretrained={path!r}: expected a state dict, got {type(obj).__name__}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def text_tower_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's tensors from a full CLIP checkpoint (flat or CustomTextCLIP `text.` keys)
    or from a text-tower-only state dict."""
    if any(k.startswith("text.") for k in state):
        state = {k[5:]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.startswith(_TOWER_PREFIXES)}


def load_tower_weights(tower: nn.Module, path: str, allow_torchscript: bool = False) -> None:
    sd = text_tower_state(read_state_dict(path, allow_torchscript))
    try:
        tower.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PretrainedWeightsUnavailable(
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
        path, pcfg = (None, {}) if pretrained is None else resolve_pretrained(model_name, str(pretrained))
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
