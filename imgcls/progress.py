"""Progress for people: a tqdm bar on a terminal, plain log lines elsewhere; for training
(ProgressReport) and for any other long task (TaskProgress).

A bar redraws itself with carriage returns, which in a SLURM log file become one endless line
(about 50 MB per job-day, with the INFO lines spliced into it). So the bar is drawn only when
stderr is a terminal; otherwise one line every `every_s` seconds says where the run is:

    step 1200/4160 (epoch 8/26), loss 0.3121, 5210 img/s, ETA 9m28s
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("imgcls.progress")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressReport:
    """update(step) after every optimizer step; metrics(loss, images_per_s) at each log.
    Off a terminal, no line is written before the first metrics: it would say `loss nan`."""

    def __init__(self, total: int, initial: int, epochs: int, every_s: float = 30.0, terminal: bool | None = None):
        self.total, self.step, self.epochs, self.every_s = total, initial, epochs, every_s
        self.epoch, self.loss, self.images_per_s = 0, None, 0.0
        self.start_step, self.start_time = initial, time.monotonic()
        self.last_line = self.start_time
        self.bar = None
        if sys.stderr.isatty() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}")

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step
        now = time.monotonic()
        if self.bar is None and self.loss is not None and now - self.last_line >= self.every_s:
            self.last_line = now
            log.info(self.line(now))

    def metrics(self, loss: float, images_per_s: float) -> None:
        self.loss, self.images_per_s = loss, images_per_s
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}")

    def line(self, now: float) -> str:
        done = self.step - self.start_step
        eta = (now - self.start_time) / done * (self.total - self.step) if done else float("nan")
        return (f"step {self.step}/{self.total} (epoch {self.epoch + 1}/{self.epochs}), loss {self.loss:.4f}, "
                f"{self.images_per_s:.0f} img/s, ETA {format_duration(eta) if eta == eta else '?'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TaskProgress:
    """A long task's progress (an evaluation, an export check, a calibration), as ProgressReport
    shows training's: a tqdm bar on a terminal, else a line every `every_s` seconds, and one
    at the end:

        evaluate test: 1200/10000 images, 520 images/s, ETA 0m17s
        evaluate test: 10000 images in 0m19s, 526 images/s

    Use it as a context manager; update(n) after each batch of n.
    """

    def __init__(self, name: str, total: int, unit: str = "images", every_s: float = 30.0,
                 terminal: bool | None = None):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.done, self.start = 0, time.monotonic()
        self.last_line = self.start
        self.bar = None
        if sys.stderr.isatty() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit=unit.rstrip("s"), dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = format_duration((self.total - self.done) / rate) if rate else "?"
            log.info("%s: %d/%d %s, %.0f %s/s, ETA %s", self.name, self.done, self.total, self.unit, rate, self.unit,
                     eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            return
        elapsed = time.monotonic() - self.start
        log.info("%s: %d %s in %s, %.0f %s/s", self.name, self.done, self.unit, format_duration(elapsed),
                 self.done / max(elapsed, 1e-9), self.unit)

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
