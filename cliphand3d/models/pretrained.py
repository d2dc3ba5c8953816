"""Where pretrained weights come from: local files, the torch hub / open_clip / Hugging Face caches, and
downloads only when the network is there.

`model.pretrained` (the ImageNet backbone) and `text.pretrained` (the CLIP text tower) are each None, a tag
(a torchvision weight name such as "IMAGENET1K_V1", an open_clip tag such as "openai") or a local file. A
tag is looked up in its cache first; the network is touched only when the environment allows it
(`HF_HUB_OFFLINE` / `TORCH_HUB_OFFLINE` unset) and a quick probe says the host answers, so an offline run
fails at once with one PretrainedWeightsError naming the override that fixes it, never a network traceback.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import PretrainedWeightsError
from ..serialization import load_torch_file

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
BACKBONE_FIX = "set model.pretrained=null (random init) or model.pretrained=/path/to/state_dict.pth (a local file)"
TEXT_FIX = ("use random text weights with the override text.pretrained=null, or download the checkpoint on a "
            "machine with internet and pass its local path: text.pretrained=/path/to/checkpoint.pt")


# --------------------------------------------------------------------------- the network
def offline() -> bool:
    """Does the environment forbid downloads (HF_HUB_OFFLINE or TORCH_HUB_OFFLINE set to a true value)?"""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_VARS)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Does the host of `url` accept a connection within `timeout` seconds? Hub clients retry for about a
    minute before failing; this fails in seconds. It runs in a daemon thread, so a hanging name lookup is
    bounded too. Behind a proxy a direct connection says nothing: then the download reports instead."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parts = urlparse(url if "//" in url else f"https://{url}")
    ok = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return ok.is_set()


# --------------------------------------------------------------------------- weight files
def looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(WEIGHT_SUFFIXES)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: str | os.PathLike, *, key: str, fix: str,
                    allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """A weight file's tensors: safetensors, or a torch file (weights only) holding a state dict or
    {"state_dict": ...}; a DDP "module." prefix is dropped. TorchScript archives only when
    `allow_torchscript` (loading one runs code: only official tag downloads, checksummed by open_clip).
    `key` (e.g. "model.pretrained") and `fix` name the override in the errors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    elif _is_torchscript(path):
        if not allow_torchscript:
            raise PretrainedWeightsError(
                f"{key}={str(path)!r} is a TorchScript archive, which is not loaded from a path (it executes "
                "code). Fix: convert it once to a state dict: torch.save(torch.jit.load(p, map_location='cpu')"
                ".state_dict(), 'state_dict.pt') and pass that file")
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            obj = load_torch_file(path)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise PretrainedWeightsError(f"{key}={str(path)!r}: not a readable state dict ({type(e).__name__}: "
                                         f"{e}). Fix: {fix}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{key}={str(path)!r}: expected a state dict (name -> tensor), got "
                                     f"{type(obj).__name__}. Fix: {fix}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


# --------------------------------------------------------------------------- torchvision (model.pretrained)
def torchvision_weights(name: str, pretrained: str | os.PathLike) -> tuple[dict, str]:
    """(state dict, where it came from) of ResNet `name` for a local file or a torchvision weight tag."""
    import torchvision  # slow to import; the backbone that asks has imported it already

    text = str(pretrained)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return read_state_dict(path, key="model.pretrained", fix=BACKBONE_FIX), f"local file {path}"
    if os.sep in text or path.suffix in WEIGHT_SUFFIXES:
        raise PretrainedWeightsError(f"model.pretrained={text!r}: no such file; {BACKBONE_FIX}")
    tags = torchvision.models.get_model_weights(name)
    if text not in tags.__members__:
        raise PretrainedWeightsError(
            f"model.pretrained={text!r} is neither a file nor a torchvision tag for {name} "
            f"(tags: {sorted(tags.__members__)}); {BACKBONE_FIX}")
    weights = tags[text]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return read_state_dict(cached, key="model.pretrained", fix=BACKBONE_FIX), f"torch hub cache {cached}"
    if offline() or not reachable(weights.url):
        raise PretrainedWeightsError(
            f"model.pretrained={text!r}: {name} weights {weights} are not in the torch hub "
            f"cache ({cached}) and {weights.url} cannot be reached (offline); {BACKBONE_FIX}")
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # noqa: BLE001 - network failures surface as many exception types
        raise PretrainedWeightsError(
            f"model.pretrained={text!r}: downloading {weights.url} failed "
            f"({type(err).__name__}: {err}); {BACKBONE_FIX}") from None
    return state, f"torchvision {weights}"


# --------------------------------------------------------------------------- open_clip (text.pretrained)
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
            except Exception:  # noqa: BLE001 - not cached: the caller reports it
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


def open_clip_weights(model_name: str, pretrained: str) -> tuple[str, dict]:
    """A local file for `pretrained` (a path or an open_clip tag of `model_name`) and the tag's config
    ({} for a path). Downloads only when online."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        return str(path), {}
    pcfg = oc_pretrained.get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        if looks_like_path(pretrained):
            raise PretrainedWeightsError(
                f"text.pretrained={pretrained!r}: file not found. Fix: give an existing checkpoint path, "
                f"or text.pretrained=null for random text weights")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise PretrainedWeightsError(
            f"text.pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name} "
            f"(tags: {tags}). Fix: {TEXT_FIX}")
    cached = _cached_tag_file(pcfg)
    if cached:
        return cached, pcfg
    where = f"open_clip tag {pretrained!r} of {model_name}"
    if offline():
        raise PretrainedWeightsError(
            f"text encoder: pretrained weights ({where}) are not in the local cache and HF_HUB_OFFLINE=1 "
            f"forbids downloading. Fix: {TEXT_FIX}")
    host = _download_host(pcfg)
    if host and not reachable(host):
        raise PretrainedWeightsError(
            f"text encoder: pretrained weights ({where}) are not in the local cache and {host} cannot be "
            f"reached (no network?). Fix: {TEXT_FIX}")
    try:
        return oc_pretrained.download_pretrained(pcfg), pcfg
    except Exception as e:  # noqa: BLE001 - network, hub and checksum errors all mean the same to the user
        raise PretrainedWeightsError(
            f"text encoder: could not download pretrained weights ({where}): {type(e).__name__}: {e}. "
            f"Fix: {TEXT_FIX}") from None
