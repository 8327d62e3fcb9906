"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1), as s3fs's own tests use."""
from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture of test_cluster.py)

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """Start moto's S3 server on a free loopback port; point the AWS env (and so s3fs) at it.

    The env is inherited by DataLoader workers and by torchrun/srun children.
    """
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-print",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def moto_server(log: Path, env: dict | None = None):
    """moto's S3 server on a free loopback port; yields its endpoint URL. `env`, e.g.
    INITIAL_NO_AUTH_ACTION_COUNT=0, makes it check credentials like AWS does."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the real S3 endpoint; returns 's3://<bucket>'."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


def without_aws(tmp_path: Path) -> dict:
    """This process's env with no S3 credentials, profile or endpoint to find: no AWS_*
    variables; HOME and the AWS config files point at empty places; no EC2 metadata lookup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               OMP_NUM_THREADS="1")
    return env


# ---- tiny runs: every test's overrides start from BASE_RUN ----------------------------------
# Later overrides win (load_config applies them in order), so a test adds or changes keys on
# top: [*BASE_RUN, "train.epochs=3"].

# A run of a few seconds on the bands dataset: one epoch, no loader workers, no wandb.
BASE_RUN = [
    "model.name=simple_cnn", "model.width=8", "data.batch_size=32", "data.num_workers=0",
    "train.epochs=1", "train.log_every=5", "track.wandb=disabled", "track.progress=false",
]

# A deterministic 2-epoch run (CPU, seconds) that accumulates micro-batches and keeps an EMA,
# with test-time views: the bitwise-resume tests compare two of these step for step.
EXACT_RUN = [
    *BASE_RUN, "data.batch_size=16", "data.eval_batch_size=64", "data.num_workers=1", "optim.lr=0.05",
    "optim.base_batch=64", "train.epochs=2", "train.accum_steps=2", "train.log_every=2", "train.ckpt_every=5",
    "train.keep_last=2", "schedule.warmup_epochs=0.2", "data.mean=[0.5]", "data.std=[0.25]",
    "run.deterministic=true", "train.ema_decay=0.9", "model.channels_last=true", "train.label_smoothing=0.1",
    "train.eval_flip=true", "train.eval_shift=true",
]


def needs_fashion_mnist():
    return pytest.mark.skipif(
        not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
        reason="Debian package dataset-fashion-mnist is not installed (CI installs it)")


def build_bands_dataset(workdir: Path, n: int = 2000, size: int = 12, label_noise: float = 0.0,
                        reverse: bool = False, classes: int = 4) -> str:
    """A small learnable dataset as shards (~1400 train / 400 val / 200 test, 100 per shard):
    the class (0 to classes-1) is which horizontal band is bright, unchanged by the flip
    augmentation; counted from the top, or from the bottom with `reverse` (another task).
    With `label_noise`, that fraction of the labels is then replaced by a random class."""
    import numpy as np

    import shards

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 100, (n, size, size, 1), dtype=np.uint8)
    band = size // classes
    for i, label in enumerate(labels):
        row = classes - 1 - label if reverse else label
        images[i, row * band:(row + 1) * band] += 120
    noisy = rng.random(n) < label_noise
    labels[noisy] = rng.integers(0, classes, int(noisy.sum()))
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "bands.npz"
    np.savez(src, images=images, labels=labels)
    dest = workdir / "bands"
    shards.build(str(src), str(dest), shard_samples=100, progress=False, workers=1)
    return str(dest)


def build_multilabel_bands(workdir: Path, n: int = 1000, size: int = 12, classes: int = 4) -> str:
    """A multi-label bands dataset: each image has a random subset of its `classes` horizontal
    bands bright (none, one or several), labelled with all of them. Written by shards.build, then
    each sample's .cls rewritten to its class indices ("0 2") and the manifest marked task
    multilabel, with the per-class positive counts as class_counts."""
    import hashlib

    import numpy as np

    import shards
    from shardio.format import decode_sample, read_tar, write_tar
    from shardio.manifest import manifest_bytes

    rng = np.random.default_rng(0)
    bright = rng.random((n, classes)) < 0.35
    images = rng.integers(0, 100, (n, size, size, 1), dtype=np.uint8)
    band = size // classes
    for c in range(classes):
        images[bright[:, c], c * band:(c + 1) * band] += 120
    src = workdir / "multilabel.npz"
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(src, images=images, labels=bright.argmax(1))
    dest = workdir / "multilabel"
    shards.build(str(src), str(dest), shard_samples=100, progress=False, workers=1)
    manifest = json.loads((dest / "manifest.json").read_text())
    for split in manifest["splits"].values():
        positives = np.zeros(classes, dtype=np.int64)
        for entry in split["shards"]:
            path = dest / entry["path"]
            rewritten = []
            for sample in read_tar(path.read_bytes()):
                image, _ = decode_sample(sample, manifest)
                labels = [c for c in range(classes) if image[c * band:(c + 1) * band].mean() > 110]
                positives[labels] += 1
                ext = next(k for k in sample if k not in ("__key__", "cls"))
                rewritten.append((sample["__key__"], " ".join(map(str, labels)), ext, sample[ext]))
            data = write_tar(rewritten)
            path.write_bytes(data)
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        split["class_counts"] = positives.tolist()
    manifest["task"] = "multilabel"
    (dest / "manifest.json").write_bytes(manifest_bytes(manifest))
    return str(dest)


