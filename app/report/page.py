"""report.html: one self-contained page that opens offline, anywhere it is copied.

Plots are embedded as base64 data URIs; there is no external CSS, script or font. A small inline
script marks on <body> how many images the browser actually rendered, which a test (or a person
with the inspector) can read.
"""
from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional

from app import atomic
from app.artifacts import REPORT_HTML, REPORT_JSON  # one report per run: select and profile each add a section

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #222; max-width: 980px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } .subtitle { color: #666; margin-top: 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
code { background: #f4f4f4; padding: 0 0.25em; border-radius: 3px; }
"""

# Counts the images the browser decoded and sets them on <body> once the page has loaded.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var shown = images.filter(function (image) { return image.complete && image.naturalWidth > 0; });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-shown", String(shown.length));
});
"""

STAT_KEYS = ("min", "p5", "median", "mean", "p95", "max")
SET_TITLES = {
    "input": "all candidates (input)",
    "selection": "selection",
    "random": "random subset of the same size",
    "datapool": "datapool",
    "selection_to_datapool": "selection to nearest datapool image",
    "removed_to_selection": "removed to nearest selected image",
}


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else escape(str(value))


def _table(header: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(run_dir: Path, plot: str, caption: str) -> str:
    data = base64.b64encode((run_dir / plot).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" data-file="{escape(plot)}" '
            f'alt="{escape(caption)}"><figcaption>{escape(caption)} '
            f'(<a href="{escape(plot)}">{escape(plot)}</a>)</figcaption></figure>')


def write_report_files(run_dir: Path, report: dict) -> None:
    """report.json and the report.html rendered from it, both atomically."""
    atomic.write_json(run_dir / REPORT_JSON, report)
    atomic.write_text(run_dir / REPORT_HTML, render_html(run_dir, report))


def read_report(run_dir: Path) -> dict:
    """The run's report.json so far (another stage's section may be in it), or {}."""
    path = run_dir / REPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def render_html(run_dir: Path, report: dict) -> str:
    """The page for `report` (the content of report.json): the selection's sections when the
    select stage wrote them, the profile's when the profile stage did."""
    parts = [f"<h1>thresher report</h1><p class=subtitle>run <code>{escape(run_dir.name)}</code>"
             + (f" · embeddings of dimension {report['embedding_dim']}" if report.get("embedding_dim") else "")
             + "</p>"]
    parts += at_a_glance(report)
    if report.get("scores"):
        parts += scores_sections(run_dir, report["scores"])
    if "counts" in report:
        parts += selection_sections(run_dir, report)
    if report.get("class_counts"):
        parts += class_count_sections(report["class_counts"])
    if report.get("training"):
        parts += training_sections(run_dir, report["training"])
    if report.get("profile"):
        parts += profile_sections(run_dir, report["profile"])
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content=\"width=device-width, initial-scale=1\">"
            f"<title>thresher report: {escape(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def at_a_glance(report: dict) -> List[str]:
    """The run's story in two lines at the top: what was selected, and how well the model trained
    on it did."""
    lines = []
    counts = report.get("counts")
    if counts:
        lines.append(f"Selected <b>{counts['selected']:,}</b> of {counts['candidates']:,} images "
                     f"({counts['corrupt']:,} corrupt and {counts['duplicates']:,} exact duplicates set aside "
                     f"before" + (f"; {counts['held_out']:,} more held out for evaluation, never selected from"
                                  if counts.get("held_out") else "") + ").")
    training = report.get("training")
    if training:
        best, final, metric = training.get("best") or {}, training["final"], training["key_metric"]
        if metric is None:  # no validation set: no key metric, no best.pt
            shown = f"train_loss {_number(final.get('train_loss'))} after {final['epoch']} epochs, no key metric"
        else:
            shown = f"<b>{escape(metric)} {_number(final.get(metric))}</b> after {final['epoch']} epochs"
        if best and best.get("epoch") != final["epoch"]:
            shown += f" (best {_number(best['value'])} at epoch {best['epoch']}: checkpoints/best.pt)"
        lines.append(f"Trained <code>{escape(training['model'])}</code> on {training['n_train']:,} images, "
                     f"validated on {training['n_val']:,}: {shown}.")
    if not lines:
        return []
    return ["<h2>At a glance</h2>", "<p>" + "<br>".join(lines) + "</p>"]


def training_sections(run_dir: Path, training: dict) -> List[str]:
    """The curve, and the key metric per epoch."""
    metric = training["key_metric"]
    picks = (f"<code>{escape(metric)}</code> picks checkpoints/best.pt" if metric is not None else
             "no validation set, so no key metric and no checkpoints/best.pt (set data.holdout_fraction)")
    parts = ["<h2>Training</h2>",
             f"<p><code>{escape(training['model'])}</code> ({escape(training['task'])}) on {training['n_train']:,} "
             f"selected images, validated on {training['n_val']:,}; {picks}.</p>"]
    captions: Dict[str, str] = training.get("plot_captions", {})
    parts += [_figure(run_dir, plot, captions.get(plot, plot)) for plot in training.get("plots", [])
              if (run_dir / plot).is_file()]
    shown = [metric] if metric not in ("train_loss", None) else []
    columns = ["epoch", "train_loss", *shown, "lr", "images_per_s"]
    rows = [[_number(record.get(column)) for column in columns] for record in training["epochs"]]
    parts.append(_table(columns, rows))
    return parts


def scores_sections(run_dir: Path, scores: dict) -> List[str]:
    """The score stage's section (app.report.scores): the method, the spread, the highest scored."""
    parts = ["<h2>Scores</h2>",
             f"<p><code>{escape(scores['method'])}</code> ({escape(scores.get('meaning', ''))}) of "
             f"<code>{escape(scores['checkpoint'])}</code> on {scores['n_scored']:,} images: "
             f"<a href=\"{escape(scores['file'])}\">{escape(scores['file'])}</a>.</p>",
             _table(list(scores["stats"]), [[_number(value) for value in scores["stats"].values()]])]
    captions: Dict[str, str] = scores.get("plot_captions", {})
    parts += [_figure(run_dir, plot, captions.get(plot, plot)) for plot in scores.get("plots", [])
              if (run_dir / plot).is_file()]
    if scores.get("top"):
        rows = [[escape(row["filename"]), _number(row["score"]), escape(row.get("predicted_class") or "–")]
                for row in scores["top"]]
        parts += [f"<h3>The {len(rows)} highest</h3>", _table(["image", "score", "predicted class"], rows)]
    return parts


def selection_sections(run_dir: Path, report: dict) -> List[str]:
    counts = report["counts"]
    captions: Dict[str, str] = report.get("plot_captions", {})
    parts = ["<h2>Selection</h2>"]
    parts += [f"<p class=note>{escape(note)}</p>" for note in report.get("notes", [])]

    parts.append("<h3>Counts</h3>")
    parts.append(_table(["", "images"], [[escape(k), _number(v)] for k, v in counts.items()]))

    stats: Optional[dict] = report.get("nearest_neighbour_distances")
    if stats:
        parts.append("<h3>Nearest-neighbour distances</h3><p>Each image's Euclidean distance to the "
                     "closest other image of the same set, on L2-normalised embeddings (0: same "
                     "direction, 2: opposite). A diverse selection has larger distances than a random "
                     "subset of the same size.</p>")
        rows = [[escape(SET_TITLES.get(name, name)), _number(values["n_points"]),
                 *(_number(values[k]) for k in STAT_KEYS)] for name, values in stats.items()]
        parts.append(_table(["set", "n", *STAT_KEYS], rows))

    pairwise: Optional[dict] = report.get("pairwise_distances")
    if pairwise:
        rows = [[escape(SET_TITLES.get(name, name)), _number(p["n_points"]), _number(p["n_used"]),
                 _number(p["n_pairs"]), _number(p["mean"]), "yes" if p["subsampled"] else "no"]
                for name, p in pairwise.items() if isinstance(p, dict)]
        parts.append("<h3>Pairwise distances</h3>")
        parts.append(_table(["set", "points", "points used", "pairs", "mean distance", "subsampled"], rows))

    if report.get("plots"):
        parts.append("<h3>Plots</h3>")
        parts += [_figure(run_dir, plot, captions.get(plot, plot)) for plot in report["plots"]]

    pairs = report.get("example_pairs")
    if pairs:
        parts.append("<h3>Removed next to retained</h3><p>The removed images closest to an image "
                     "that was kept: near duplicates the selection left out.</p>")
        rows = [[escape(p["retained"]), escape(p["removed"]), _number(p["distance"])] for p in pairs]
        parts.append(_table(["retained", "removed", "distance"], rows))

    return parts


def class_count_sections(section: Dict[str, Any]) -> List[str]:
    """report.json's class_counts (app.report.class_counts): a table per labelling, the classes the
    selection under-samples flagged; the held-out and validation sets per class."""
    parts = ["<h2>Classes</h2>"]
    titles = {"known_labels": "By known label (class folders)",
              "predicted_labels": "By predicted label (the scorer's model)"}
    for key, title in titles.items():
        counts = section.get(key)
        if not counts:
            continue
        flagged = [row["class"] for row in counts["per_class"] if row["under_sampled"]]
        parts.append(f"<h3>{escape(title)}</h3>")
        if flagged:
            parts.append(f"<p class=note>Under-sampled: {escape(', '.join(flagged))} (share of the selection under "
                         f"{section.get('under_sampled_ratio', 0.5):g} of the share of the "
                         f"candidates). sampler.balance selects per class.</p>")
        rows = [[("⚠ " if row["under_sampled"] else "") + escape(row["class"]), _number(row["candidates"]),
                 _number(row["selected"]), _percent(row["selected_fraction"]), _percent(row["share_of_candidates"]),
                 _percent(row["share_of_selection"])] for row in counts["per_class"]]
        without = counts["without_label"]
        if without["candidates"]:
            rows.append(["(no label)", _number(without["candidates"]), _number(without["selected"]), "", "", ""])
        parts.append(_table(["class", "candidates", "selected", "share selected", "share of candidates",
                             "share of selection"], rows))
    for key, title in (("held_out", "Held out for evaluation"), ("validation", "Validation set")):
        counts = section.get(key)
        if not counts or (key == "validation" and _same_images(counts, section.get("held_out"))):
            continue
        parts.append(f"<h3>{escape(title)}</h3><p>{escape(counts['source'])}: {counts['n_images']:,} images.</p>")
        rows = [[escape(name), _number(n)] for name, n in counts["per_class"].items()]
        if counts["without_label"]:
            rows.append(["(no label)", _number(counts["without_label"])])
        parts.append(_table(["class", "images"], rows))
    return parts if len(parts) > 1 else []


def _same_images(validation: Dict[str, Any], held_out: Optional[Dict[str, Any]]) -> bool:
    """The validation set is the held-out one (data.holdout_fraction): one table says it."""
    return bool(held_out) and held_out["per_class"] == validation["per_class"] and \
        held_out["n_images"] == validation["n_images"]


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


PROFILE_MODES = {"train": "training steps", "infer": "inference (forward passes, results on the host)",
                 "latency": "latency: one image at a time, as live use does"}


def _fixed(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def profile_sections(run_dir: Path, profile: dict) -> List[str]:
    """The sweep's table, the recommended override line and the plots."""
    parts = ["<h2>Profile</h2>",
             f"<p>{escape(PROFILE_MODES.get(profile['mode'], profile['mode']))} of <code>{escape(profile['model'])}"
             f"</code> ({escape(profile['task'])}) on data={escape(profile['data'])} "
             f"({profile['n_images']:,} images, image_size {profile['image_size']}), device "
             f"<code>{escape(profile['device'])}</code>, amp {escape(str(profile['amp']))}. Every setting ran "
             f"{profile['warmup_steps']} warm-up steps, then {profile['steps']} measured steps; a step's time is "
             f"the wait for its batch plus the compute, read after the device synchronised.</p>"]
    recommended = profile.get("recommended")
    if recommended:
        parts.append(f"<h3>Recommended</h3><pre><code>{escape(recommended['overrides'])}</code></pre>"
                     f"<p>{escape(recommended['reason'])}.</p>")
    else:
        parts.append("<p class=note>No setting ran: every one was out of memory. Try smaller batch sizes.</p>")

    latency = profile["mode"] != "train"
    header = ["batch", "workers", "status", "samples/s", "step p50 ms", "step p95 ms", "compute share",
              "CPU ms/sample", "host RSS peak MB", "host PSS MB", "GPU mem peak MB", "GPU util %"]
    if latency:
        header += ["latency p50 ms", "p90", "p95", "p99"]
    rows = []
    for row in profile["settings"]:
        workers = str(row["num_workers"])
        if row.get("num_workers_used") not in (None, row["num_workers"]):
            workers += f" (ran {row['num_workers_used']})"
        if row["status"] != "ok":
            status = "out of memory" if row["status"] == "oom" else f"failed: {row.get('error', '')}"
            rows.append([_number(row["batch_size"]), escape(workers), escape(status)] + ["–"] * (len(header) - 3))
            continue
        cells = [_number(row["batch_size"]), escape(workers), "ok", _fixed(row["samples_per_s"], 2),
                 _fixed(row["step_ms"]["p50"], 2), _fixed(row["step_ms"]["p95"], 2),
                 _fixed(row["compute_efficiency"], 3), _fixed(row["cpu_ms_per_sample"], 2),
                 _fixed(row["host_rss_peak_mb"], 0), _fixed(row.get("host_pss_mb"), 0),
                 _fixed(row["gpu_memory_peak_mb"], 0),
                 _fixed(row["gpu_utilization_pct"], 0)]
        if latency:
            cells += [_fixed(row["latency_ms"][p], 2) for p in ("p50", "p90", "p95", "p99")]
        rows.append(cells)
    parts.append("<h3>Settings</h3>" + _table(header, rows))
    parts.append("<p>compute share: the part of the step time spent computing rather than waiting for data "
                 "(1.0: the loader keeps up). CPU ms/sample: CPU time of the process and its loader workers. "
                 "host RSS peak: the process and its workers, sampled every 0.1 s, shared pages counted in each; "
                 "host PSS: the same at the end of the measured steps with shared pages split (what the tree "
                 "really holds). "
                 + ("latency: from a batch in hand to its results on the host." if latency else "") + "</p>")
    captions: Dict[str, str] = profile.get("plot_captions", {})
    parts += [_figure(run_dir, plot, captions.get(plot, plot)) for plot in profile.get("plots", [])]
    if profile.get("traces"):
        links = ", ".join(f'<a href="{escape(t)}">{escape(t)}</a>' for t in profile["traces"])
        parts.append(f"<p>torch.profiler Chrome traces (open in chrome://tracing or ui.perfetto.dev): {links}</p>")
    return parts
