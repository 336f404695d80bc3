"""Progress for long loops: a live tqdm bar on a terminal, plain periodic log lines otherwise
(`docker logs`, CI, files), with the rate in images per second."""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("thresher")


class Progress:
    """Count work done; `update(n, loss=...)` after each batch. Use as a context manager."""

    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 10.0,
                 live: Optional[bool] = None, initial: int = 0):
        """`initial`: work done before this process started (a resumed epoch); it counts towards
        the total but not towards the rate."""
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self.initial = initial
        self._logged = -1  # `done` when the last plain line was written
        self.postfix: dict = {}
        self.started = self._last_line = time.perf_counter()
        self.live = sys.stderr.isatty() if live is None else live
        self._bar = None
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True,
                             file=sys.stderr, initial=initial)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(completed=exc[0] is None)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
        elif time.perf_counter() - self._last_line >= self.every_s:
            self._log_line()

    def _log_line(self) -> None:
        self._last_line = time.perf_counter()
        self._logged = self.done
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self.postfix.items())
        log.info("%s: %d/%d %s%s, %.1f %s/s, eta %ds%s", self.desc, self.done, self.total, self.unit,
                 percent, rate, self.unit, eta, extra)

    def close(self, completed: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif completed and self._logged != self.done:  # the last periodic line may have said it already
            self._log_line()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