def write_multilabel_label_file(folder: Path, n: int = 600, size: int = 12, classes: int = 4,
                                 names: tuple[str, ...] = ("top", "upper", "lower", "bottom")) -> Path:
    """The multi-label bands as users bring them: folder/img/NNNN.png and folder/labels.csv with
    a `labels` column naming each image's bright bands, separated by spaces (empty: none), the
    multi-label Kaggle layout. Returns the label file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    bright = rng.random((n, classes)) < 0.35
    images = rng.integers(0, 100, (n, size, size), dtype=np.uint8)
    band = size // classes
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(n):
        for c in np.flatnonzero(bright[i]):
            images[i, c * band:(c + 1) * band] += 120
        Image.fromarray(images[i]).save(folder / "img" / f"{i:04d}.png")
        rows.append(f"img/{i:04d}.png," + " ".join(names[c] for c in np.flatnonzero(bright[i])))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


PHOTO_FORMATS = (("JPEG", "jpg", 0.45), ("PNG", "png", 0.45), ("WEBP", "webp", 0.10))


def build_photo_folder(root: Path, per_class: int = 20, classes: int = 10, seed: int = 0,
                       min_side: int = 40, max_side: int = 300) -> Path:
    """A "photo-like" folder root/<class>/<n>.{jpg,png,webp} from Fashion-MNIST's train images:
    RGB (each image tinted by a random colour, so the channels differ), scaled to a random
    width in [min_side, max_side] with a random aspect ratio (3:4 to 4:3, height clipped to the
    same range), saved as JPEG or PNG or, for a few, WebP (quality 90). The same
    arguments give the same files."""
    import numpy as np
    from PIL import Image

    from shards.sources import FASHION_MNIST_CLASSES, open_source

    source = open_source(FASHION_MNIST)
    rng = np.random.default_rng(seed)
    names, exts, weights = zip(*PHOTO_FORMATS)
    for label in range(classes):
        folder = root / FASHION_MNIST_CLASSES[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        picks = rng.choice(np.flatnonzero(source.labels[:60000] == label), per_class, replace=False)
        for n, i in enumerate(sorted(picks)):
            gray = source.load(i)[:, :, 0].astype(np.float32)
            tint = rng.uniform(0.5, 1.0, 3)
            image = Image.fromarray(np.rint(gray[:, :, None] * tint).astype(np.uint8))
            width = int(rng.integers(min_side, max_side + 1))
            height = int(np.clip(round(width / np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))),
                                 min_side, max_side))
            image = image.resize((width, height), Image.BICUBIC)
            fmt = int(rng.choice(len(names), p=weights))
            options = {"quality": 90} if names[fmt] in ("JPEG", "WEBP") else {}
            image.save(folder / f"{n:04d}.{exts[fmt]}", format=names[fmt], **options)
    return root


def build_photo_dataset(workdir: Path, per_class: int = 6, shard_samples: int = 8) -> str:
    """build_photo_folder's variable-size photos (10 classes) as shards of `shard_samples`
    holding each file's own bytes (JPEG, PNG, WebP): ~70% train, 20% val, 10% test."""
    import shards

    folder = build_photo_folder(workdir / "photos", per_class=per_class)
    dest = workdir / "photo-shards"
    shards.build(str(folder), str(dest), shard_samples=shard_samples, progress=False, workers=1)
    return str(dest)


