"""One HTML page per run: ``DATA/report/index.html``, self-contained (images embedded, no network).

Sections in pipeline order, each read from the report a stage wrote (a stage that has not run is
said to be missing, not guessed): the competition and what stage 00 dropped and why; the detector
and the crops; training per member against its frozen baseline; pseudo-labels; the local scores of
every embedding; the retrieval gallery; the latest ``make bench`` table; the config and the git
commit. A "What to do next" box at the top lists what looks wrong, each with the fix to try.

``python -m common.report [--raw ...] [--data ...] [--config ...]`` (``make report``; ``make all``
writes it after stage 06). A small script in the page checks that every image decoded and writes
the result into ``<html data-selfcheck=...>`` (the browser test reads it).
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import ROOT, parse_stage_args
from .io import read_json, write_text

# Thresholds of the "what to do next" hints.
MIN_VAL_QUERIES = 20        # fewer validation queries: scores move a lot between runs
MIN_DETECTOR_MAP50 = 0.8    # a detector below this crops badly
MAX_FALLBACK_RATE = 0.2     # more whole-image fallbacks than this: crops barely help


@dataclass
class Section:
    key: str
    title: str
    body: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    def add(self, *parts: str) -> "Section":
        self.body.extend(parts)
        return self


def esc(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    """Numbers to 4 significant decimals, everything else as text.

    >>> fmt(0.123456), fmt(3), fmt(None), fmt("a<b")
    ('0.1235', '3', '–', 'a&lt;b')
    """
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return esc(v)


def table(rows: list[dict], columns: list[str] | None = None, highlight: str | None = None) -> str:
    """An HTML table of dict rows (columns: the union of keys, in first-seen order)."""
    if not rows:
        return "<p class=muted>(nothing)</p>"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        f"<tr{' class=hl' if highlight is not None and str(r.get(columns[0])) == highlight else ''}>"
        + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(path: Path, alt: str) -> str:
    """The PNG embedded as a data URI (the page works when mailed alone), or a note when missing."""
    path = Path(path)
    if not path.exists():
        return f"<p class=muted>{esc(alt)}: not written ({esc(path.name)} missing)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"val": {"map20": 1}}`` -> ``{"val.map20": 1}`` (numbers and short strings only).

    >>> flatten({"val": {"map20": 0.5, "n": 3}, "test": {"top1": 1.0}, "x": [1]})
    {'val.map20': 0.5, 'val.n': 3, 'test.top1': 1.0}
    """
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _load(path: Path):
    try:
        return read_json(path) if Path(path).exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def missing(section: Section, what: Path, stage: str) -> Section:
    return section.add(f"<p class=muted>{esc(what.name)} not found: stage {stage} has not run for this DATA.</p>")


# ---------------------------------------------------------------------------------------------
# Sections, in pipeline order
# ---------------------------------------------------------------------------------------------
def competition(paths) -> Section:
    s = Section("clean", "1. Competition and cleaning (stage 00)")
    rep = _load(paths.clean_report)
    if rep is None:
        return missing(s, paths.clean_report, "00")
    rows = []
    for split in ("train", "test", "pretrain"):
        r = rep.get(split)
        if isinstance(r, dict):
            rows.append({"split": split, "images": r.get("listed", r.get("found")), "kept": r.get("kept"),
                         **{f"dropped: {k}": v for k, v in (r.get("dropped") or {}).items()}})
    s.add(table(rows))
    ids, split = rep.get("train", {}).get("identities", {}), rep.get("train", {}).get("split", {})
    if ids:
        s.add(table([{k: v for k, v in ids.items() if not isinstance(v, dict)}]))
    if split:
        s.add(table([{k: (len(v) if isinstance(v, list) else v) for k, v in split.items()}]))
        n_val = split.get("val_queries")
        if n_val is not None and n_val < MIN_VAL_QUERIES:
            s.hints.append(f"Local validation has only {n_val} queries: its scores move a lot between runs; "
                           "add photos of identities with >= 2 images, or compare variants over several seeds.")
    dropped = [dict(split=sp, **f) for sp in ("train", "test", "pretrain")
               for f in (rep.get(sp, {}) or {}).get("dropped_files", [])]
    if dropped:
        s.add(f"<details><summary>{len(dropped)} dropped files and why</summary>{table(dropped[:500])}</details>")
    return s.add(image(paths.clean_summary_png, "competition summary"))


