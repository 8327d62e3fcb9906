"""The HTTP server: dynamic batching over model versions, two protocols, monitoring, a page.

    GET  /                          a page to try the model: drop an image, see the top-k
    POST /predict                   an image (multipart, any file field, or the raw body);
                                    ?top_k=N&model=&version=, X-Request-Id header or ?id=.
                                    {"top_k": [{"class", "index", "prob"}], "model", "version",
                                     "id", "abnormal": {"score", "threshold", "flagged"}};
                                    a multi-label model adds "labels": every class over its
                                    threshold ([{"class", "index", "prob"}]) and "threshold"
    GET  /health                    {"status": "ok", "model", "format", "classes", "models"}
    GET  /metrics                   Prometheus text
    /v2/...                         the Open Inference Protocol (KServe v2 REST), as Triton
                                    speaks it: tritonclient.http works unchanged (`v2_routes`)
    POST /v2/models/{name}/feedback ground truth for earlier request ids (live accuracy)
    POST /v2/repository/index       rescan the repository; every version and its state

Built on FastAPI + uvicorn rather than LitServe: LitServe batches too, but runs the model in
worker processes it spawns itself and owns the request parsing, so the 4xx answers, the body
limit and the Prometheus registry would have to be fitted into its hooks; FastAPI gives the
request as it is, and the batching is one small asyncio loop per version (batching.py).

The request path never blocks the event loop: the body is read asynchronously (guards.py),
images are decoded on a bounded pool, and each version's model runs in its own thread on
batches from every client. The preprocessing is predict's (`image_array`, the evaluation
transform), so answers equal `jobs/predict.py`'s.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import SummaryMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgcls.inference import labels_over, load_image, model_input, model_mode, top_classes
from imgcls.serving import protocol
from imgcls.serving.batching import Batcher
from imgcls.serving.guards import DecodePool, image_bytes, read_body
from imgcls.serving.monitor import Monitor, MonitorCollector
from imgcls.serving.repository import ModelVersion, NotFound, Repository, log
from shardio.image import UnsupportedFormat, foreign_format, image_array

QUANTILES = (0.5, 0.9, 0.99)
SERVING_MAX_PIXELS = 16_000_000   # below the shard builder's 64 Mpx: a decode costs at most ~50 MB
PAGE = Path(__file__).with_name("page.html")


@dataclass
class Options:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    top_k: int = 3
    max_body_bytes: int = 10 * 2**20
    read_timeout_s: float = 30.0
    max_pixels: int = SERVING_MAX_PIXELS
    decode_workers: int = 0          # 0: one per core
    max_queue: int = 64
    window: int = 1000
    alert_drop: float = 3.0
    alert_min_feedback: int = 100
    poll_s: float = 5.0              # 0: rescan only on POST /v2/repository/index


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
    """/predict's request metrics, and per model version those of every inference request."""

    def __init__(self, max_batch: int, versions):
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
        labels = ["model", "version"]
        self.version_requests = Counter("imgcls_model_requests", "inference requests (/predict and /v2) by "
                                        "answering version and HTTP status", labels + ["status"],
                                        registry=self.registry)
        self.version_images = Counter("imgcls_model_images", "images answered by version", labels,
                                      registry=self.registry)
        self.version_latency = Histogram("imgcls_model_latency_seconds", "inference latency by version, body "
                                         "read to answer", labels, registry=self.registry)
        self.registry.register(MonitorCollector(versions))

    def predict_done(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        if status == 200:
            self.latency.observe(seconds)
            self.recent.observe(seconds)

    def version_done(self, version: ModelVersion, status: int, seconds: float, images: int) -> None:
        self.version_requests.labels(version.name, version.version, str(status)).inc()
        if status == 200:
            self.version_latency.labels(version.name, version.version).observe(seconds)
            self.version_images.labels(version.name, version.version).inc(images)


# ---- the server -----------------------------------------------------------------------
@dataclass
class VersionServing:
    batcher: Batcher
    monitor: Monitor


class Predictions:
    """Which version answered which request id and what it predicted, for feedback (bounded)."""

    def __init__(self, limit: int = 100_000):
        self.rows: collections.OrderedDict = collections.OrderedDict()
        self.limit = limit

    def add(self, request_id: str, version: ModelVersion, predicted: list[int]) -> None:
        self.rows[request_id] = (version, predicted)
        while len(self.rows) > self.limit:
            self.rows.popitem(last=False)

    def get(self, request_id: str):
        return self.rows.get(request_id)


class Server:
    """The state behind the routes: the repository, its versions' batchers and monitors, the
    decode pool, the metrics and the predictions kept for feedback."""

    def __init__(self, repo: Repository, options: Options):
        self.repo, self.options = repo, options
        self.metrics = Metrics(options.max_batch, repo.versions)
        self.decoder = DecodePool(options.decode_workers, options.max_queue)
        self.predictions = Predictions()
        self.scan_lock = asyncio.Lock()

    def attach(self, version: ModelVersion) -> None:
        o = self.options
        batcher = Batcher(version.model, o.max_batch, o.max_wait_ms, self.metrics.batch_size.observe)
        monitor = Monitor(f"model {version.name} version {version.version}", len(version.meta["classes"]),
                          version.meta.get("reference"), o.window, o.alert_drop, o.alert_min_feedback,
                          task=version.meta.get("task"))
        version.serving = VersionServing(batcher, monitor)
        batcher.start()
        self.repo.add(version)

    async def rescan(self) -> list[dict]:
        async with self.scan_lock:
            for version in await asyncio.get_running_loop().run_in_executor(None, self.repo.scan):
                self.attach(version)
        return self.repo.index()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_s)
            try:
                await self.rescan()
            except OSError as e:  # the folder unreadable for a while: keep serving, keep watching
                log.warning("cannot rescan %s: %s", self.repo.source, e)

    # -- inference --
    def _decode(self, data: bytes, meta: dict) -> np.ndarray:
        if not data:
            raise HTTPException(400, "empty image")
        try:
            return load_image(io.BytesIO(data), meta, self.options.max_pixels)
        except UnsupportedFormat as e:  # an image of another format: 415; other bytes: 400
            raise HTTPException(415 if foreign_format(data) else 400, str(e)) from None
        except ValueError as e:  # the decoder's one error type for truncated or oversized images
            raise HTTPException(400, f"cannot read the image: {e}") from None

    @staticmethod
    def _from_pixels(pixels: np.ndarray, meta: dict) -> np.ndarray:
        from PIL import Image

        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        return model_input(image_array(image, model_mode(meta)), meta)

    async def decode_all(self, version: ModelVersion, fn, rows: list) -> list[np.ndarray]:
        batcher = version.serving.batcher
        batcher.arriving += len(rows)  # the batch being formed waits for them
        try:
            return await self.decoder.map(fn, rows, version.meta)
        finally:
            batcher.arriving -= len(rows)

    async def infer(self, version: ModelVersion, images: list[np.ndarray], request_id: str):
        """[(probabilities, abnormal verdict)] per image, recorded for feedback under request_id."""
        logits = await asyncio.gather(*(version.serving.batcher.logits(x) for x in images))
        answers = [version.serving.monitor.observe(row) for row in logits]
        self.predictions.add(request_id, version, [int(p.argmax()) for p, _ in answers])
        return answers

    @contextlib.asynccontextmanager
    async def measured(self, version: ModelVersion, images: int = 1):
        start, status = time.perf_counter(), 200
        try:
            yield
        except StarletteHTTPException as e:
            status = e.status_code
            raise
        except protocol.ProtocolError:
            status = 400
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.version_done(version, status, time.perf_counter() - start, images)

    def feedback(self, name: str, entries: list) -> dict:
        """Ground truth for earlier requests: [{"id", "label" or "labels": class names or indices}]."""
        accepted, unknown = 0, []
        for entry in entries:
            found = self.predictions.get(str(entry.get("id", ""))) if isinstance(entry, dict) else None
            if not found or found[0].name != name:
                unknown.append(entry.get("id") if isinstance(entry, dict) else entry)
                continue
            version, predicted = found
            labels = entry.get("labels", [entry.get("label")])
            labels = labels if isinstance(labels, list) else [labels]
            if len(labels) != len(predicted):
                raise protocol.ProtocolError(f"id {entry['id']!r}: {len(labels)} labels for {len(predicted)} images")
            truth = [class_index(label, version.meta["classes"]) for label in labels]
            version.serving.monitor.feedback([t == p for t, p in zip(truth, predicted)])
            accepted += 1
        return {"accepted": accepted, "unknown_ids": unknown}


