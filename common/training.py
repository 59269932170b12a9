"""The one training loop of stages 03, 04 (and 05's retrain): metric learning on PK batches.

``fit(member, train_df, val_df, out_dir)`` trains a member (see common/config.member_config):

* model from common/models (``init`` = a checkpoint to start from, e.g. stage 03's), margin head
  and losses from common/losses, PK batches from common/samplers, augmentation from
  common/augment, mirrored flukes as new identities (common/datasets);
* AdamW (or Adam) with weight decay except on biases/norm layers; discriminative learning rates:
  backbone ``lr * backbone_lr_mult``, neck ``lr``, head ``lr * head_lr_mult``; linear warmup then
  cosine to ``min_lr_frac`` (or SGDR warm restarts), stepped every batch; gradient clipping;
  mixed precision and channels-last on CUDA; progressive resizing ``[[size, epochs], ...]``;
* the margin head starts at its classes' mean embeddings (``imprint``); ``freeze_bn`` keeps the
  backbone's BatchNorm statistics fixed, which short runs with small PK batches need (CPU demo);
* validation on the local split every ``val_every`` epochs (MAP@20, MAP@5, top-1, hit@20; the
  starting weights are scored as epoch 0), ``best.pt`` by ``train.metric``, ``last.pt`` every
  epoch; ``resume=True`` continues from last.pt (weights, optimiser, schedule, RNG) and ends
  where an uninterrupted run ends;
* out_dir gets best.pt, last.pt, history.csv, curves.png, config.json and tb/ (TensorBoard);
* under torchrun (common/distributed.py) the model and the margin head train as one
  DistributedDataParallel module (:class:`TrainStep`: gradients of both all-reduced, so they stay
  identical on every rank), each rank takes its share of the identities of every PK batch (the
  global batch stays P x K: the same steps per epoch as one process), ``train.sync_bn`` shares
  BatchNorm statistics across GPUs; validation embeds a share of the images on each rank; rank 0
  writes every artifact and its epoch row (scores, time) decides for all ranks.

The schedule lives in common/schedule.py, the learning-rate finder in common/lr_finder.py, the
frozen trunk and its feature cache in common/trunk.py, member resolution in common/members.py.
"""
from __future__ import annotations

import copy
import math
import random
import shutil
import time
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .config import ConfigError
from .augment import build_transforms
from .datasets import FlukeDataset, encode_labels, hflip_mode, make_loader
from .inference import embed_images
from .io import save_figure, save_torch, write_csv, write_json
from .losses import MetricLoss
from .models import PooledBackbone, build_model
from .retrieval import evaluate_embeddings
from .runtime import resolve_device, seed_everything
from .samplers import DistributedPKSampler
from .schedule import lr_factor, resolve_phases, size_at, trim_phases
from .trunk import cached_trunk, freeze, split_backbone

METRICS = ("map20", "map5", "top1", "hit20")


def scores_of(row: dict) -> dict:
    """The validation scores of a history row: METRICS, query counts, seen/unseen splits.

    >>> scores_of({"epoch": 1, "loss": 2.0, "top1": 0.5, "top1_unseen": 0.25, "n_queries": 8})
    {'top1': 0.5, 'top1_unseen': 0.25, 'n_queries': 8}
    """
    return {k: v for k, v in row.items() if k.split("_")[0] in (*METRICS, "n")}


# ---- model, loss, optimiser -------------------------------------------------------------------
def param_groups(model, loss_fn: nn.Module, train_cfg: dict) -> list[dict]:
    """Optimiser groups: backbone / neck / head x (decay, no decay on biases and norm layers);
    each group carries its ``lr_mult`` relative to ``train.lr``."""
    mults = {"backbone": float(train_cfg["backbone_lr_mult"]), "neck": 1.0,
             "head": float(train_cfg["head_lr_mult"])}
    parts = dict(model.param_groups(), head=list(loss_fn.parameters()))
    wd, no_bias_decay = float(train_cfg["weight_decay"]), bool(train_cfg["no_bias_decay"])
    groups = []
    for name, params in parts.items():
        params = [p for p in params if p.requires_grad]
        plain = [p for p in params if no_bias_decay and p.ndim <= 1]
        decay = [p for p in params if not (no_bias_decay and p.ndim <= 1)]
        for suffix, ps, w in (("", decay, wd), ("_no_decay", plain, 0.0)):
            if ps:
                groups.append({"params": ps, "name": name + suffix, "lr_mult": mults[name], "weight_decay": w})
    return groups


