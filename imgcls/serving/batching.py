"""Dynamic batching: single images from concurrent requests go to one model thread in batches.

A batch closes when full (`max_batch`), `max_wait_ms` after its first image, or at once when no
other image is queued or being decoded (a lone request does not wait for company)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgcls.inference import Predictor


class Batcher:
    """logits = await batcher.logits(image): one [C,H,W] image in, its logits out, computed in a
    batch with whatever other requests arrived meanwhile."""

    def __init__(self, model: Predictor, max_batch: int, max_wait_ms: float, observe_batch=lambda n: None):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1e3
        self.observe_batch = observe_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arriving = 0  # images being decoded: only they can join a batch that waits
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")  # runtimes need not be thread-safe
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def logits(self, image: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _next_batch(self) -> list:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if self.queue.empty() and not self.arriving:
                break  # nobody else is coming: a lone request does not wait for company
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                batch.append(self.queue.get_nowait() if timeout <= 0 else
                             await asyncio.wait_for(self.queue.get(), timeout))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            images = np.stack([image for image, _ in batch])
            self.observe_batch(len(batch))
            try:
                logits = await loop.run_in_executor(self.executor, self.model, images)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), row in zip(batch, logits):
                if not future.done():  # the client may have gone
                    future.set_result(row)