def class_index(label, classes: list[str]) -> int:
    if isinstance(label, int) and 0 <= label < len(classes):
        return label
    if isinstance(label, str) and label in classes:
        return classes.index(label)
    raise protocol.ProtocolError(f"label {label!r} is neither a class name nor an index below {len(classes)}")


def create_app(repo: Repository, options: Options | None = None) -> FastAPI:
    server = Server(repo, options or Options())
    initial = repo.scan()
    unknown = set(repo.traffic) - {version.name for version in initial} - {name for name, _ in repo.refused}
    if unknown:
        raise ValueError(f"--traffic names {', '.join(sorted(unknown))}, not a model in {repo.source}")
    if not initial:
        reasons = "; ".join(f"{n} {v}: {r.reason}" for (n, v), r in repo.refused.items())
        raise ValueError(f"{repo.source}: no servable model" + (f" ({reasons})" if reasons else ""))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for version in initial:
            server.attach(version)
        watcher = asyncio.create_task(server.watch()) if server.options.poll_s > 0 else None
        yield
        if watcher:
            watcher.cancel()
        for version in repo.versions():
            version.serving.batcher.stop()

    app = FastAPI(title="imgcls", lifespan=lifespan)
    app.state.server, app.state.initial = server, initial

    @app.exception_handler(StarletteHTTPException)  # ours, and starlette's for a malformed multipart body
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path == "/predict":
            server.metrics.predict_done(exc.status_code, 0.0)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())},
                            status_code=422)

    @app.exception_handler(protocol.ProtocolError)
    async def bad_request(request: Request, exc: protocol.ProtocolError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"error": str(exc.args[0])}, status_code=404)

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(server.options.top_k, ge=1),
                      model: str = "", version: str = "", id: str = ""):
        body = await read_body(request, server.options.max_body_bytes, server.options.read_timeout_s)
        request_id = id or request.headers.get("x-request-id", "")
        chosen = repo.pick(model or repo.default_name(), version, request_id)
        request_id = request_id or uuid.uuid4().hex
        start = time.perf_counter()
        async with server.measured(chosen):
            data = await image_bytes(request, body)
            images = await server.decode_all(chosen, server._decode, [data])
            (probs, verdict), = await server.infer(chosen, images, request_id)
        server.metrics.predict_done(200, time.perf_counter() - start)
        answer = {"top_k": top_classes(probs, chosen.meta["classes"], top_k), "model": chosen.name,
                  "version": chosen.version, "id": request_id, "abnormal": verdict}
        if chosen.meta.get("task") == "multilabel":  # as jobs/predict.py lists them
            threshold = chosen.meta["threshold"]
            answer.update(labels=labels_over(probs, chosen.meta["classes"], threshold), threshold=threshold)
        return answer

    @app.get("/health")
    async def health():
        first = repo.pick(repo.default_name())
        return {"status": "ok", "model": first.path, "format": first.model.kind,
                "classes": len(first.meta["classes"]),
                "models": {name: sorted(versions, key=int) for name, versions in repo.models.items()}}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    from imgcls.serving.v2 import v2_routes

    app.include_router(v2_routes(server))
    return app

