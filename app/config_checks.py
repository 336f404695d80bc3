"""Low floor for the config checks: one-line refusals with a did-you-mean suggestion, shared by
app.config and the package schemas (app/*/schema.py). Imports nothing of the app but app.errors,
so every schema module can use it without an import cycle."""
from __future__ import annotations

import difflib
from typing import Any, Iterable, List

from app.errors import UserError


def closest(word: str, candidates: Iterable[str]) -> List[str]:
    """The nearest candidates, ignoring case; a dotted key is compared with its siblings by last
    part, so `trainer.batch_sise` finds `trainer.batch_size` and not every `trainer.*`."""
    word = str(word)
    unique = list(dict.fromkeys(str(c) for c in candidates))
    if "." in word:
        parent, leaf = word.rsplit(".", 1)
        siblings = {c.rsplit(".", 1)[1]: c for c in unique
                    if c.startswith(parent + ".") and "." not in c[len(parent) + 1:]}
        if siblings:
            return [siblings[n] for n in _nearest(leaf, list(siblings))]
    return _nearest(word, unique)


def _nearest(word: str, candidates: List[str]) -> List[str]:
    """Candidates at least 60% alike, and nearly as alike as the best one, best first."""
    scored = sorted(((difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio(), c)
                     for c in candidates), key=lambda pair: -pair[0])
    if not scored or scored[0][0] < 0.6:
        return []
    return [c for score, c in scored[:3] if score >= max(0.6, scored[0][0] - 0.08)]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    near = closest(word, candidates)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def refuse(key: str, value: Any, allowed: str, candidates: Iterable[str] = ()) -> UserError:
    """The error for `key=value`: what would be allowed, and the nearest candidates."""
    return UserError(f"{key}={value!r} is not allowed: {allowed}{did_you_mean(value, candidates)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(names: List[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