def detector_and_crops(paths) -> Section:
    s = Section("crops", "2. Detector and crops (stages 01-02)")
    det = _load(paths.detector_metrics)
    if det is None:
        missing(s, paths.detector_metrics, "01")
    elif not det.get("trained"):
        s.add(f"<p>No detector trained: {esc(det.get('reason') or det.get('skipped') or 'no boxes')}.</p>")
    else:
        s.add(table([{k: det.get(k) for k in ("map50", "map50_95", "precision", "recall", "epochs_run",
                                              "train_seconds", "device")}]))
        skipped = {k: v for k, v in ((det.get("annotations") or {}).get("skipped") or {}).items() if v}
        if skipped:
            s.add(f"<p>Box rows skipped: {esc(', '.join(f'{k} {v}' for k, v in skipped.items()))}</p>")
        if (det.get("map50") or 0) < MIN_DETECTOR_MAP50:
            s.hints.append(f"Detector mAP50 is {fmt(det.get('map50'))} (< {MIN_DETECTOR_MAP50}): annotate more boxes "
                           "(about 300 are enough) or train longer (detector.epochs).")
        s.add(image(paths.detector_curves_png, "detector training curves"))
    crops = _load(paths.crops_report)
    if crops is None:
        return missing(s, paths.crops_report, "02")
    rows = [{"split": k, **v} for k, v in (crops.get("splits") or {}).items()]
    s.add(table(rows))
    if crops.get("sources"):  # source -> {images, median_conf, median_area} (or a bare count in older reports)
        s.add(table([{"source": k, **(v if isinstance(v, dict) else {"images": v})}
                     for k, v in crops["sources"].items()]))
    worst = max(rows, key=lambda r: r.get("fallback_rate") or 0, default=None)
    if worst and (worst.get("fallback_rate") or 0) > MAX_FALLBACK_RATE and crops.get("detector"):
        s.hints.append(f"{worst['fallback_rate']:.0%} of {worst['split']} images fell back to the whole photo: "
                       "lower crop.conf or improve the detector (more boxes, more epochs).")
    elif worst and (worst.get("fallback_rate") or 0) > MAX_FALLBACK_RATE and crops.get("source") == "cam":
        s.hints.append(f"{worst['fallback_rate']:.0%} of {worst['split']} images fell back to the whole photo with "
                       "attention crops: check crops/samples.png; annotate boxes (RAW/boxes.csv) to train the "
                       "detector, or change crop.attention_threshold / attention_max_area.")
    return s.add(image(paths.crops_samples_png, "sample crops (boxes drawn, coloured by source: detector, "
                                                "attention map or whole image)"))


def training(paths) -> Section:
    s = Section("train", "3. Training (stages 03-04)")
    summ = _load(paths.members_summary)
    if summ is None:
        return missing(s, paths.members_summary, "04")
    rows = []
    for name, m in (summ.get("members") or {}).items():
        base, best = m.get("baseline") or {}, m.get("metrics") or {}
        rows.append({"member": name, "images": m.get("n_images"), "best epoch": m.get("best_epoch"),
                     "frozen map20": base.get("map20"), "trained map20": best.get("map20"),
                     "frozen top1": base.get("top1"), "trained top1": best.get("top1"),
                     "start": Path(str(m.get("init"))).name if m.get("init") else "–"})
        if base.get("map20") is not None and best.get("map20") is not None and best["map20"] <= base["map20"]:
            s.hints.append(f"{name} ended at MAP@20 {fmt(best['map20'])}, not above its untrained backbone "
                           f"({fmt(base['map20'])}): training did not help. Try a lower learning rate, a larger "
                           "image size, fewer frozen layers, or the cpu/full profile's recipe.")
    s.add(table(rows))
    for name in summ.get("members") or {}:
        s.add(image(paths.member_dir(name) / "curves.png", f"{name}: training curves"))
        if (paths.member_dir(name) / "augment.png").exists():
            s.add(f"<details><summary>{esc(name)}: augmentation samples</summary>"
                  f"{image(paths.member_dir(name) / 'augment.png', 'validation view, then training draws')}</details>")
    return s


def pseudo(paths) -> Section:
    s = Section("pseudo", "4. Pseudo-labels (stage 05)")
    rep = _load(paths.pseudo_report)
    if rep is None:
        return missing(s, paths.pseudo_report, "05")
    if rep.get("skipped"):
        s.add(f"<p>Skipped: {esc(rep['skipped'])}.</p>")
    rows = []
    for i, r in enumerate(rep.get("rounds") or [], 1):
        verdicts = ", ".join(f"{n} {'kept' if v.get('kept') else 'rejected'} ({fmt(v.get('before'))} → "
                             f"{fmt(v.get('after'))})" for n, v in (r.get("members") or {}).items())
        rows.append({"round": i, "threshold": r.get("threshold"), "labelled": r.get("labelled"), "of": r.get("n_test"),
                     "precision (val)": r.get("val_precision"), "precision (truth)": r.get("truth_precision"),
                     "retrains": verdicts or "–"})
    if rows:
        s.add(table(rows))
    if rep.get("checkpoints"):
        s.add(table([{"member": n, "checkpoint stage 06 uses": Path(c).relative_to(paths.data)
                      if Path(c).is_relative_to(paths.data) else c} for n, c in rep["checkpoints"].items()]))
    return s.add(image(paths.pseudo_png, "pseudo-label precision vs threshold"))


