"""Ablations (``make bench``): what each technique is worth on the competition at hand.

One **baseline** run (``make all`` with the profile) into ``DATA/bench/runs/baseline``, then one run
per variant: a copy of the baseline's DATA with a few overrides, through the same Makefile, so
only the stages whose config a variant changes are rerun (``tta.hflip`` reruns 06 alone; a loss
reruns 03-06). Same seed and budget everywhere. Each row: the final embedding's local-validation
MAP@20, top-1, hit@20 (image mode) and MAP@5 (ID mode), the same on the withheld truth when RAW
has one, the training time of the stages it reran and images/s. The baseline's members alone are
rows too (read from its stage 06 scores), so "each member vs the meta-embedding" and "global only vs
with local-feature re-ranking" cost nothing.
``--seeds N`` repeats the baseline and the frozen-backbone variant with N seeds and prints
mean ± spread: validation moves by about ±0.02 MAP@20 between runs, so a gain smaller than the
spread is noise.

Writes ``DATA/bench/ablation.csv``, ``ablation.md`` and ``ablation.png`` (bars).
    python -m common.ablation --raw RAW --data DATA [--config ...] [--variants a,b] [--seeds 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ROOT, default_config, load_config, member_names
from .io import read_json, save_figure, write_csv, write_text
from .paths import Paths


@dataclass
class Variant:
    what: str
    sets: list[str] = field(default_factory=list)

    def requires(self) -> list[str]:
        """Config keys the variant sets (each must exist in default.yaml)."""
        return [s.split("=", 1)[0] for s in self.sets]


def variants(cfg: dict) -> dict[str, Variant]:
    """Every ablation, by name, for the resolved config ``cfg`` (resolutions relative to its model)."""
    size = cfg["model"]["img_size"]
    size = size if isinstance(size, int) else max(size)
    low, high = max(32, int(round(size * 0.75 / 32)) * 32), int(round(size * 1.25 / 32)) * 32

    def sizes(px: int) -> list[str]:  # a member's own model.img_size wins over the global one: set both
        return [f"model.img_size={px}"] + [f"members.{n}.model.img_size={px}" for n in member_names(cfg)
                                           if "img_size" in ((cfg["members"][n] or {}).get("model") or {})]
    return {
        "frozen": Variant("frozen ImageNet backbone, no training", ["train.epochs=0", "pseudo.enabled=false"]),
        "softmax": Variant("plain (normalised) softmax classifier: no margin", ["train.loss=cosface", "train.cosface_m=0.0"]),
        "triplet": Variant("batch-hard triplet only", ["train.loss=triplet"]),
        "arcface": Variant("ArcFace only", ["train.loss=arcface"]),
        "subcenter": Variant("sub-centre ArcFace", ["train.loss=subcenter"]),
        "cosface": Variant("CosFace", ["train.loss=cosface"]),
        "with_singletons": Variant("singleton identities in metric training", ["clean.min_train_images=1"]),
        "full_photos": Variant("full photos instead of crops", ["model.use_crops=false"]),
        "no_pretrain": Variant("ImageNet start instead of stage 03", ["model.from_pretrain_stage=false"]),
        f"size_{low}": Variant(f"{low} px instead of {size}", [*sizes(low), "train.progressive=null"]),
        f"size_{high}": Variant(f"{high} px instead of {size}", [*sizes(high), "train.progressive=null"]),
        "no_flip_tta": Variant("without flip TTA", ["tta.hflip=false"]),
        "no_pseudo": Variant("without pseudo-labels", ["pseudo.enabled=false"]),
        "with_pseudo": Variant("with pseudo-labels (stage 05 retrains on confident test photos)", ["pseudo.enabled=true"]),
        "no_rerank": Variant("global embedding only, no local-feature re-ranking", ["rerank.enabled=false"]),
    }


def _known(key: str) -> bool:
    node, parts = default_config(), key.split(".")
    if parts[0] == "members" and len(parts) > 2:  # a member's override of a section key: known when the key is
        parts = parts[2:]
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def no_op(config: str, sets: list[str], extra: list[str]) -> str | None:
    """Why the overrides ``extra`` change nothing in the config of ``config`` + ``sets`` (e.g.
    ``pseudo.enabled=false`` where the profile already has it off), else None.

    >>> no_op("cpu", [], ["pseudo.enabled=false"])
    'the profile already has pseudo.enabled=false'
    >>> no_op("cpu", [], ["pseudo.enabled=true"]) is None
    True
    """
    if load_config(config, sets + extra) != load_config(config, sets):
        return None
    return "the profile already has " + " ".join(extra)


def run_make(raw: Path, data: Path, config: str, sets: list[str]) -> float:
    cmd = ["make", "--no-print-directory", "all", f"RAW={raw}", f"DATA={data}", f"CONFIG={config}"]
    if sets:
        cmd.append("SET=" + " ".join(sets))
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t


def row_of(name: str, what: str, data: Path, raw: Path, wall: float | None, embedding: str | None = None) -> dict:
    """One table row from a finished run's stage 04 summary and stage 06 scores."""
    paths = Paths(raw, data)
    scores = read_json(paths.scores_json)
    fused = f"{scores['final']}+fused"  # with local-feature re-ranking, the submission's ranking
    emb = embedding or (fused if fused in scores["scores"] else scores["final"])
    s = scores["scores"][emb]
    row = {"variant": name, "what": what, "embedding": emb}
    for part, keys in (("val", ("map20", "top1", "hit20", "map5")), ("test", ("map20", "top1", "hit20", "map5_nw"))):
        for k in keys:
            row[f"{part}_{k}"] = (s.get(part) or {}).get(k)
    members = (read_json(paths.members_summary) if paths.members_summary.exists() else {}).get("members", {})
    secs = sum(h.get("time_s") or 0 for m in members.values() for h in m.get("history", []))
    imgs = sum(m.get("n_images", 0) * sum(1 for h in m.get("history", []) if h.get("epoch", 0) > 0)
               for m in members.values())
    row["train_s"] = round(secs, 1)
    row["images_per_s"] = round(imgs / secs, 2) if secs else None
    row["wall_s"] = None if wall is None else round(wall, 1)
    return row


