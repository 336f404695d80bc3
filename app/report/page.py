"""report.html: one self-contained page that opens offline, anywhere it is copied.

Plots are embedded as base64 data URIs; there is no external CSS, script or font. A small inline
script marks on <body> how many images the browser actually rendered, which a test (or a person
with the inspector) can read.
"""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Dict, List, Optional

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


def render_html(run_dir: Path, report: dict, captions: Dict[str, str], notes: List[str]) -> str:
    """The page for `report` (the content of report.json); `captions` maps plot file -> caption."""
    counts = report["counts"]
    parts = [f"<h1>Selection report</h1><p class=subtitle>run <code>{escape(run_dir.name)}</code>"
             + (f" · embeddings of dimension {report['embedding_dim']}" if report.get("embedding_dim") else "")
             + "</p>"]
    parts += [f"<p class=note>{escape(note)}</p>" for note in notes]

    parts.append("<h2>Counts</h2>")
    parts.append(_table(["", "images"], [[escape(k), _number(v)] for k, v in counts.items()]))

    stats: Optional[dict] = report.get("nearest_neighbour_distances")
    if stats:
        parts.append("<h2>Nearest-neighbour distances</h2><p>Each image's Euclidean distance to the "
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
        parts.append("<h2>Pairwise distances</h2>")
        parts.append(_table(["set", "points", "points used", "pairs", "mean distance", "subsampled"], rows))

    if report.get("plots"):
        parts.append("<h2>Plots</h2>")
        parts += [_figure(run_dir, plot, captions.get(plot, plot)) for plot in report["plots"]]

    pairs = report.get("example_pairs")
    if pairs:
        parts.append("<h2>Removed next to retained</h2><p>The removed images closest to an image "
                     "that was kept: near duplicates the selection left out.</p>")
        rows = [[escape(p["retained"]), escape(p["removed"]), _number(p["distance"])] for p in pairs]
        parts.append(_table(["retained", "removed", "distance"], rows))

    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content=\"width=device-width, initial-scale=1\">"
            f"<title>thresher selection report: {escape(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")
