"""What keeps one client from costing the server more than its share:

- the body is read asynchronously, refused with 413 once it exceeds the limit, and must
  arrive within the read deadline (408);
- the request headers must arrive within the same deadline, else the connection is closed
  (`deadline_protocol`; uvicorn itself never times out a request whose headers trickle in);
- image decodes run on at most `workers` threads (the cores), and at most `max_waiting`
  images wait for one: beyond that the answer is 503 with Retry-After, as TorchServe does.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import h11
from fastapi import HTTPException, Request
from uvicorn.protocols.http.h11_impl import H11Protocol


async def read_body(request: Request, limit: int, deadline_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 408
    when it has not all arrived `deadline_s` after the headers."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {int(declared)} bytes, more than the {limit} allowed")
    body = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPException(413, f"body larger than the {limit} bytes allowed")
    except TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {deadline_s:g} s", {"Connection": "close"}) from None
    return bytes(body)


async def image_bytes(request: Request, body: bytes) -> bytes:
    """The image of a multipart form (its first file field) or the raw body."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async with Request(request.scope, receive).form(max_files=1, max_fields=16) as form:
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise HTTPException(400, "multipart body without a file field")
        return await files[0].read()


class DecodePool:
    """Decodes on `workers` threads. A request whose images would take the number queued or
    decoding above `max_waiting` is answered 503 (one alone is always admitted: the body limit
    bounds it)."""

    def __init__(self, workers: int = 0, max_waiting: int = 64):
        self.workers = workers or os.cpu_count() or 1
        self.max_waiting, self.waiting = max_waiting, 0
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")

    async def map(self, fn, rows: list, *args) -> list:
        if self.waiting and self.waiting + len(rows) > self.max_waiting:
            raise HTTPException(503, f"{self.waiting} images are waiting to be decoded (--max-queue "
                                     f"{self.max_waiting}); retry shortly", {"Retry-After": "1"})
        self.waiting += len(rows)
        loop = asyncio.get_running_loop()
        try:
            return list(await asyncio.gather(*(loop.run_in_executor(self.executor, fn, row, *args) for row in rows)))
        finally:
            self.waiting -= len(rows)


def deadline_protocol(header_deadline_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection whose
    next request has not got its headers complete `header_deadline_s` after it opened (or
    after its last response) is closed. uvicorn's own keep-alive timer does not do this: any
    byte received cancels it, so a client that trickles a header line holds its socket forever."""

    class DeadlineH11Protocol(H11Protocol):
        header_timer = None

        def _arm_header_deadline(self) -> None:
            if self.header_timer:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(header_deadline_s, self._header_deadline)

        def _header_deadline(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.timeout_keep_alive_handler()  # closes the connection

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            if self.header_timer:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return DeadlineH11Protocol
