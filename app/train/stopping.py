"""Stop training at a step boundary when SIGTERM or SIGINT arrives.

Raising from the signal handler (as the other stages do) could leave the optimizer halfway
through an update, and a checkpoint of that state would not resume exactly. So while training,
a signal only sets a flag that the loop checks after each step; the loop then saves and stops.
A second signal, or a step that does not end within `grace_s`, stops at once; the process
ends within run.EXIT_DEADLINE_S of the first signal whatever it is doing.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional

from app.run import Interrupted, arm_exit_deadline

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_at_step_boundary(grace_s: float = 8.0) -> Iterator[StopRequest]:
    request = StopRequest()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def on_alarm(_signum, _frame) -> None:
        raise Interrupted(request.signum or signal.SIGTERM)

    def on_signal(signum, _frame) -> None:
        if request.signum is not None:
            raise Interrupted(signum)
        request.signum = signum
        arm_exit_deadline(signum)  # whatever the save after the step does, the process ends in time
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, grace_s)

    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    try:
        yield request
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
