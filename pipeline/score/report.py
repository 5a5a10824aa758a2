"""The score report: metrics.json (machine-readable), metrics.md (what a person reads), PNG pictures, and
the comparison with an earlier metrics.json.

metrics.json = {"protocol", "inputs", "model", "overall": {...}, "splits": {NAME: {...}}}, each {...}
holding `pipeline.score.metrics.METRIC_KEYS` (fractions in [0, 1], null where undefined, `count`, `errors`).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from pipeline.score import metrics
from pipeline.score.graph import ScoreConfig, ScoreResult
from pipeline.storage import StorageOptions, filesystem, is_local, read_json

FRACTION_KEYS = tuple(k for k in metrics.METRIC_KEYS if k not in ("count", "errors"))
PICTURES = {"splits": "splits.png", "iou_hist": "iou_hist.png", "confusion": "confusion.png",
            "gallery": "gallery.png"}


def metrics_document(cfg: ScoreConfig, result: ScoreResult) -> dict:
    """The metrics.json content."""
    overall = result.overall
    inputs = {"predictions": cfg.predictions, "ground_truth": cfg.ground_truth, "by": list(cfg.by),
              "counts": {**result.inputs.to_dict(), "forced_mask_missing": overall.forced_missing}}
    models = result.inputs.models
    return {
        "protocol": cfg.protocol,
        "inputs": inputs,
        "model": models[0] if len(models) == 1 else (models or None),
        "overall": overall.metrics(),
        "splits": {name: result.groups[name].metrics() for name in sorted(result.groups)},
    }


def percent(value: float | None) -> str:
    """A fraction as the papers print it: 63.47; a dash where undefined."""
    return "—" if value is None else f"{100.0 * value:.2f}"


def compare(current: dict, baseline: dict) -> list[str]:
    """Markdown lines: every metric of every group present in both documents, baseline -> current."""
    lines = []
    if current.get("protocol") != baseline.get("protocol"):
        lines += [f"Warning: protocols differ (baseline {baseline.get('protocol')}, "
                  f"now {current.get('protocol')}); the numbers are not comparable one to one.", ""]
    lines += ["| group | metric | baseline | now | change (points) |", "|---|---|---|---|---|"]
    groups = [("overall", current["overall"], baseline.get("overall") or {})]
    groups += [(n, current["splits"][n], baseline.get("splits", {})[n]) for n in current["splits"]
               if n in baseline.get("splits", {})]
    for name, now, before in groups:
        for key in FRACTION_KEYS:
            a, b = before.get(key), now.get(key)
            delta = "—" if a is None or b is None else f"{100.0 * (b - a):+.2f}"
            lines.append(f"| {name} | {metrics.METRIC_LABELS[key]} | {percent(a)} | {percent(b)} | {delta} |")
        for key in ("count", "errors"):
            if before.get(key) != now.get(key):
                lines.append(f"| {name} | {key} | {before.get(key)} | {now.get(key)} | "
                             f"{(now.get(key) or 0) - (before.get(key) or 0):+d} |")
    missing = sorted(set(baseline.get("splits", {})) ^ set(current["splits"]))
    if missing:
        lines += ["", f"Groups in only one of the two: {', '.join(missing)}"]
    return lines


def markdown(doc: dict, comparison: list[str] | None = None) -> str:
    """The metrics.md table and notes."""
    head = ["group", "count", "errors", *(metrics.METRIC_LABELS[k] for k in FRACTION_KEYS)]
    rows = [[name, str(m["count"]), str(m["errors"]), *(percent(m[k]) for k in FRACTION_KEYS)]
            for name, m in [*doc["splits"].items(), ("**overall**", doc["overall"])]]
    inp, n = doc["inputs"], doc["inputs"]["counts"]
    out = [f"# Scores ({doc['protocol']} protocol)", "",
           f"Model: `{doc['model']}`. Predictions `{inp['predictions']}`, ground truth `{inp['ground_truth']}`, "
           f"grouped by {', '.join(inp['by'])}. Percentages; — where undefined.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", "## Inputs", "",
            f"- predictions read: {n['predictions_read']}; ground-truth expressions: "
            f"{n['ground_truth_expressions']}, scored: {n['scored']}, unlabelled (not scored): "
            f"{n['unlabelled']}",
            f"- counted as errors (against the model): missing {n['missing']}, status error "
            f"{n['error_status']}, unusable mask (null, invalid RLE or another size) {n['bad_masks']}",
            f"- ground-truth masks that are invalid RLE (not scored): {n['bad_gt_masks']}",
            f"- predictions without ground truth (not scored): {n['without_ground_truth']}"
            + (f", e.g. {', '.join(n['without_ground_truth_examples'])}"
               if n["without_ground_truth_examples"] else ""),
            f"- duplicate predictions ignored: {n['duplicates']}; forced masks of a wrong size ignored: "
            f"{n['bad_forced_masks']}; rejected targets without forced mask: {n['forced_mask_missing']}",
            f"- modes: {', '.join(n['modes']) or '—'}", ""]
    out += ["## Pictures", ""] + [f"![{name}]({file})" for name, file in PICTURES.items()]
    if comparison:
        out += ["", "## Compared with the baseline", "", *comparison]
    return "\n".join(out) + "\n"


@dataclass
class _Writer:
    out: str
    storage: StorageOptions

    def write(self, name: str, data: bytes) -> str:
        fs, path = filesystem(self.out, self.storage)
        fs.makedirs(path, exist_ok=True)
        target = posixpath.join(path, name) if not is_local(self.out) else f"{path.rstrip('/')}/{name}"
        with fs.open(target, "wb") as f:
            f.write(data)
        return target


def write_report(cfg: ScoreConfig, result: ScoreResult, out: str, baseline: str | None = None) -> dict:
    """Write metrics.json, metrics.md and the PNGs under `out`; return the document (and comparison lines)."""
    from pipeline.score import plots as report_plots

    doc = metrics_document(cfg, result)
    comparison = compare(doc, read_json(baseline, cfg.storage)) if baseline else None
    writer = _Writer(out, cfg.storage)
    writer.write("metrics.json", (json.dumps(doc, indent=2) + "\n").encode())
    writer.write("metrics.md", markdown(doc, comparison).encode())
    images = report_plots.load_case_images(cfg, result.cases)
    figures = {"splits": report_plots.split_bars(doc), "iou_hist": report_plots.iou_histogram(result.overall),
               "confusion": report_plots.confusion(result.overall),
               "gallery": report_plots.gallery(result.cases, images)}
    for name, png in figures.items():
        writer.write(PICTURES[name], png)
    return {"document": doc, "comparison": comparison}