def build_optimizer(model, loss_fn: nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, loss_fn, train_cfg)
    lr = float(train_cfg["lr"])
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    kind = str(train_cfg["optimizer"]).lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ConfigError(f"train.optimizer must be 'adamw' or 'adam', not {kind!r}")


class TrainStep(nn.Module):
    """The trainable model and its loss (whose margin head trains with it) as one module:
    DistributedDataParallel around it all-reduces the gradients of both. ``forward(x, y, cached)``
    -> ``(loss, parts)``; ``cached``: ``x`` are trunk features, embedded by ``top`` and the neck."""

    def __init__(self, model, loss_fn: MetricLoss, top, amp_dtype):
        super().__init__()
        self.model, self.loss_fn, self.top, self.amp_dtype = model, loss_fn, top, amp_dtype

    def forward(self, x, y, cached: bool = False):
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            emb = self.model.embed_map(self.top(x)) if cached else self.model(x)
        return self.loss_fn(emb, y)


@dataclass
class Run:
    """Everything one training run holds, as named fields (ultralytics keeps its trainer state so)."""
    model: nn.Module                  # the EmbeddingNet being trained
    loss_fn: MetricLoss               # the configured loss; its margin head trains with the model
    opt: torch.optim.Optimizer
    device: torch.device
    classes: list                     # identity names; label i is classes[i] (+ len(classes) when mirrored)
    labels: np.ndarray                # label of every training row
    flip: bool                        # mirrored photos are other identities (augment.hflip)
    channels_last: bool
    amp_dtype: object                 # None, torch.float16 or torch.bfloat16 (CUDA only)
    freeze_bn: bool
    trunk: nn.Module | None           # the frozen part of the backbone (train.trainable_blocks), else None
    top: nn.Module | None             # the trainable rest of the backbone
    cache_views: int                  # views per image in the trunk cache; 0 = train on images
    scaler: torch.amp.GradScaler
    dataset: FlukeDataset
    sampler: DistributedPKSampler     # this rank's share of every PK batch (all of it in one process)
    net: nn.Module                    # TrainStep(model, loss_fn); in DistributedDataParallel under torchrun
    cache: object = None              # the TrunkCache of the current phase, when cache_views
    cache_dir: object = None          # where trunk caches are kept between runs
    step: int = 0                     # optimisation steps so far (TensorBoard x axis)


def setup_run(member: dict, train_df: pd.DataFrame, init, device, state=None) -> Run:
    """Everything a training run needs, built from the member config (and a resume state)."""
    for col in ("path", "Id"):
        if col not in train_df.columns:
            raise ValueError(f"training table needs a {col!r} column (has {list(train_df.columns)})")
    if len(train_df) == 0:
        raise ConfigError(f"member {member['name']!r}: no training images (check stage 00's train flags)")
    tcfg = member["train"]
    labels, classes = encode_labels(train_df["Id"])
    flip = hflip_mode(member["augment"])
    counts = np.bincount(labels, minlength=len(classes))
    n_out = len(classes) * (2 if flip else 1)
    start = "none" if state is not None else (str(init) if init else member["model"]["pretrained"])
    model = build_model(dict(member["model"], pretrained=start))
    loss_fn = MetricLoss(tcfg, model.emb_dim, n_out, np.tile(counts, 2 if flip else 1))
    if state is not None:
        model.load_state_dict(state["model"])
        if loss_fn.head is not None:
            loss_fn.head.load_state_dict(state["head"])
    cuda = device.type == "cuda"
    if tcfg["sync_bn"] and distributed.is_distributed():
        if not cuda:
            raise ConfigError("train.sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel): set it false on CPU")
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # torch's SyncBatchNorm; keeps the activation of timm's BatchNormAct2d
    model.to(device)
    loss_fn.to(device)
    trunk = top = None
    if tcfg["trainable_blocks"] is not None:  # frozen trunk, trainable top (common/trunk.py)
        trunk, top = split_backbone(model.backbone, int(tcfg["trainable_blocks"]))
        freeze(trunk)
    channels_last = bool(tcfg["channels_last"])
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = None
    if cuda and tcfg["amp"]:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    K = int(tcfg["K"])
    P = int(tcfg["batch_size"]) // K if tcfg["batch_size"] else int(tcfg["P"])
    return Run(
        model=model, loss_fn=loss_fn, opt=build_optimizer(model, loss_fn, tcfg), device=device,
        net=TrainStep(model, loss_fn, top, amp_dtype),
        classes=classes, labels=labels, flip=flip, channels_last=channels_last, amp_dtype=amp_dtype,
        freeze_bn=bool(tcfg["freeze_bn"]), trunk=trunk, top=top,
        cache_views=cache_views(tcfg, len(train_df), flip) if trunk is not None and tcfg["cache_trunk"] else 0,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        dataset=FlukeDataset(train_df["path"], labels, mirror_offset=len(classes) if flip else 0),
        sampler=DistributedPKSampler(labels, max(P, 1), K, seed=int(member["seed"]), flip=flip,
                                     rank=distributed.rank(), world_size=distributed.world_size()))


