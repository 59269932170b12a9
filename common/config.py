"""Configuration: one flat-ish default YAML, profile files that override it, ``key=value`` overrides.

``configs/default.yaml`` holds every default. A profile (``configs/demo.yaml``,
``configs/full.yaml``, ...) holds only what differs. Command-line ``--set a.b=c`` overrides
come last; values are parsed as YAML (``3`` is an int, ``[1,2]`` a list, ``null`` None).

>>> cfg = merge({"train": {"epochs": 5, "lr": 0.1}}, {"train": {"epochs": 2}})
>>> cfg["train"]
{'epochs': 2, 'lr': 0.1}
>>> apply_overrides(cfg, ["train.lr=1e-3", "model.size=[1, 2]"])["model"]
{'size': [1, 2]}
>>> cfg["train"]["lr"]
0.001
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
DEFAULT_YAML = CONFIG_DIR / "default.yaml"

# Which config sections each stage reads: the Makefile reruns a stage only when these change.
STAGE_SECTIONS = {
    "demo": ["demo"],
    "00": ["seed", "clean"],
    "01": ["seed", "device", "detector"],
    "02": ["device", "detector", "crop"],
    "03": ["seed", "device", "deterministic", "num_workers", "model", "train", "augment", "pretrain", "members"],
    "04": ["seed", "device", "deterministic", "num_workers", "model", "train", "augment", "members"],
    "05": ["seed", "device", "deterministic", "num_workers", "model", "train", "augment", "members", "pseudo", "tta",
           "rerank"],
    "06": ["device", "num_workers", "model", "members", "ensemble", "search", "tta", "rerank"],
}


# Sections a profile replaces wholesale instead of merging into the defaults.
REPLACE_KEYS = ("members", "ensemble")


class ConfigError(PipelineError, ValueError):
    """A config file or override that cannot be used; the message names it."""


def merge(base: dict, over: dict) -> dict:
    """Deep-merge ``over`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def parse_value(raw: str) -> Any:
    """YAML-typed value of an override; also reads ``1e-3`` as a float (plain YAML 1.1 would not),
    and a mapping written without spaces (``SET="ensemble={a:1,b:0.5}"``: make splits SET on
    spaces) as YAML would read it with them.

    >>> parse_value("3"), parse_value("1e-3"), parse_value("[1, 2]"), parse_value("none"), parse_value("null")
    (3, 0.001, [1, 2], 'none', None)
    >>> parse_value("{lite0_128:1.0,lite0_160_do:0.5}")
    {'lite0_128': 1.0, 'lite0_160_do': 0.5}
    """
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
        if isinstance(value, dict) and any(v is None and ":" in str(k) for k, v in value.items()):
            value = yaml.safe_load(re.sub(r"([:,])(?=\S)", r"\1 ", raw))
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` strings in place (value parsed as YAML) and return cfg. A mapping
    merges into the section it names, as a profile does; ``members`` / ``ensemble`` are replaced.

    >>> apply_overrides({"train": {"lr": 1, "epochs": 2}, "ensemble": {"a": 1, "b": 1}},
    ...                 ["train={lr: 0.5}", "ensemble={a: 2}"])
    {'train': {'lr': 0.5, 'epochs': 2}, 'ensemble': {'a': 2}}
    """
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = parse_value(raw)
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict) and key.strip() not in REPLACE_KEYS:
            value = merge(node[parts[-1]], value)
        node[parts[-1]] = value
    return cfg


# ---------------------------------------------------------------------------------------
# Key checking: every key must be one default.yaml defines (a typo is an error, not a new key)
# ---------------------------------------------------------------------------------------
MEMBER_KEYS = ("model", "train", "augment", "pseudo", "enabled")   # what a `members:` entry may hold
NULLABLE_SECTIONS = ("demo",)                                       # sections a profile may set to null
RENAMED = {"train.fit": "train.rows"}                               # old key -> its name now


def _unknown(key: str, known, where: str) -> ConfigError:
    """Error for an unknown key, with the closest known key as a suggestion (as ultralytics does).

    >>> str(_unknown("train.epoch", ["train.epochs", "train.lr"], "--set train.epoch=3"))
    "unknown config key 'train.epoch' in --set train.epoch=3 (did you mean 'train.epochs'?)"
    >>> str(_unknown("members.m.train.fit", [], "p.yaml"))
    "unknown config key 'members.m.train.fit' in p.yaml (renamed: 'members.m.train.rows')"
    """
    old = next((o for o in RENAMED if key == o or key.endswith("." + o)), None)
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; see {DEFAULT_YAML.relative_to(ROOT)} for every key"
    if old:
        hint = f" (renamed: {key[:len(key) - len(old)] + RENAMED[old]!r})"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def check_keys(over: dict, defaults: dict, where: str, prefix: str = "", root: dict | None = None) -> None:
    """Raise :class:`ConfigError` when ``over`` (a profile, or one override as a nested dict) holds a
    key that ``defaults`` (default.yaml) does not define. Free-form names: the entries of
    ``members:`` (whose model/train/augment keys are checked against those sections) and of
    ``ensemble:``; ``pretrain.train`` is checked against ``train``.

    >>> d = {"train": {"epochs": 1, "lr": 0.1}, "model": {"img_size": 8}, "members": {}, "ensemble": {},
    ...      "pretrain": {"enabled": True, "train": {}}, "augment": {}}
    >>> check_keys({"train": {"lr": 1}, "members": {"m": {"model": {"img_size": 4}}}, "ensemble": {"m": 2}}, d, "x")
    >>> check_keys({"trian": {"lr": 1}}, d, "--set trian.lr=1")
    Traceback (most recent call last):
    common.config.ConfigError: unknown config key 'trian' in --set trian.lr=1 (did you mean 'train'?)
    >>> check_keys({"members": {"m": {"train": {"epoch": 2}}}}, d, "p.yaml")
    Traceback (most recent call last):
    common.config.ConfigError: unknown config key 'members.m.train.epoch' in p.yaml (did you mean 'members.m.train.epochs'?)
    """
    root = defaults if root is None else root
    for key, value in (over or {}).items():
        full = f"{prefix}{key}"
        if key not in defaults:
            raise _unknown(full, [f"{prefix}{k}" for k in defaults], where)
        ref = defaults[key]
        if full == "members":
            for name, entry in (value or {}).items():
                if entry is not None and not isinstance(entry, dict):
                    raise ConfigError(f"members.{name} in {where} must be a mapping (model/train/augment/pseudo/enabled)")
                for mk, mv in (entry or {}).items():
                    if mk not in MEMBER_KEYS:
                        raise _unknown(f"members.{name}.{mk}", [f"members.{name}.{k}" for k in MEMBER_KEYS], where)
                    if mk in ("model", "train", "augment"):
                        check_keys(mv, root[mk], where, f"members.{name}.{mk}.", root)
        elif full == "ensemble":
            if not isinstance(value, dict):
                raise ConfigError(f"ensemble in {where} must map member names to weights")
        elif full == "pretrain.train":
            check_keys(value, root["train"], where, "pretrain.train.", root)
        elif isinstance(ref, dict):
            if value is None and full in NULLABLE_SECTIONS:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{full} in {where} is a section: set its keys ({full}.<key>=...), not {value!r}")
            check_keys(value, ref, where, f"{full}.", root)


@functools.lru_cache(maxsize=1)
def _default_yaml() -> dict:
    return _read_yaml(DEFAULT_YAML)


def default_config() -> dict:
    """A fresh copy of configs/default.yaml (read once per process)."""
    return copy.deepcopy(_default_yaml())


def section(name: str, **over) -> dict:
    """One section of default.yaml with some keys replaced (for library use and tests), e.g.
    ``build_model(section("model", backbone="resnet18", pretrained="none"))``; unknown keys are errors.

    >>> section("train", epochs=3)["epochs"], section("train")["loss"]
    (3, 'arcface')
    """
    base = default_config()[name]
    check_keys({name: over}, default_config(), f"section({name!r}, ...)")
    return merge(base, over)


def _nested(key: str, value: Any) -> dict:
    """``"a.b.c", 1`` -> ``{"a": {"b": {"c": 1}}}``."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def check_ensemble(cfg: dict, where: str) -> None:
    """Every ``ensemble:`` entry must name a configured member."""
    members = list((cfg["members"] or {}))
    for name in cfg["ensemble"] or {}:
        if name not in members:
            close = difflib.get_close_matches(name, members, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; members: {', '.join(members) or 'none'}"
            raise ConfigError(f"ensemble.{name} in {where} names no configured member{hint}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """default.yaml, then the profile at ``path`` (a file, or a profile name like ``demo``), then
    overrides; a key that default.yaml does not define is an error naming where it came from."""
    defaults = default_config()
    cfg, where = copy.deepcopy(defaults), str(DEFAULT_YAML.relative_to(ROOT))
    if path:
        p = Path(path)
        if not p.exists() and not p.suffix:
            p = CONFIG_DIR / f"{path}.yaml"
        if p.resolve() != DEFAULT_YAML.resolve():
            profile, shown = _read_yaml(p), str(p.resolve().relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p)
            check_keys(profile, defaults, shown)
            cfg = merge(cfg, profile)
            for key in REPLACE_KEYS:  # a profile's member list replaces the default one
                if key in profile:
                    cfg[key] = copy.deepcopy(profile[key])
            where = shown
        cfg["profile"] = p.stem
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        check_keys(_nested(key.strip(), parse_value(raw)), defaults, f"--set {item}")
    cfg = apply_overrides(cfg, overrides)
    check_ensemble(cfg, f"{where} / --set" if overrides else where)
    cfg["num_workers"] = data_workers(cfg["num_workers"], cfg["device"])
    return cfg


def data_workers(value, device, cores: int | None = None, cuda: bool | None = None) -> int:
    """DataLoader workers for ``num_workers``: a number as given; ``auto`` = 1 when the model runs on
    the CPU (it needs every core: on 2 cores one epoch trained at 0.96 of the bare model with 1 worker,
    0.93 with none, 0.79 with 2, README "Benchmarks"), and ``min(8, cores - 1)`` with a CUDA GPU.

    >>> data_workers("auto", "cpu"), data_workers(3, "cuda"), data_workers("auto", "auto", cores=16, cuda=True)
    (1, 3, 8)
    """
    if value != "auto":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"num_workers must be auto or a whole number >= 0, not {value!r}")
        return value
    if str(device).startswith("cuda"):
        cuda = True
    elif device == "cpu":
        cuda = False
    elif cuda is None:
        from .profile import has_cuda

        cuda = has_cuda()
    cores = cores or os.cpu_count() or 1
    return min(8, max(1, cores - 1)) if cuda else 1


def member_names(cfg: dict) -> list[str]:
    """Ensemble members, in config order (those whose entry is not ``null`` / ``enabled: false``)."""
    return [n for n, m in (cfg["members"] or {}).items() if m is not None and (m or {}).get("enabled", True)]


def member_config(cfg: dict, name: str) -> dict:
    """Resolved config of one member: ``{"name", "model", "train", "augment", "pseudo": bool, "weight"}``.

    The member's entry in ``members:`` may override any key of ``model``/``train``/``augment``,
    e.g. ``members: {b: {model: {img_size: 160, dropout: 0.5}, train: {epochs: 4}}}``.
    """
    members = cfg["members"] or {}
    if name not in members:
        raise ConfigError(f"unknown member {name!r}; configured members: {', '.join(members) or 'none'}")
    entry = members[name] or {}
    out = {
        "name": name,
        "seed": cfg["seed"],
        "model": merge(cfg["model"], entry.get("model") or {}),
        "train": merge(cfg["train"], entry.get("train") or {}),
        "augment": merge(cfg["augment"], entry.get("augment") or {}),
        "pseudo": bool(entry.get("pseudo", False)),
        "weight": float((cfg["ensemble"] or {}).get(name, 1.0)),
    }
    return out


def stage_fingerprint(cfg: dict, stage: str) -> str:
    """Canonical JSON of the config sections a stage reads."""
    sections = STAGE_SECTIONS[stage]
    return json.dumps({k: cfg.get(k) for k in sections}, sort_keys=True, indent=1, default=str)


def write_stamps(cfg: dict, stamp_dir: Path, stages=None) -> list[str]:
    """Write ``stamp_dir/<stage>.json`` only where the stage's config changed (keeps mtimes otherwise)."""
    from .io import write_text

    changed = []
    for stage in stages or STAGE_SECTIONS:
        text = stage_fingerprint(cfg, stage) + "\n"
        dest = Path(stamp_dir) / f"{stage}.json"
        if not dest.exists() or dest.read_text() != text:
            write_text(dest, text)
            changed.append(stage)
    return changed


# ---------------------------------------------------------------------------------------
# Command line shared by every stage script
# ---------------------------------------------------------------------------------------
def stage_parser(description: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", default=os.environ.get("RAW", "data/raw"), help="raw competition folder (default data/raw)")
    ap.add_argument("--data", default=os.environ.get("DATA", "data"), help="artifact folder (default data/)")
    ap.add_argument("--config", default=os.environ.get("CONFIG", "configs/demo.yaml"),
                    help="profile YAML merged over configs/default.yaml (default configs/demo.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    return ap


def parse_stage_args(description: str | None, argv=None, extra=None):
    """Parse the common stage flags; returns ``(cfg, paths, args)``.

    ``extra(parser)`` may add stage-specific flags. Exits with a one-line error when DATA is not
    writable, removes stale atomic-write temporaries there (common.io.prepare_data_dir), and
    prepares the offline environment (must happen before timm / huggingface_hub / ultralytics
    are imported). Under torchrun only rank 0 prints and cleans DATA.
    """
    from .io import DataDirError, prepare_data_dir
    from .paths import Paths

    ap = stage_parser(description)
    if extra:
        extra(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    paths = Paths(args.raw, args.data)
    if int(os.environ.get("RANK", "0")):  # a torchrun rank other than 0 (common/distributed.py): rank 0 prints
        sys.stdout = open(os.devnull, "w")  # and prepares DATA; this one must not delete its fresh temporaries
    else:
        try:  # before any work: DATA must take artifacts; leftovers of killed atomic writes go
            prepare_data_dir(paths.data, paths.raw)
        except DataDirError as e:
            ap.exit(1, f"error: {e}\n")
    prepare_environment(cfg, paths)
    members = [member_config(cfg, n)["model"] for n in member_names(cfg)]
    hub = sorted({m["backbone"] for m in members if str(m["pretrained"]) == "hub"})
    if hub:  # first seconds of the first stage, not minutes of download retries in stage 03
        from .weights import WeightsError, check_hub

        try:
            for name in hub:
                check_hub(name)
        except WeightsError as e:
            ap.exit(1, f"error: {e}\n")
    return cfg, paths, args


def prepare_environment(cfg: dict, paths) -> None:
    """Offline-friendly environment for hub-backed libraries; call before importing them."""
    offline = bool(cfg["offline"])
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else os.environ.get("HF_HUB_OFFLINE", "0")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(paths.yolo_config_dir))
    os.environ.setdefault("TORCH_HOME", str(paths.data / ".torch"))
    os.environ.setdefault("MPLCONFIGDIR", str(paths.data / ".matplotlib"))


def main(argv=None) -> int:
    """``python -m common.config [--stamps] [--show SECTION]``: print or stamp the resolved config."""
    ap = stage_parser("Print the resolved config, or write per-stage stamps for the Makefile.")
    ap.add_argument("--stamps", action="store_true", help="write DATA/.config/<stage>.json where changed")
    ap.add_argument("--show", default=None, help="print one section only")
    args = ap.parse_args(argv)
    from .paths import Paths

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.stamps:
        from .io import DataDirError, prepare_data_dir

        paths = Paths(args.raw, args.data)
        try:  # the Makefile runs this first: the same one-line error as the stages
            prepare_data_dir(paths.data, paths.raw)
        except DataDirError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        changed = write_stamps(cfg, paths.config_stamps)
        if changed:
            print(f"config changed for: {' '.join(changed)}")
        return 0
    print(yaml.safe_dump(cfg.get(args.show) if args.show else cfg, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