# A tiny 2-epoch run on photos at 32 px with every per-sample augmentation (CPU, seconds).
PHOTO_RUN = [
    *BASE_RUN, "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=32", "data.num_workers=1",
    "train.epochs=2", "train.log_every=1", "run.deterministic=true",
    "data.augment.auto_augment=trivial", "data.augment.erasing=0.25", "data.augment.saturation=0.2",
]


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory) -> str:
    return build_photo_dataset(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """60 photo-like images: 5 classes x 12, 40 to 300 px, JPEG/PNG/WebP (needs_fashion_mnist)."""
    return build_photo_folder(tmp_path_factory.mktemp("photo-folder") / "photos", per_class=12, classes=5, seed=3)


def final_state(run_dir) -> dict:
    """The newest good checkpoint of a run dir."""
    from imgcls import checkpoint

    state, _ = checkpoint.load_latest(str(run_dir))
    assert state is not None, f"no checkpoint in {run_dir}"
    return state


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# ---- a trained model for the export, predict and serve tests ---------------------------------
@pytest.fixture(scope="session")
def bands_checkpoint(bands_dataset, tmp_path_factory) -> str:
    """best.pt of a 2-epoch run (EMA weights) on the 4-class bands dataset (200 test samples),
    trained once per session."""
    run_dir = tmp_path_factory.mktemp("bands-run") / "run"
    launch(["--config", "", f"data.url={bands_dataset}", f"run.dir={run_dir}", *BASE_RUN, "model.width=16",
            "data.eval_batch_size=200", "optim.lr=0.05", "optim.base_batch=64", "train.epochs=2",
            "data.mean=[0.5]", "data.std=[0.25]", "train.ema_decay=0.9"], nproc=None)
    return str(run_dir / "checkpoints" / "best.pt")


def save_test_images(folder: Path, images, meta: dict, count: int) -> list[Path]:
    """The first `count` normalised test images [N,1,H,W] written back as 8-bit PNGs; they decode
    to exactly the same tensors."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.rint((images[i, 0] * meta["std"][0] + meta["mean"][0]) * 255).astype(np.uint8)
        paths.append(folder / f"sample{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@contextlib.contextmanager
def serving(model: str, *args: str, timeout: float = 60.0, log: Path | None = None):
    """jobs/serve.py MODEL ARGS as a real server process on a free loopback port; yields its
    base URL once /health answers, and stops the process after. Its output goes to `log` when
    given (read it after the block), else to a pipe shown if it fails to start."""
    import httpx

    port = free_port()
    out = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), model, "--port", str(port), *args],
                            cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                output = log.read_text() if log else proc.stdout.read()
                raise AssertionError(f"jobs/serve.py exited with {proc.returncode}:\n{output[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"{url}/health did not answer within {timeout}s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def job(name: str, *args: str):
    """(stdout, stderr, return value) of jobs/NAME.py's main(args), run in this process: a new
    interpreter would spend seconds importing torch and onnxruntime for each call."""
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            result = module.main(list(args))
        except SystemExit as e:  # a user's mistake: `error: ...` and exit code 2 (imgcls.cli)
            result = e.code
    return stdout.getvalue(), stderr.getvalue(), result


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])

class OutageProxy:
    """A TCP proxy in front of 127.0.0.1:`target_port` that can go down, as an S3 endpoint does
    in an outage: while down, new connections are refused and open ones are cut."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = None
        self._timer: threading.Timer | None = None
        self.answer_503 = False  # up, but every request gets 503 Service Unavailable
        self.up()

    def up(self) -> None:
        proxy = self

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self):
                if proxy.answer_503:
                    return _answer_503(self.request)
                with socket.create_connection(("127.0.0.1", proxy.target_port)) as upstream:
                    proxy._track(self.request, upstream)
                    pumps = [threading.Thread(target=_pump, args=pair, daemon=True)
                             for pair in ((self.request, upstream), (upstream, self.request))]
                    for pump in pumps:
                        pump.start()
                    for pump in pumps:
                        pump.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Pipe)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def outage(self, seconds: float) -> None:
        """Go down now and come back after `seconds` (in the background)."""
        self.down()
        self._timer = threading.Timer(seconds, self.up)
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.down()

    def _track(self, *socks) -> None:
        with self._lock:
            self._open.update(socks)