def cache_views(tcfg: dict, n_train: int, flip: bool) -> int:
    """Cached views per training image and orientation: ``train.cache_views``, lowered (never
    below 1) so that the extra views - augmented and mirrored ones - stay within
    ``train.cache_budget`` trunk passes: a large training set then gets fewer views, not hours.

    >>> t = {"cache_views": 4, "cache_budget": 4000}
    >>> cache_views(t, 470, True), cache_views(t, 2900, True), cache_views(t, 2900, False), cache_views(dict(t, cache_budget=None), 2900, True)
    (4, 1, 2, 4)
    """
    views = max(1, int(tcfg["cache_views"]))
    budget = tcfg["cache_budget"]
    if budget is None:
        return views
    orient = 2 if flip else 1
    while views > 1 and n_train * (orient * views - 1) > int(budget):
        views -= 1
    return views


def train_mode(model, freeze_bn: bool = False, trunk=None) -> None:
    """``model.train()``; with ``freeze_bn`` the backbone's BatchNorm layers stay in eval mode (their
    ImageNet/stage-03 running statistics are used and kept, as metric-learning fine-tuning with
    small PK batches usually does), so training and inference see the same backbone."""
    model.train()
    if freeze_bn:
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if trunk is not None:  # a frozen trunk keeps its statistics and gives what its cache holds
        trunk.eval()


def train_transform(run, member: dict, size):
    return build_transforms(size, run.model.mean, run.model.std, train=True,
                            strength=float(member["augment"]["strength"]))


def train_step(run, x, y, lr_per_group, grad_clip) -> tuple[float, dict]:
    """One optimisation step on a batch; returns (loss, parts)."""
    for g, lr in zip(run.opt.param_groups, lr_per_group):
        g["lr"] = lr
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss, parts = run.net(x, y, run.cache is not None)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} (parts {parts}); lower train.lr or check the data")
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if grad_clip:
        run.scaler.unscale_(run.opt)
        nn.utils.clip_grad_norm_([p for g in run.opt.param_groups for p in g["params"]], float(grad_clip))
    run.scaler.step(run.opt)
    run.scaler.update()
    return float(loss.detach()), parts