def scores(paths) -> Section:
    s = Section("scores", "5. Local scores and the retrieval gallery (stage 06)")
    sc = _load(paths.scores_json)
    if sc is None:
        return missing(s, paths.scores_json, "06")
    rows = [{"embedding": name, **{k: v for k, v in flatten(v).items() if not k.endswith("threshold_source")}}
            for name, v in (sc.get("scores") or {}).items()]
    s.add("<p>val = local validation (queries held out of training); test = the withheld truth, when RAW has it. "
          f"Final: <b>{esc(sc.get('final'))}</b> (highlighted).</p>", table(rows, highlight=str(sc.get("final"))))
    if sc.get("filled_rows"):
        s.add(f"<p>{len(sc['filled_rows'])} unreadable test images got filler rows.</p>")
    return s.add(image(paths.gallery_png, "retrieval gallery: queries and their top matches, green = same identity"))


def bench(paths) -> Section:
    s = Section("bench", "6. Benchmarks (make bench)")
    if paths.ablation_md.exists():
        return s.add(f"<pre>{esc(paths.ablation_md.read_text())}</pre>")
    res = _load(paths.bench_json)
    if res is None:
        return s.add("<p class=muted>make bench has not run for this DATA.</p>")
    checks = res.get("checks") or {}
    return s.add(table([{"check": k, "result": "PASS" if ok else "FAIL"} for k, ok in checks.items()]))


def provenance(cfg: dict) -> Section:
    s = Section("config", "7. Config and code")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    s.add(f"<p>git commit: <code>{esc(commit or 'unknown')}</code>{' (with uncommitted changes)' if dirty else ''}; "
          f"profile <code>{esc(cfg.get('profile', 'default'))}</code>.</p>")
    return s.add(f"<details><summary>resolved config</summary><pre>{esc(yaml.safe_dump(cfg, sort_keys=False))}</pre></details>")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.hl td{background:#fff6d5;font-weight:600}
img{max-width:100%;border:1px solid #eee}figure{margin:8px 0}figcaption{color:#666;font-size:12px}
.muted{color:#888}.next{border:2px solid #d9822b;background:#fff8f0;padding:8px 16px}.ok{border-color:#3c9d4e;background:#f3fbf4}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}"""

SELFCHECK = """<script>
(function () {
  var errors = 0;
  window.addEventListener("error", function () { errors++; }, true);
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
    document.documentElement.setAttribute("data-selfcheck",
      JSON.stringify({images: imgs.length, broken: broken, errors: errors}));
  });
})();
</script>"""


def render(sections: list[Section], title: str, subtitle: str) -> str:
    hints = [(s, h) for s in sections for h in s.hints]
    if hints:
        items = "".join(f'<li><a href="#{s.key}">{esc(s.title.split(" (")[0])}</a>: {esc(h)}</li>' for s, h in hints)
        nxt = f'<div class=next><b>What to do next</b><ul>{items}</ul></div>'
    else:
        nxt = '<div class="next ok"><b>What to do next:</b> nothing looks wrong in this run.</div>'
    body = "".join(f'<section id="{s.key}"><h2>{esc(s.title)}</h2>{"".join(s.body)}</section>' for s in sections)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style>{SELFCHECK}</head><body><h1>{esc(title)}</h1><p class=muted>{esc(subtitle)}</p>"
            f"{nxt}{body}</body></html>\n")


def build_report(cfg: dict, paths) -> Path:
    """Write ``paths.report_html`` from the stages' reports and return its path."""
    sections = [competition(paths), detector_and_crops(paths), training(paths), pseudo(paths), scores(paths),
                bench(paths), provenance(cfg)]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = render(sections, f"Re-identification run: {paths.raw.name}", f"RAW {paths.raw} · DATA {paths.data} · {when}")
    return write_text(paths.report_html, page)


def main(argv=None) -> int:
    cfg, paths, _ = parse_stage_args(__doc__.splitlines()[0], argv)
    dest = build_report(cfg, paths)
    n = sum(1 for s in dest.read_text().split("<li><a href=")[1:])
    print(f"wrote {dest}" + (f" ({n} things to look at under 'What to do next')" if n else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
