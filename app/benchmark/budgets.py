"""What the benchmark's table and its plot both say about budgets and the baseline."""
from __future__ import annotations

from typing import Any

# The sampler every other is compared with.
BASELINE = "random"


def is_fraction(budget: Any) -> bool:
    """n_samples as the config reads it: a float in (0, 1] is a fraction of the candidates, an int a count."""
    return isinstance(budget, float)


def budget_label(budget: Any) -> str:
    """0.05 -> '5%' (a fraction of the candidates); 20 -> '20' (a count of images)."""
    return f"{budget * 100:g}%" if is_fraction(budget) else f"{budget:g}"