@torch.no_grad()
def imprint_head(run, size, batch_size: int = 64, num_workers: int = 0, seed: int = 0, progress: bool = True) -> None:
    """Weight imprinting (Qi et al. 2018): start every head centre at the mean embedding of its
    class (mirrored photos for mirrored classes) instead of at random, so the first steps pull the
    pretrained features toward sensible targets rather than scrambling them. Runs in train mode
    (BatchNorm batch statistics, as training sees them; this also warms up their running
    averages) with dropout off, on un-augmented images."""
    from torch.utils.data import DataLoader

    head = run.loss_fn.head
    if head is None:
        return
    n = len(run.labels)
    keys = [(i, False) for i in range(n)] + ([(i, True) for i in range(n)] if run.flip else [])
    order = np.random.default_rng(seed).permutation(len(keys))
    plain = build_transforms(size, run.model.mean, run.model.std, train=False)
    dataset = FlukeDataset(run.dataset.paths, run.labels, plain, run.dataset.mirror_offset)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=[keys[i] for i in order], num_workers=num_workers,
                        drop_last=len(keys) % batch_size == 1)  # BatchNorm cannot take a batch of one
    train_mode(run.model, run.freeze_bn, run.trunk)
    for m in run.model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    sums = torch.zeros(head.n_classes, run.model.emb_dim, device=run.device)
    if run.cache is not None:  # the plain cached view of each image (and of its mirror)
        offset = run.dataset.mirror_offset
        batches = [([keys[i] for i in order[b:b + batch_size]]) for b in range(0, len(keys), batch_size)]
        loader = [(run.cache.batch([(i, f, 0) for i, f in kb]),
                   torch.as_tensor([int(run.labels[i]) + (offset if f else 0) for i, f in kb])) for kb in batches]
    for x, y in tqdm(loader, desc="imprint head", disable=not progress, leave=False):
        x = x.to(run.device)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            emb = run.model.embed_map(run.top(x)) if run.cache is not None else run.model(x)
        sums.index_add_(0, y.to(run.device), emb.float())
    seen = sums.norm(dim=1) > 0
    centres = nn.functional.normalize(sums, dim=1).repeat_interleave(head.k, dim=0)
    if head.k > 1:  # sub-centres start near the class mean, apart enough to specialise
        centres = nn.functional.normalize(centres + 0.05 * torch.randn_like(centres), dim=1)
    keep = seen.repeat_interleave(head.k)
    head.weight[keep] = centres[keep].to(head.weight.dtype)


# ---- validation -------------------------------------------------------------------------------
def evaluate(model, val_df: pd.DataFrame, img_size, device="cpu", batch_size: int = 64, num_workers: int = 0,
             progress: bool = True, seen=None, cached=None) -> dict:
    """Local-validation scores of ``model`` over ``val_df`` (path, Id, is_query), no TTA.

    ``seen`` (identities the model trains on) adds the scores of the queries of seen and of
    unseen identities (``top1_seen``, ``map20_unseen``, ...): only the unseen ones say whether
    the embedding generalises to new individuals. ``cached = (top, plain trunk features)`` embeds
    from a :class:`common.trunk.TrunkCache` instead of the images."""
    was_training = model.training
    if cached is not None:
        emb = _embed_cached(model, *cached, batch_size=batch_size, device=device)
    else:
        emb = embed_images(model, list(val_df["path"]), img_size, batch_size=batch_size, device=device,
                           tta_hflip=False, num_workers=num_workers, progress=progress, desc="validate")
    model.train(was_training)
    ids, is_query = val_df["Id"].to_numpy(), val_df["is_query"].to_numpy().astype(bool)
    subsets = None
    if seen is not None:
        known = np.isin(ids.astype(str), np.asarray(list(seen), dtype=str))
        subsets = {"seen": known, "unseen": ~known}
    return evaluate_embeddings(emb, ids, is_query, k=20, subsets=subsets)


@torch.no_grad()
def _embed_cached(model, top, feats: torch.Tensor, batch_size: int = 64, device="cpu") -> np.ndarray:
    model.eval()
    top.eval()
    out = [model.embed_map(top(feats[i:i + batch_size].float().to(device).contiguous(memory_format=torch.channels_last))).cpu()
           for i in range(0, len(feats), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.emb_dim), np.float32)


def frozen_baseline(member: dict, val_df: pd.DataFrame, device=None, batch_size: int = 64, num_workers: int = 0,
                    progress: bool = True, seen=None) -> dict:
    """Scores of the member's backbone with its configured (e.g. ImageNet) weights and no
    training: pooled backbone features, at the member's image size. The bar training must beat."""
    device = resolve_device(device)
    model = build_model(member["model"]).to(device).eval()
    return evaluate(PooledBackbone(model), val_df, member["model"]["img_size"], device, batch_size,
                    num_workers, progress, seen=seen)