def _answer_503(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request and (chunk := sock.recv(1 << 16)):
            request += chunk
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                     b"Content-Length: 0\r\nConnection: close\r\n\r\n")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def s3_outage(s3_endpoint, monkeypatch):
    """An OutageProxy in front of the S3 endpoint; this process's S3 traffic goes through it."""
    from shardio import storage

    proxy = OutageProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setattr(storage, "_cache", {})  # filesystems made from now on use the proxy
    monkeypatch.setattr(storage, "_outages", {})  # no outage of an earlier test is still open
    yield proxy
    proxy.close()


@pytest.fixture
def hung_endpoint():
    """http://127.0.0.1:PORT of a TCP server that accepts connections and never answers (a hung
    storage endpoint); yields (url, a list of the connections it accepted)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(socket.timeout, OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for sock in accepted:
        sock.close()
    server.close()


@pytest.fixture
def slow_s3(s3_endpoint, monkeypatch):
    """bench/scale.py's SlowProxy in front of the S3 endpoint (0.6 s per request, 50 MB/s per
    connection); this process's S3 traffic, and its loader workers', goes through it."""
    from bench.scale import SlowProxy
    from shardio import storage

    proxy = SlowProxy(int(s3_endpoint.rsplit(":", 1)[1]), latency_s=0.6, bytes_per_s=50e6)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setattr(storage, "_cache", {})  # filesystems made from now on use the proxy
    yield proxy
    proxy.close()


LEASE_HOLDER = """
import sys, time
from imgcls.lease import Lease, LeaseHeld, LeaseLost
run_dir, job_id, timeout_s, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start_at - time.time()))  # racers start together
try:
    lease = Lease(run_dir, job_id=job_id, timeout_s=timeout_s, heartbeat_s=timeout_s / 6).acquire()
except LeaseHeld as e:
    print("held:", e, flush=True)
    sys.exit(3)
print("acquired", flush=True)
while True:  # hold until killed; say so if the lease is lost
    time.sleep(timeout_s / 10)
    try:
        lease.check()
    except LeaseLost as e:
        print("lost:", e, flush=True)
        sys.exit(4)
"""


def start_lease_holder(run_dir: str, job_id: str, timeout_s: float, start_at: float = 0.0,
                       prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """A separate python process that takes the run dir's lease and holds it until killed.
    Its first stdout line is 'acquired' or 'held: <why>' (exit code 3). `prefix`: a command
    that runs it (say, in another PID namespace)."""
    return subprocess.Popen([*prefix, sys.executable, "-c", LEASE_HOLDER, run_dir, job_id, str(timeout_s),
                             str(start_at)],
                            cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float = 60.0, stream=None) -> str:
    """The process's next line on `stream` (default stdout), or an AssertionError after `timeout`."""
    stream = stream or proc.stdout
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no output after {timeout}s; stderr:\n{proc.stderr.read()[-3000:]}")
    line = stream.readline().strip()
    if not line:
        raise AssertionError(f"process ended (rc {proc.wait()}); stderr:\n{proc.stderr.read()[-3000:]}")
    return line


# ---- datasets, built once per session; tests only read them -------------------------------
@pytest.fixture(scope="session")
def bands_dataset(tmp_path_factory) -> str:
    """The 4-class bands (1400 train / 400 val / 200 test, 100 per shard)."""
    return build_bands_dataset(tmp_path_factory.mktemp("bands"))


@pytest.fixture(scope="session")
def small_bands_dataset(tmp_path_factory) -> str:
    """The bands with half the samples (700 train / 200 val / 100 test): quicker sweep trials."""
    return build_bands_dataset(tmp_path_factory.mktemp("small-bands"), n=1000)


@pytest.fixture(scope="session")
def reversed_bands_dataset(tmp_path_factory) -> str:
    """bands_dataset's images with the bands counted from the bottom: another task (EWC's task B)."""
    return build_bands_dataset(tmp_path_factory.mktemp("reversed-bands"), reverse=True)


@pytest.fixture(scope="session")
def noisy_bands_dataset(tmp_path_factory) -> str:
    """The bands with 30% of the labels random: a model that is right, but not always."""
    return build_bands_dataset(tmp_path_factory.mktemp("noisy-bands"), label_noise=0.3)


@pytest.fixture(scope="session")
def multilabel_dataset(tmp_path_factory) -> str:
    return build_multilabel_bands(tmp_path_factory.mktemp("multilabel"))


# Random pixels, labels 0..RANDOM_CLASSES-1 in turn: nothing to learn; the reader tests count
# keys, bytes and batches.
RANDOM_CLASSES = 5


