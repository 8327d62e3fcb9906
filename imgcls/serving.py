"""An HTTP inference server with dynamic batching, for any model `open_model` reads.

    POST /predict   an image, as multipart form data (any file field) or as the raw body;
                    ?top_k=N. Answers {"top_k": [{"class", "index", "prob"}, ...]}.
    GET  /health    {"status": "ok", "model", "format", "classes"}
    GET  /metrics   Prometheus text: requests by status, batch sizes, request latency
                    (a histogram, and the p50/p90/p99 of the last 1024 requests).

Built on FastAPI + uvicorn rather than LitServe: LitServe batches too, but runs the model in
worker processes it spawns itself and owns the request parsing, so the 4xx answers for bad
images, the body limit and the Prometheus registry would have to be fitted into its hooks;
FastAPI gives the request as it is, and the batching is one small asyncio loop (`Batcher`).

The request path never blocks the event loop: the body is read asynchronously (a slow client
only holds its own connection), the image is decoded in the thread pool, and the model runs
in one dedicated thread on batches of up to `max_batch` requests, each batch closed when full,
`max_wait_ms` after its first request, or at once when no other request is queued or being
decoded (a lone request does not wait). The preprocessing is predict's (`load_image`: the
evaluation transform), so answers equal `jobs/predict.py`'s.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import SummaryMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgcls.inference import Predictor, load_image, softmax, top_classes

QUANTILES = (0.5, 0.9, 0.99)


# ---- metrics --------------------------------------------------------------------------
class RecentLatency:
    """A Prometheus summary with quantiles over the last `window` request latencies
    (prometheus_client's own Summary has no quantiles)."""

    def __init__(self, window: int = 1024):
        self.values = collections.deque(maxlen=window)
        self.count, self.sum = 0, 0.0

    def observe(self, seconds: float) -> None:
        self.values.append(seconds)
        self.count += 1
        self.sum += seconds

    def collect(self):
        family = SummaryMetricFamily("imgcls_request_latency_recent_seconds",
                                     f"/predict latency over the last {self.values.maxlen} requests",
                                     count_value=self.count, sum_value=self.sum)
        if self.values:
            for q, value in zip(QUANTILES, np.quantile(np.fromiter(self.values, float), QUANTILES)):
                family.add_sample(family.name, {"quantile": str(q)}, float(value))
        yield family


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("imgcls_requests", "/predict requests by HTTP status", ["status"],
                                registry=self.registry)
        buckets = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("imgcls_batch_size", "images per model call", buckets=buckets,
                                    registry=self.registry)
        self.latency = Histogram("imgcls_request_latency_seconds", "/predict latency, body read to answer",
                                 registry=self.registry)
        self.recent = RecentLatency()
        self.registry.register(self.recent)

    def request_done(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        if status == 200:
            self.latency.observe(seconds)
            self.recent.observe(seconds)


# ---- batching -------------------------------------------------------------------------
class Batcher:
    """Collects single images from concurrent requests into batches for one model thread."""

    def __init__(self, model: Predictor, max_batch: int, max_wait_ms: float, metrics: Metrics):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1e3
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arriving = 0  # requests being decoded: only they can join a batch that waits
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")  # runtimes need not be thread-safe

    async def probabilities(self, image: np.ndarray) -> np.ndarray:
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
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            images = np.stack([image for image, _ in batch])
            self.metrics.batch_size.observe(len(batch))
            try:
                probs = softmax(await loop.run_in_executor(self.executor, self.model, images))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), p in zip(batch, probs):
                if not future.done():  # the client may have gone
                    future.set_result(p)


# ---- HTTP -----------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {int(declared)} bytes, more than the {limit} allowed")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body larger than the {limit} bytes allowed")
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


def decode(data: bytes, meta: dict) -> np.ndarray:
    if not data:
        raise HTTPException(400, "empty image")
    from PIL import UnidentifiedImageError

    try:
        return load_image(io.BytesIO(data), meta)
    except UnidentifiedImageError:
        raise HTTPException(400, f"not an image in a format PIL reads ({len(data)} bytes)") from None
    except Exception as e:  # PIL raises many kinds for truncated or oversized images
        raise HTTPException(400, f"cannot read the image: {e}") from None


def create_app(model: Predictor, model_path: str, max_batch: int = 32, max_wait_ms: float = 5.0,
               default_top_k: int = 3, max_body_bytes: int = 10 * 2**20) -> FastAPI:
    from starlette.concurrency import run_in_threadpool

    metrics = Metrics(max_batch)
    batcher = Batcher(model, max_batch, max_wait_ms, metrics)
    classes = model.meta["classes"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False)

    app = FastAPI(title="imgcls", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)  # ours, and starlette's for a malformed multipart body
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path == "/predict":
            metrics.request_done(exc.status_code, 0.0)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(default_top_k, ge=1)):
        body = await read_body(request, max_body_bytes)
        start = time.perf_counter()
        batcher.arriving += 1
        try:
            image = await run_in_threadpool(decode, await image_bytes(request, body), model.meta)
        finally:
            batcher.arriving -= 1
        probs = await batcher.probabilities(image)
        metrics.request_done(200, time.perf_counter() - start)
        return {"top_k": top_classes(probs, classes, top_k)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_path, "format": model.kind, "classes": len(classes)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