def below_baseline(metrics: dict, baseline: dict | None, metric: str = "map20") -> bool:
    """True when the trained scores fall below the untrained backbone's on ``metric``.

    >>> below_baseline({"map20": 0.03}, {"map20": 0.05}), below_baseline({"map20": 0.06}, {"map20": 0.05}), below_baseline({}, None)
    (True, False, False)
    """
    if not baseline or metric not in baseline or metric not in metrics:
        return False
    return float(metrics[metric]) < float(baseline[metric])


def warn_below_baseline(name: str, metrics: dict, baseline: dict | None, metric: str = "map20",
                        policy: str = "keep") -> bool:
    """Say loudly (stderr) when training did not help; returns :func:`below_baseline`."""
    import sys

    if policy not in ("keep", "frozen"):
        raise ConfigError(f"train.below_baseline must be 'frozen' or 'keep', not {policy!r}")
    if not below_baseline(metrics, baseline, metric):
        return False
    then = {"keep": "it is used as trained (train.below_baseline: keep)",
            "frozen": "stages 05/06 use its frozen backbone features instead (train.below_baseline: frozen)"}[policy]
    bar = "!" * 100
    print(f"{bar}\nWARNING: {name} trained to local-validation {metric} {metrics[metric]:.4f}, BELOW its untrained "
          f"backbone ({baseline[metric]:.4f}):\ntraining did not help; {then}.\nTry the cpu/full profile's recipe, "
          f"a lower train.lr, a larger model.img_size or train.trainable_blocks.\n{bar}", file=sys.stderr)
    return True


def save_frozen(member: dict, dest) -> Path:
    """A checkpoint of the member's untrained ``model.pretrained`` backbone whose embedding is its
    pooled features (load_checkpoint gives a :class:`common.models.PooledBackbone`): the fallback
    of ``train.below_baseline: frozen``."""
    model = build_model(member["model"])
    return save_torch(dest, {"model": model.state_dict(), "member": member, "output": "pooled", "classes": [],
                             "epoch": 0, "init": member["model"]["pretrained"]})