def ran(scores_json: Path, baseline_json: Path) -> bool:
    """A variant's stage 06 finished: its scores exist and are not the baseline's copy (same mtime)."""
    return scores_json.exists() and scores_json.stat().st_mtime > baseline_json.stat().st_mtime


def other_rankings(row: dict, data: Path, raw: Path, what: str | None = None) -> list[dict]:
    """Rows of a run's other rankings (its stage 06 scores): each member alone, the meta-embedding
    alone (global only) and local matching alone, named ``embedding:<ranking>``."""
    scores = read_json(Paths(raw, data).scores_json)
    out = []
    for n in scores["scores"]:
        if n != row["embedding"]:
            label = what or ("local-feature score only" if n.endswith("+local") else "meta-embedding, no re-ranking"
                             if n == scores["final"] else "one member alone")
            out.append(row_of(f"embedding:{n}", label, data, raw, None, n))
    return out


def summarise(rows: list[dict], metrics=("val_map20",)) -> list[dict]:
    """Per variant over its seed rows: ``n`` and, per metric, ``mean ± spread`` (sample standard deviation).

    >>> summarise([{"variant": "a", "val_map20": 0.5}, {"variant": "a", "val_map20": 0.7}, {"variant": "b", "val_map20": 0.1}])
    [{'variant': 'a', 'n': 2, 'val_map20': '0.6000 ± 0.1414'}, {'variant': 'b', 'n': 1, 'val_map20': '0.1000'}]
    """
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        row = {"variant": name, "n": len(mine)}
        for m in metrics:
            vals = [r[m] for r in mine if r.get(m) is not None]
            row[m] = (None if not vals else f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}"
                                                                              if len(vals) > 1 else ""))
        out.append(row)
    return out


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]) + "\n"


