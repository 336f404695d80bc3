"""A run's life in one process: SIGTERM/SIGINT become `Interrupted`, one signal ends the process
within EXIT_DEADLINE_S whatever it is doing, training stops at a step boundary, and every stage
starts from the same seed.

A low-floor module: it imports nothing of the app (and torch only inside `seed_everything`), so
the runner and the training engine it launches, in its own process or under torchrun, share it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

log = logging.getLogger("thresher")

# Seconds from the first SIGTERM/SIGINT to a forced exit, whatever the run is doing.
EXIT_DEADLINE_S = 10.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: stop, save what can be saved, exit 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame) -> None:
    arm_exit_deadline(signum)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """PID 1 in a container ignores SIGTERM unless it handles it: `docker stop` needs this."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)


def restore_default_signal_handlers() -> None:
    """Python's own behaviour again once a run is over: SIGTERM ends the process, SIGINT raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


_exit_deadline: Optional[threading.Timer] = None


def arm_exit_deadline(signum: int, seconds: float = EXIT_DEADLINE_S) -> None:
    """One signal ends the process within `seconds`, even when a thread is stuck in a read that
    never returns (a FIFO, a hung network mount) and would keep the interpreter from exiting."""
    global _exit_deadline
    if _exit_deadline is not None:
        return

    def force_exit() -> None:
        log.error("still running %.0fs after %s: exiting now", seconds, signal.Signals(signum).name)
        logging.shutdown()
        os._exit(128 + signum)

    _exit_deadline = threading.Timer(seconds, force_exit)
    _exit_deadline.daemon = True
    _exit_deadline.start()


class StopRequest:
    """Set by a signal during training; the loop checks it after each step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_at_step_boundary(grace_s: float = 8.0) -> Iterator[StopRequest]:
    """While training, SIGTERM or SIGINT only sets the yielded flag, which the loop checks after
    each step, then saves and stops: raising from the handler could leave the optimizer halfway
    through an update, and a checkpoint of that state would not resume exactly. A second signal,
    or a step that does not end within `grace_s`, stops at once; the process ends within
    EXIT_DEADLINE_S of the first signal whatever it is doing."""
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


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators, so each stage runs alike fresh or resumed."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