# ---- logs -------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_history(history: list[dict], dest, title: str = "") -> Path:
    """PNG with the training losses (left) and the validation scores (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    loss_cols = [c for c in df.columns if c == "loss" or c.startswith("loss_")]
    for c in loss_cols:
        d = df[["epoch", c]].dropna()
        ax_l.plot(d["epoch"], d[c], marker="o", label=c)
    ax_l.set(xlabel="epoch", ylabel="training loss", title="loss")
    for m in METRICS:
        if m in df.columns:
            d = df[["epoch", m]].dropna()
            ax_m.plot(d["epoch"], d[m], marker="o", label=m)
    ax_m.set(xlabel="epoch (0 = starting weights)", ylabel="score", title="local validation", ylim=(0, 1))
    for ax in (ax_l, ax_m):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, dest)


def _history_frame(history: list[dict]) -> pd.DataFrame:
    """History rows as a table: epoch, size, lr, losses, then scores."""
    df = pd.DataFrame(history)
    first = [c for c in ("epoch", "img_size", "lr", "loss") if c in df.columns]
    losses = sorted(c for c in df.columns if c.startswith("loss_"))
    scores = [c for c in (*METRICS, "n_queries") if c in df.columns]
    return df[first + losses + scores + [c for c in df.columns if c not in {*first, *losses, *scores}]]


def _log_epoch(writer, row: dict) -> None:
    if writer is None:  # not rank 0
        return
    for k, v in row.items():
        if k in METRICS:
            writer.add_scalar(f"val/{k}", v, row["epoch"])
        elif k.startswith("loss"):
            writer.add_scalar(f"epoch/{k}", v, row["epoch"])
    writer.flush()


# ---- the loop ---------------------------------------------------------------------------------
def fit(member: dict, train_df: pd.DataFrame, val_df: pd.DataFrame | None, out_dir, *, init=None, device=None,
        resume: bool = False, epochs: int | None = None, stop_after: int | None = None, num_workers: int = 0,
        deterministic: bool = False, progress: bool = True, cache_dir=None, baseline: bool = False) -> dict:
    """Train ``member`` on ``train_df`` (path, Id), validating on ``val_df`` (path, Id, is_query)
    or not at all (None: last.pt is also best.pt). ``epochs`` overrides ``train.epochs``;
    ``stop_after`` ends this call after that many epochs (the schedule still spans all of them;
    continue with ``resume=True``). ``cache_dir``: where frozen-trunk feature caches are kept
    (``train.cache_trunk``; None = not kept). ``baseline``: also score the untrained
    ``model.pretrained`` backbone (:func:`frozen_baseline`; from the trunk cache when the run
    starts from those weights). Returns ``{"best", "last", "metrics", "history", "best_epoch"}``
    (+ ``"baseline"``)."""
    from torch.utils.tensorboard import SummaryWriter

    member = copy.deepcopy(member)
    tcfg = member["train"]
    if epochs is not None:
        tcfg["epochs"] = int(epochs)
        tcfg["progressive"] = trim_phases(tcfg["progressive"], int(epochs)) if tcfg["progressive"] else None
    phases = resolve_phases(tcfg, member["model"]["img_size"])
    n_epochs = sum(n for _, n in phases)
    out_dir, device, seed = Path(out_dir), resolve_device(device), int(member["seed"])
    distributed.init(device)
    main, progress = distributed.is_main(), progress and distributed.is_main()
    seed_everything(seed, deterministic)
    state = _resume_state(out_dir / "last.pt", train_df, member["name"], n_epochs) if resume else None
    run = setup_run(member, train_df, init, device, state)
    run.cache_dir = cache_dir
    start = int(state["epoch"]) if state else 0
    history = list(state["history"]) if state else []
    best = dict(state["best"]) if state else {"score": -math.inf, "epoch": 0, "metrics": {}}
    run.step = int(state.get("step", 0)) if state else 0
    if state:
        run.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    elif main:
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
        write_json(out_dir / "config.json", {
            "member": member, "init": str(init) if init else member["model"]["pretrained"],
            "device": str(device), "phases": phases, "n_images": len(train_df), "n_identities": len(run.classes),
            "n_classes": len(run.classes) * (2 if run.flip else 1), "n_val": 0 if val_df is None else len(val_df)})
    writer = SummaryWriter(str(out_dir / "tb"), purge_step=run.step if state else None) if main else None
    emb_kw = dict(device=device, batch_size=int(tcfg["batch_embed"]), num_workers=num_workers,
                  progress=progress, seen=run.classes)
    size = size_at(phases, start)
    loader, val_rows = _prepare_phase(run, member, size, val_df, num_workers, progress)
    base = None
    if baseline and val_df is not None:
        if val_rows is not None and init is None and state is None:  # the trunk holds model.pretrained weights
            base = evaluate(PooledBackbone(run.model, run.top), val_df, size, cached=(nn.Identity(), run.cache.plain_features(val_rows)),
                            **emb_kw)
        else:
            base = frozen_baseline(member, val_df, device, emb_kw["batch_size"], num_workers, progress, run.classes)
        distributed.print0(f"{member['name']} baseline (untrained {member['model']['pretrained']} backbone): "
                          + ", ".join(f"{k} {base[k]:.4f}" for k in (*METRICS, "top1_unseen") if k in base))
    if start == 0 and val_df is not None and tcfg["eval_init"]:
        history = [{"epoch": 0, "img_size": phases[0][0], **_validate(run, val_df, size, val_rows, emb_kw)}]
        _log_epoch(writer, history[0])
    if start == 0 and tcfg["imprint"] and n_epochs:
        imprint_head(run, phases[0][0], emb_kw["batch_size"], num_workers, seed, progress)
    run.net = distributed.wrap(run.net, device)  # DDP: rank 0's weights (and imprinted head) on every rank
    if distributed.is_distributed():  # dropout draws of its own on each rank
        seed_everything(seed + distributed.rank(), deterministic)

    sched = dict(total=n_epochs, warmup=float(tcfg["warmup_epochs"] or 0),
                 schedule=tcfg["schedule"], floor=float(tcfg["min_lr_frac"]), cycle=float(tcfg["sgdr_cycle"]),
                 mult=float(tcfg["sgdr_mult"]))
    end = n_epochs if stop_after is None else min(n_epochs, start + int(stop_after))
    patience = int(tcfg["patience"]) if tcfg["patience"] else None
    for epoch in range(start, end):
        if size_at(phases, epoch) != size:  # a new progressive-resizing phase
            size = size_at(phases, epoch)
            loader, val_rows = _prepare_phase(run, member, size, val_df, num_workers, progress)
        t0 = time.time()
        row = {"epoch": epoch + 1, "img_size": size,
               **_train_epoch(run, loader, epoch, sched, tcfg, writer, f"{member['name']} epoch {epoch + 1}/{n_epochs} "
                              f"@{size}px", progress)}
        distributed.sync_buffers(run.model)  # validation and checkpoints see rank 0's BatchNorm statistics
        every = int(tcfg["val_every"] or 1)
        validate = val_df is not None and ((epoch + 1) % every == 0 or epoch + 1 == n_epochs)
        if validate:
            row.update(_validate(run, val_df, size, val_rows, emb_kw))
        row["time_s"] = round(time.time() - t0, 1)
        row = distributed.broadcast(row)  # rank 0's scores and time decide for every rank
        if epoch == start and tcfg["time_budget_min"] and state is None:
            fits = max(epoch + 1, int(float(tcfg["time_budget_min"]) * 60 // max(row["time_s"], 1e-3)))
            if fits < n_epochs:
                distributed.print0(f"{member['name']}: {n_epochs} epochs of {row['time_s']:.0f}s exceed train.time_budget_min="
                                  f"{tcfg['time_budget_min']}: training {fits} epochs (schedule fitted to them)")
                n_epochs = sched["total"] = fits
                end = min(end, fits)
        history.append(row)
        _log_epoch(writer, row)
        score = row.get(tcfg["metric"], math.nan)
        score = -math.inf if math.isnan(score) else score
        improved = val_df is None or (validate and (best["epoch"] == 0 or score > best["score"]))
        if improved:
            best = {"score": score, "epoch": epoch + 1,
                    "metrics": scores_of(row)}
        if main:
            _save(run, member, out_dir, history, best, improved, sched, phases, init)
            plot_history(history, out_dir / "curves.png", f"{member['name']}: {tcfg['loss']} on {len(train_df)} images")
        distributed.barrier()
        distributed.print0(f"{member['name']} epoch {epoch + 1}/{n_epochs}: " + ", ".join(
            f"{k} {row[k]:.4f}" for k in ("loss", *METRICS, "top1_unseen") if k in row) + f" ({row['time_s']}s)")
        if patience and validate and epoch + 1 - best["epoch"] >= patience:
            distributed.print0(f"{member['name']}: no better {tcfg['metric']} for {patience} epochs (train.patience): "
                              f"stopping after epoch {epoch + 1}, best epoch {best['epoch']}")
            break
        if epoch + 1 >= end:
            break
    if n_epochs == 0:  # train.epochs: 0 - the starting weights are the result (e.g. a frozen-backbone baseline)
        history = history or [{"epoch": 0, "img_size": phases[0][0]}]
        best = {"score": history[0].get(tcfg["metric"], -math.inf), "epoch": 0,
                "metrics": scores_of(history[0])}
        if main:
            _save(run, member, out_dir, history, best, True, sched, phases, init)
        distributed.barrier()
    if writer is not None:
        writer.close()
    return {"best": str(out_dir / "best.pt"), "last": str(out_dir / "last.pt"), "metrics": best["metrics"],
            "history": history, "best_epoch": best["epoch"], "baseline": base}


def _prepare_phase(run, member: dict, size, val_df, num_workers: int, progress: bool):
    """Training batches at ``size``: a DataLoader over augmented images, or with a frozen, cached
    trunk (``train.cache_trunk``) a :class:`common.trunk.TrunkCache` over the training and
    validation images. Returns ``(loader, validation rows of the cache or None)``."""
    if not run.cache_views:
        run.dataset.transform = train_transform(run, member, size)
        return make_loader(run.dataset, run.sampler, num_workers, run.device.type == "cuda"), None
    paths = list(run.dataset.paths)
    index = {p: i for i, p in enumerate(paths)}
    val_rows = None
    if val_df is not None:
        for p in val_df["path"]:
            index.setdefault(str(p), len(index))
        paths = list(index)
        val_rows = torch.as_tensor([index[str(p)] for p in val_df["path"]])
    t0 = time.time()
    run.cache, reused = cached_trunk(
        run.cache_dir, run.trunk, paths, range(len(run.dataset.paths)), size, run.model.mean, run.model.std,
        views=run.cache_views, strength=float(member["augment"]["strength"]), flip=run.flip, seed=int(member["seed"]),
        device=run.device, batch_size=int(member["train"]["batch_embed"]), progress=progress, num_workers=num_workers)
    distributed.print0(f"{member['name']}: trunk cache of {len(paths)} images x {run.cache_views} views at {size}px "
                      f"({run.cache.nbytes() / 2**20:.0f} MiB) {'reused' if reused else 'built'} in {time.time() - t0:.0f}s")
    return _CachedBatches(run), val_rows


class _CachedBatches:
    """PK batches of cached trunk features: ``(features, labels)`` per sampler batch."""

    def __init__(self, run):
        self.run = run

    def __len__(self) -> int:
        return len(self.run.sampler)

    def __iter__(self):
        run, offset = self.run, self.run.dataset.mirror_offset
        for keys in run.sampler:
            y = torch.as_tensor([int(run.labels[i]) + (offset if f else 0) for i, f, _ in keys])
            yield run.cache.batch(keys), y


def _validate(run, val_df, size, val_rows, emb_kw: dict) -> dict:
    cached = None if val_rows is None else (run.top, run.cache.plain_features(val_rows))
    return evaluate(run.model, val_df, size, cached=cached, **emb_kw)


def _resume_state(last_path: Path, train_df: pd.DataFrame, name: str, n_epochs: int) -> dict | None:
    if not last_path.exists():
        distributed.print0(f"no {last_path} to resume from: training {name} from the start")
        return None
    state = torch.load(last_path, map_location="cpu", weights_only=False)
    if state.get("classes") != encode_labels(train_df["Id"])[1]:
        raise ConfigError(f"cannot resume from {last_path}: the training identities changed; rerun without --resume")
    distributed.print0(f"resuming {name} from {last_path} (epoch {state['epoch']}/{n_epochs})")
    return state


def _train_epoch(run, loader, epoch: int, sched: dict, tcfg: dict, writer, desc: str, progress: bool) -> dict:
    """One pass over the PK batches of ``epoch``; returns the mean losses and the last LR."""
    run.sampler.set_epoch(epoch)
    train_mode(run.model, run.freeze_bn, run.trunk)
    run.loss_fn.train()
    lr, sums, n, f = float(tcfg["lr"]), {}, 0, 1.0
    bar = tqdm(loader, desc=desc, disable=not progress)
    for i, (x, y) in enumerate(bar):
        f = lr_factor(epoch + i / len(loader), **sched)
        loss, parts = train_step(run, x, y, [lr * g["lr_mult"] * f for g in run.opt.param_groups], tcfg["grad_clip"])
        if writer is not None:
            writer.add_scalar("train/loss", loss, run.step)
            writer.add_scalar("train/lr", lr * f, run.step)
        run.step += 1
        for k, v in {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
    return {"lr": lr * f, **distributed.mean({k: v / max(n, 1) for k, v in sums.items()})}


def _save(run, member: dict, out_dir: Path, history: list, best: dict, improved: bool, sched: dict, phases,
          init) -> None:
    """last.pt (everything --resume needs), best.pt when improved (no optimiser state), history.csv."""
    epoch = history[-1]["epoch"]
    ckpt = {"model": run.model.state_dict(), "head": run.loss_fn.head.state_dict() if run.loss_fn.head else None,
            "member": member, "classes": run.classes, "epoch": epoch, "optimizer": run.opt.state_dict(),
            "scheduler": {**sched, "t": epoch, "phases": phases}, "metrics": history[-1], "history": history,
            "best": best, "step": run.step, "scaler": run.scaler.state_dict(), "rng": _rng_state(),
            "init": str(init) if init else member["model"]["pretrained"]}
    save_torch(out_dir / "last.pt", ckpt)
    if improved:
        save_torch(out_dir / "best.pt", dict(ckpt, optimizer=None, scaler=None, rng=None))
    write_csv(out_dir / "history.csv", _history_frame(history))


