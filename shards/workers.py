"""The build's worker processes: image files are decoded there, since decoding holds the GIL
for about a quarter of its time and threads stop scaling at 2-3.

Workers are forked from a clean server (multiprocessing's forkserver), never from the build
process, whose threads (s3fs's event loop) must not be forked; each opens its own filesystem
(shardio.storage caches one per process). The server may be older than the build, so workers
take the build's environment (the S3 endpoint and credentials) when they start. As with any
multiprocessing, a script that calls `shards.build` must guard its top level with
`if __name__ == "__main__":` (the workers import it).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """`workers` processes, started on first use; None for one worker (work in-process)."""
    if workers < 2:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["shards.writer"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_take_environment,
                               initargs=(dict(os.environ),))


def _take_environment(environment: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environment)
