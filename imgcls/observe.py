"""What a training run shows of itself: metrics (the Tracker), rank 0's plots and the
progress report, behind one `TrainingObserver` that the training loop calls at a few points:
start, each step, each epoch's start, each logged step, each validation, and finish.

The tracker stays the Trainer's checkpoint part "tracker" (its state is the wandb run id and
the last logged step); the observer only drives it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from imgcls.progress import ProgressReport
from imgcls.tracking import Tracker
from shardio import storage


class TrainingObserver:
    """Rank 0 draws the plots and reports progress; the tracker decides itself what each rank
    logs (it is enabled on rank 0 only). The val confusion matrix is plotted at most every
    `track.plots_every_s` seconds; one left unplotted is drawn at finish."""

    def __init__(self, track_cfg, tracker: Tracker, run_dir: str, classes: Sequence[str], epochs: int,
                 is_main: bool, fence: Callable[[], None]):
        self.cfg, self.tracker, self.run_dir, self.classes = track_cfg, tracker, run_dir, list(classes)
        self.epochs, self.is_main, self.fence = epochs, is_main, fence
        self.report: ProgressReport | None = None
        self.plots: EpochPlots | None = None  # rank 0's
        self.unplotted, self.last_plot = None, time.monotonic()

    def start(self, config: dict, total_steps: int, step: int) -> None:
        """`total_steps` of the whole run, of which `step` are done (a resume)."""
        self.tracker.start(config)
        if self.is_main:
            self.plots = EpochPlots(self.run_dir, self.classes, self.tracker.log_image, self.fence)
        if self.is_main and self.cfg.progress:
            self.report = ProgressReport(total_steps, step, self.epochs, self.cfg.progress_every_s)
        self.unplotted, self.last_plot = None, time.monotonic()

    def epoch_started(self, epoch: int) -> None:
        if self.report is not None:
            self.report.set_epoch(epoch)

    def stepped(self, step: int) -> None:
        if self.report is not None:
            self.report.update(step)

    def train_logged(self, step: int, record: dict) -> None:
        """A logged step's train record (its loss and images/s go to the progress report)."""
        self.tracker.log(step, record)
        if self.report is not None:
            self.report.metrics(record["train/loss"], record["train/images_per_s"])

    def validated(self, step: int, record: dict, confusion=None) -> None:
        """An epoch's val record; `confusion` (single-label runs) is plotted, throttled."""
        self.tracker.log(step, record)
        if not self.is_main or confusion is None:
            return
        self.unplotted = confusion
        if time.monotonic() - self.last_plot >= self.cfg.plots_every_s:
            self.plots.submit(self.tracker.records, confusion.matrix, step)
            self.unplotted, self.last_plot = None, time.monotonic()

    def finish(self, step: int) -> None:
        """The last unplotted matrix, then waits for the plots (complete when train() returns)."""
        if self.unplotted is not None:
            self.plots.submit(self.tracker.records, self.unplotted.matrix, step)
        if self.plots is not None:
            self.plots.close()
        if self.report is not None:
            self.report.close()
        self.tracker.finish()


class EpochPlots:
    """Rank 0's training curves and val confusion matrix (PNG, and the full matrix as
    confusion_val.json) in the run dir, drawn in a worker thread so that no rank waits on
    matplotlib. A request still waiting is replaced by a newer one; close() waits for the last.

    `log_image(step, name, url)` (the tracker's) runs in the caller's thread only, at the next
    request or at close, so wandb is never called from two threads; a drawing's error is
    raised there too."""

    def __init__(self, run_dir: str, class_names: Sequence[str], log_image: Callable[[int, str, str], None],
                 fence: Callable[[], None] = lambda: None):
        self.run_dir, self.class_names, self.log_image, self.fence = run_dir, list(class_names), log_image, fence
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imgcls-plots")
        self._futures: list[Future] = []

    def submit(self, records: Iterable[dict], matrix: torch.Tensor, step: int) -> None:
        self._log_drawn(wait=False)
        if self._futures and self._futures[-1].cancel():  # not started: superseded
            self._futures.pop()
        matrix = matrix.detach().cpu().numpy().copy()
        self._futures.append(self._pool.submit(self._draw, list(records), matrix, step))

    def close(self) -> None:
        self._log_drawn(wait=True)
        self._pool.shutdown()

    def _draw(self, records: list[dict], matrix, step: int) -> tuple[int, str]:
        from imgcls.plots import plot_confusion_matrix, plot_training_curves  # matplotlib: here, off the loop

        self.fence()  # the lease: a job that lost the run dir draws nothing into it
        plot_training_curves(records, storage.join(self.run_dir, "training_curves.png"))
        full = {"classes": self.class_names, "matrix": matrix.tolist()}
        storage.write_bytes_atomic(storage.join(self.run_dir, "confusion_val.json"), json.dumps(full).encode())
        png = storage.join(self.run_dir, "confusion_val.png")
        plot_confusion_matrix(matrix, self.class_names, png)
        return step, png

    def _log_drawn(self, wait: bool) -> None:
        while self._futures and (wait or self._futures[0].done()):
            step, png = self._futures.pop(0).result()
            self.log_image(step, "val/confusion_matrix", png)
