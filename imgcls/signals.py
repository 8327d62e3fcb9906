"""Stop signals only set a flag; which signal it was decides whether the job comes back.

- USR2 means "stop and come back": SLURM sends it on preemption (preempt_send_user_signal)
  and `--signal=USR2@N` before the time limit. The job checkpoints and is requeued.
- SIGTERM means "stop": `scancel` and `jobs/status.py cancel` send it. The job may write a
  last checkpoint but is never requeued (submitit ignores SIGTERM for the same reason).
  A preempted job also gets SIGTERM, GraceTime after its USR2: USR2 therefore sticks.

Saving inside a signal handler is unsafe (it can interrupt a collective or a half-written
tensor), so the handler records the request and the trainer acts on it at the next
optimizer-step boundary, after all ranks agree through a collective.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so ours (below) runs before it
import signal

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR2     # preemption, time limit: checkpoint and requeue
CANCEL_SIGNAL = signal.SIGTERM      # scancel: checkpoint and end


class StopRequest:
    def __init__(self, signals=(REQUEUE_SIGNAL, CANCEL_SIGNAL)):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def close(self) -> None:
        """The work is over. A requeue signal that still comes (the time limit reached while
        the job was finishing) is ignored from now on: Python gives its handlers back to the
        default action while the interpreter shuts down, a late USR2 would then kill the task,
        and SLURM would mark a finished job FAILED. Other signals get their old handlers."""
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_IGN if s == REQUEUE_SIGNAL else previous)

    def _handle(self, signum, frame) -> None:
        if self.signum != REQUEUE_SIGNAL:  # nothing else: see the module docstring
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def requeue(self) -> bool:
        """True when the job should come back after stopping (preemption, time limit)."""
        return self.signum == REQUEUE_SIGNAL

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"


def wants_requeue(reason: str) -> bool:
    """Whether a trainer result's reason ("signal <NAME>", see StopRequest.describe) asks
    for a requeue: only the requeue signal does, never a cancel."""
    return reason == f"signal {REQUEUE_SIGNAL.name}"


def keep_worker_through_cancel(worker_id: int) -> None:
    """DataLoader worker_init_fn. scancel's SIGTERM reaches every process of the job step,
    and torch's loader workers die on it, so the rank fails with "DataLoader worker exited
    unexpectedly" instead of stopping at its next step with a checkpoint. The rank decides;
    its workers are shut down with its loader (or by SLURM's SIGKILL after KillWait)."""
    signal.signal(CANCEL_SIGNAL, signal.SIG_IGN)


def kill_leftover_workers() -> None:
    """At exit, kill loader workers that are still alive (an error's traceback kept their
    loader from shutting them down): they ignore SIGTERM (see keep_worker_through_cancel), so
    multiprocessing's exit handler, which terminates and then joins them, would wait forever."""
    for child in multiprocessing.active_children():
        child.kill()


# Registered at import, by anything that can start such workers (the reader imports this
# module), and after multiprocessing's own handler, so that it runs first.
atexit.register(kill_leftover_workers)
