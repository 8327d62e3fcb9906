"""Progress of a long pass (build, verify --deep, index): a tqdm bar on a terminal, else a
plain log line at every tenth of the way, which reads well in a batch job's log file."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("shards")


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "images"):
        self.total, self.desc, self.unit, self.done, self._logged = total, desc, unit, 0, 0
        tty = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=total, unit=unit, desc=desc) if tty else None
        self._log = enabled and not tty

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log and self.total and self.done * 10 // self.total > self._logged:
            self._logged = self.done * 10 // self.total
            log.info("%s: %d of %d %s (%d%%)", self.desc, self.done, self.total, self.unit,
                     100 * self.done // self.total)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
