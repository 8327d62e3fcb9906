"""Preemption and time-limit signals only set a flag.

SLURM sends USR2 on preemption (preempt_send_user_signal) and `--signal=USR2@N` before the
time limit. Saving inside a signal handler is unsafe (it can interrupt a collective or a
half-written tensor), so the handler records the request and the trainer acts on it at the
next optimizer-step boundary, after all ranks agree through a collective.
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # nothing else: see the module docstring

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"
