"""The embedding network: timm backbone -> GeM/avg pooling -> neck -> L2-normalised embedding.

``build_model(cfg["model"])`` builds it from a model config (keys: backbone, pretrained, img_size,
emb_dim, dropout, pool, gem_p, drop_path); ``load_checkpoint(path)`` rebuilds a trained one.
Margin heads (ArcFace, ...) live with the losses and are never part of the model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .handoff import HandoffError
from .errors import PipelineError
from . import weights

POOLS = ("gem", "avg")


class ModelConfigError(PipelineError, ValueError):
    """A model config value that cannot be built; the message names the key."""


class GeM(nn.Module):
    """Generalised-mean pooling ``(mean x^p)^(1/p)`` with a learnable ``p`` (p=1: average pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p)  # float32 even under AMP: x^p overflows fp16
        return F.adaptive_avg_pool2d(x, 1).pow(1.0 / p).flatten(1)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class EmbeddingNet(nn.Module):
    """``forward(x)`` -> (B, emb_dim) unit vectors. ``x`` is normalised with ``.mean``/``.std``."""

    def __init__(self, backbone: nn.Module, emb_dim: int, pool: str = "gem", gem_p: float = 3.0,
                 dropout: float = 0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), img_size=224, cfg=None):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = int(backbone.num_features)
        self.pool = GeM(gem_p) if pool == "gem" else AvgPool()
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feat_dim, emb_dim), nn.BatchNorm1d(emb_dim))
        nn.init.kaiming_normal_(self.neck[1].weight, mode="fan_out")
        nn.init.zeros_(self.neck[1].bias)
        self.emb_dim = int(emb_dim)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.img_size = img_size
        self.cfg = dict(cfg or {})

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map pooled to (B, feat_dim)."""
        return self.pool_map(self.backbone.forward_features(x))

    def pool_map(self, f: torch.Tensor) -> torch.Tensor:
        """A backbone feature map (B, C, H, W), or tokens (B, N, C), pooled to (B, feat_dim)."""
        if f.ndim == 3:  # token models (B, N, C): pool over tokens
            f = f.transpose(1, 2).unsqueeze(-1)
        return self.pool(f)

    def embed_map(self, f: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The embedding of a backbone feature map: pooling, neck, L2 (common/trunk.py trains
        the top stages on cached trunk outputs through this)."""
        e = self.neck(self.pool_map(f).to(self.neck[1].weight.dtype))
        return F.normalize(e.float(), dim=1) if normalize else e

    def forward(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.embed_map(self.backbone.forward_features(x), normalize)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters for discriminative learning rates: backbone vs. neck (pooling included)."""
        return {"backbone": list(self.backbone.parameters()),
                "neck": list(self.pool.parameters()) + list(self.neck.parameters())}


class PooledBackbone(nn.Module):
    """An EmbeddingNet's backbone + pooling only, L2-normalised: the untrained-neck baseline
    (``top``: only the backbone's top stages, for inputs that are cached trunk outputs)."""

    def __init__(self, net, top=None):
        super().__init__()
        self.net, self.top = net, top
        self.mean, self.std, self.img_size, self.emb_dim = net.mean, net.std, net.img_size, net.feat_dim

    def forward(self, x):
        return self.embed_map(self.net.backbone.forward_features(x))

    def embed_map(self, f):
        return nn.functional.normalize(self.net.pool_map(self.top(f) if self.top is not None else f).float(), dim=1)


def build_model(model_cfg: dict) -> EmbeddingNet:
    """Build an EmbeddingNet from a model config and load the weights ``pretrained`` names."""
    import timm

    cfg = dict(model_cfg)
    name = str(cfg["backbone"])
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        raise ModelConfigError(f"model.backbone={name!r} is not a timm model"
                               + (f"; did you mean {', '.join(close)}?" if close else ""))
    pool = str(cfg["pool"]).lower()
    if pool not in POOLS:
        raise ModelConfigError(f"model.pool={pool!r}; expected one of {POOLS}")
    emb_dim = int(cfg["emb_dim"])
    dropout = float(cfg["dropout"] or 0.0)
    if emb_dim < 1 or not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"model.emb_dim must be >= 1 and model.dropout in [0, 1) (got {emb_dim}, {dropout})")
    kind = weights.pretrained_kind(cfg["pretrained"])

    kwargs = {"num_classes": 0, "global_pool": ""}
    if float(cfg["drop_path"] or 0.0) > 0:
        kwargs["drop_path_rate"] = float(cfg["drop_path"])
    if kind == "hub":
        weights.check_hub(name)  # seconds, not minutes of retries, when the hub is out of reach
        try:
            backbone = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
            raise weights.WeightsError(
                f"model.pretrained=hub: timm could not get weights for {name!r} ({type(e).__name__}: {e}). "
                f"Set offline: false with internet access, or use pretrained: imagenet (efficientnet-lite) or none"
            ) from None
    else:
        backbone = timm.create_model(name, pretrained=False, **kwargs)
    if kind == "imagenet":
        weights.load_offline_imagenet(backbone, name)
        mean, std = weights.OFFLINE_MEAN_STD
    else:
        mean, std = backbone.pretrained_cfg.get("mean"), backbone.pretrained_cfg.get("std")
    model = EmbeddingNet(backbone, emb_dim, pool=pool, gem_p=float(cfg["gem_p"]), dropout=dropout,
                         mean=mean or (0.5,) * 3, std=std or (0.5,) * 3, img_size=cfg["img_size"], cfg=cfg)
    if kind == "path":
        weights.load_model_weights(model, cfg["pretrained"], name)
    return model


def load_checkpoint(path, map_location="cpu") -> tuple[EmbeddingNet, dict]:
    """Rebuild the model a training checkpoint describes and load its weights (eval mode)."""
    path = Path(path)
    if not path.exists():
        raise HandoffError(f"checkpoint {path} does not exist (train the member first: make 04)")
    try:  # our own artifact: it also holds optimizer state and plain-python config/metrics
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise weights.WeightsError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model" not in (ckpt.get("member") or {}):
        raise weights.WeightsError(f"{path} is not a training checkpoint (needs 'model' and 'member.model')")
    model_cfg = dict(ckpt["member"]["model"], pretrained="none")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise weights.WeightsError(f"checkpoint {path} does not match its own model config: {e}") from None
    if ckpt.get("output") == "pooled":  # a frozen-backbone fallback (train.below_baseline: frozen)
        return PooledBackbone(model).eval(), ckpt
    return model.eval(), ckpt
