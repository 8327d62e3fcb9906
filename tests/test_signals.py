"""What a stop signal means: USR2 comes back (requeue), SIGTERM stops for good."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from imgcls.signals import StopRequest, keep_worker_through_cancel, wants_requeue
from tests.conftest import EXACT_RUN, REPO, child_env


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signals, requeue, reason", [
    ([signal.SIGTERM], False, "SIGTERM"),                  # scancel
    ([signal.SIGUSR2], True, "SIGUSR2"),                   # time limit
    ([signal.SIGUSR2, signal.SIGTERM], True, "SIGUSR2"),   # preemption: USR2, GraceTime, SIGTERM
])
def test_only_the_requeue_signal_asks_for_a_requeue(restore_handlers, signals, requeue, reason):
    stop = StopRequest()
    assert not stop.requested
    for s in signals:
        os.kill(os.getpid(), s)
    assert stop.requested and stop.requeue == requeue and stop.describe() == reason
    assert wants_requeue(f"signal {stop.describe()}") == requeue and not wants_requeue("max_steps")


class CancelledMidway(IterableDataset):
    """Six items; the worker gets SIGTERM, what slurmd sends every process of the step, after
    the first. It sends it to itself inside the dataset: a kill from outside could land while
    the worker holds the lock of the loader's shared done-event, and then the main process
    waits on that lock forever (seen once in CI)."""

    def __iter__(self):
        for i in range(6):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield torch.tensor([i])


@pytest.mark.parametrize("init, survives", [(keep_worker_through_cancel, True), (None, False)])
def test_loader_worker_outlives_the_cancel_signal_only_when_told(init, survives):
    loader = DataLoader(CancelledMidway(), batch_size=None, num_workers=1, worker_init_fn=init, prefetch_factor=1)
    batches = iter(loader)
    seen = [int(next(batches))]
    if survives:
        seen += [int(b) for b in batches]
        assert seen == list(range(6))
    else:
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            seen += [int(b) for b in batches]


# Sends USR2 while the interpreter shuts down, after Python has given signal handlers back to
# their defaults: what SLURM's time-limit signal did to a job that had just finished.
LATE_SIGNAL = """
import os, signal, sys, time
from jobs.train import main

class LateTimeLimit:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.5)

main(sys.argv[1:])
late = LateTimeLimit()
"""


def test_a_requeue_signal_after_the_work_is_done_does_not_kill_the_job(bands_dataset, tmp_path):
    args = ["--config", "", f"data.url={bands_dataset}", f"run.dir={tmp_path / 'run'}", *EXACT_RUN, "train.epochs=1"]
    done = subprocess.run([sys.executable, "-c", LATE_SIGNAL, *args], cwd=REPO, capture_output=True, text=True,
                          env=child_env(), timeout=180)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