def bar_chart(rows: list[dict], dest: Path, metric: str = "val_map20") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    vals = [r.get(metric) or 0 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ax.barh(names[::-1], vals[::-1], color=["#d9822b" if n == "baseline" else "#4477aa" for n in names[::-1]])
    for y, v in enumerate(vals[::-1]):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel(metric.replace("_", " "))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--data", default="data", help="results go to DATA/bench/")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], help="override for every run (baseline included)")
    ap.add_argument("--variants", default="all", help="comma-separated names, or all (default); 'none' = baseline only")
    ap.add_argument("--seeds", type=int, default=1, help="repeat baseline and frozen with this many seeds")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild the tables from the runs already in DATA/bench/runs")
    args = ap.parse_args(argv)
    raw, bench = Path(args.raw), Paths(args.raw, args.data).bench_dir
    table = variants(load_config(args.config, args.set))
    if args.list:
        for n, v in table.items():
            print(f"{n:16s} {v.what}  [{' '.join(v.sets)}]")
        return 0
    chosen = list(table) if args.variants == "all" else [] if args.variants == "none" else args.variants.split(",")
    unknown = [n for n in chosen if n not in table]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    runs, rows = bench / "runs", []
    base = runs / "baseline"
    make = (lambda *a: None) if args.table_only else run_make
    wall = make(raw, base, args.config, args.set)
    rows.append(row_of("baseline", "the profile as configured", base, raw, wall))
    rows += other_rankings(rows[0], base, raw)
    for name in chosen:
        v = table[name]
        missing = [k for k in v.requires() if not _known(k)]
        if missing:
            print(f"skipping {name}: this version has no {', '.join(missing)}")
            continue
        same = no_op(args.config, args.set, v.sets)
        if same:
            other = {"no_pseudo": "with_pseudo", "with_pseudo": "no_pseudo"}.get(name)
            print(f"skipping {name}: it would be the baseline again ({same})" + (f"; try {other}" if other else ""))
            continue
        dest = runs / name
        if not args.table_only:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(base, dest, ignore=shutil.ignore_patterns("embeddings", "report", "tb"))
        elif not ran(Paths(raw, dest).scores_json, Paths(raw, base).scores_json):
            continue
        rows.append(row_of(name, v.what, dest, raw, make(raw, dest, args.config, args.set + v.sets)))
    seeded = []
    for seed in range(1, args.seeds):
        for name, sets in (("baseline", []), ("frozen", table["frozen"].sets)):
            if name != "baseline" and (name not in chosen or not all(_known(k) for k in table[name].requires())):
                continue
            dest = runs / f"{name}_seed{seed}"
            if not args.table_only:
                shutil.rmtree(dest, ignore_errors=True)
            elif not Paths(raw, dest).scores_json.exists():
                continue
            w = make(raw, dest, args.config, args.set + sets + [f"seed={seed}", f"clean.seed={seed}"])
            seeded.append(row_of(name, f"seed {seed}", dest, raw, w))
            if name == "baseline":  # its embedding-only and local-only rankings: the main comparison over seeds
                seeded += other_rankings(seeded[-1], dest, raw, f"seed {seed}")
    cols = ["variant", "what", "embedding", "val_map20", "val_top1", "val_hit20", "val_map5", "test_map20", "test_top1",
            "test_hit20", "test_map5_nw", "train_s", "images_per_s", "wall_s"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    import pandas as pd

    write_csv(bench / "ablation.csv", pd.DataFrame(rows + seeded, columns=cols))
    text = (f"`{' '.join(sys.argv if argv is None else ['python -m common.ablation', *argv])}` "
            f"({time.strftime('%Y-%m-%d %H:%M')}, RAW {raw})\n\n" + markdown(rows, cols))
    if seeded:
        names = {r["variant"] for r in seeded}
        metrics = [m for m in ("val_map20", "val_top1", "test_map20", "test_top1", "test_hit20")
                   if any(r.get(m) is not None for r in seeded)]
        text += ("\nOver seeds (seed 0 = the rows above; each seed also draws its own local validation split, "
                 "clean.seed): mean ± sample standard deviation\n\n"
                 + markdown(summarise([r for r in rows + seeded if r["variant"] in names], metrics), ["variant", "n", *metrics]))
    write_text(bench / "ablation.md", text)
    bar_chart(rows, bench / "ablation.png")
    print(text + f"\nwrote {bench / 'ablation.csv'}, {bench / 'ablation.md'}, {bench / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
