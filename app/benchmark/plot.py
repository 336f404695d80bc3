"""The benchmark's learning curve: the key metric against the budget (log x axis), a line per
sampler with its spread over seeds as a band, written atomically with the report's PNG helpers."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from app.benchmark.budgets import BASELINE, budget_label, is_fraction
from app.report.plots import _figure, save_png


def budget_axis(cells: Dict[Tuple[str, Any], Any], budgets: Sequence[Any]) -> Tuple[Dict[Any, float], str]:
    """Where each budget sits on the x axis, and the axis label: percent of the candidates when every
    budget is a fraction, else the mean number of images selected at it."""
    if all(is_fraction(budget) for budget in budgets):
        return {budget: 100.0 * budget for budget in budgets}, "budget (% of the candidate images, log scale)"
    positions = {}
    for budget in budgets:
        sizes = [n for (_, b), cell in cells.items() if b == budget for n in cell.n_selected]
        positions[budget] = sum(sizes) / len(sizes) if sizes else float(budget)
    return positions, "images selected (log scale)"


def plot_learning_curve(cells: Dict[Tuple[str, Any], Any], samplers: Sequence[str], budgets: Sequence[Any],
                        key_metric: str, n_seeds: int, path: Path) -> None:
    """A line per sampler through the means over seeds, a band of ± one standard deviation, the
    baseline (random) drawn dashed in black so the others read against it."""
    figure = _figure(7, 4.2)
    axes = figure.add_subplot()
    positions, x_label = budget_axis(cells, budgets)
    all_values = []
    for sampler in samplers:
        points = [(positions[b], cells[(sampler, b)]) for b in budgets if (sampler, b) in cells]
        if not points:
            continue
        x = [position for position, _ in points]
        means = [cell.mean for _, cell in points]
        stds = [0.0 if math.isnan(cell.std) else cell.std for _, cell in points]
        all_values += [v for _, cell in points for v in cell.values.values()]
        style = dict(color="black", linestyle="--") if sampler == BASELINE else dict(linestyle="-")
        line, = axes.plot(x, means, marker="o", label=sampler, **style)
        axes.fill_between(x, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          color=line.get_color(), alpha=0.15, linewidth=0)
    axes.set_xscale("log")
    shown = [positions[b] for b in budgets]
    axes.set_xticks(shown)
    axes.set_xticklabels([budget_label(b) for b in budgets])
    axes.minorticks_off()
    if all_values and all(0 <= v <= 1 for v in all_values):  # a share (top-1, mAP)
        axes.set_ylim(max(0.0, min(all_values) - 0.05), min(1.02, max(all_values) + 0.05))
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"{key_metric} (held-out images)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    axes.set_title(f"Selection benchmark: {key_metric} against budget ({seeds})", fontsize=10)
    save_png(figure, path)