def random_npz(path: Path, n: int, size: int, channels: int = 1, seed: int = 0) -> str:
    """`n` random uint8 images [size, size, channels] and their labels, as an .npz at `path`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
             labels=np.arange(n) % RANDOM_CLASSES)
    return str(path)


@pytest.fixture(scope="session")
def s3_dataset(tmp_path_factory, s3_endpoint) -> str:
    """~630 train samples of 8x8 gray noise in 13 shards of 50 on S3."""
    import s3fs

    import shards

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("reader-data")
    source = random_npz(tmp_path_factory.mktemp("src") / "data.npz", n=900, size=8)
    shards.build(source, "s3://reader-data/ds", shard_samples=50, progress=False, workers=1)
    return "s3://reader-data/ds"


@pytest.fixture(scope="session")
def big_shards(tmp_path_factory, s3_endpoint) -> str:
    """600 train samples of 16x16x3 noise in two shards of 300 on S3: ranks read parts of shards."""
    import s3fs

    import shards

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("index-data")
    source = random_npz(tmp_path_factory.mktemp("src") / "d.npz", n=858, size=16, channels=3)
    url = "s3://index-data/ds"
    shards.build(source, url, shard_samples=300, split=(0.7, 0.2, 0.1), progress=False, workers=1)
    return url


# ---- launching training: in this process, or as real processes -----------------------------
def child_env(env: dict | None = None) -> dict:
    """The env of every process a test starts: this checkout first on PYTHONPATH (its code, and
    tests.user_nets, in every rank), one OpenMP thread each (the cores are shared), then `env`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}


def launch_command(args: list[str], nproc: int | None, script: Path) -> list[str]:
    if nproc is None:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(script), *args]


def launch(args: list[str], nproc: int | None = 2, *, script: Path = REPO / "jobs" / "train.py",
           env: dict | None = None, check: bool = True, timeout: int = 300, background: bool = False):
    """`script ARGS` (default jobs/train.py) under torchrun with `nproc` ranks on loopback, or
    with nproc=None as one plain `python script ARGS` process. Returns the CompletedProcess, an
    AssertionError with its output if it failed and `check`; with `background`, the running
    Popen (read its log with read_line(p, stream=p.stderr), kill it, wait for it)."""
    command = launch_command(args, nproc, script)
    if background:
        return subprocess.Popen(command, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, cwd=REPO, env=child_env(env), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script.name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_in_process(run_dir, data_url: str, *overrides: str) -> dict:
    """jobs/train.py's main in this process (one rank, no group): its result dict. Seconds
    faster than a new interpreter; use launch() where a test needs a process of its own."""
    _, stderr, result = job("train", "--config", "", f"data.url={data_url}", f"run.dir={run_dir}", *overrides)
    assert isinstance(result, dict), stderr[-3000:]
    return result


def wait_until(check, timeout: float = 30.0, what: str = "", proc: subprocess.Popen | None = None) -> None:
    """Poll `check()` until true; a TimeoutError after `timeout`, or an AssertionError with its
    stderr as soon as `proc` (the process that should make it true) has ended."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def write_image_tree(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """`counts[folder]` small images under root/folder (e.g. "train/cat": 3): JPEG and PNG,
    12-24 px of random sizes. Returns {path relative to root: path}."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            height, width = (int(v) for v in rng.integers(12, 25, 2))
            ext = "jpg" if i % 2 else "png"
            path = root / folder / f"{i:03d}.{ext}"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
            written[f"{folder}/{path.name}"] = path
    return written


def upload_folder(local: Path, url: str) -> None:
    """Copy a local folder to `url` (e.g. s3://bucket/prefix) through fsspec."""
    from shardio.storage import filesystem

    fs, path = filesystem(url)
    fs.put(str(local) + "/", path, recursive=True)


def on_device(tensor):
    """`tensor` as a stand-in for a CUDA tensor at the host boundary, on a machine without one:
    numpy() and np.asarray() refuse it with torch's own CUDA message until .cpu() (or
    .to("cpu")) brings it over; every other op keeps it "on the device"."""
    import torch

    class DeviceTensor(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.numpy, torch.Tensor.__array__):
                raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy "
                                "the tensor to host memory first.")
            result = super().__torch_function__(func, types, args, kwargs or {})
            to_host = func is torch.Tensor.cpu or (func is torch.Tensor.to and "cpu" in map(str, args[1:]))
            return result.as_subclass(torch.Tensor) if to_host and isinstance(result, torch.Tensor) else result

    return tensor.as_subclass(DeviceTensor)
