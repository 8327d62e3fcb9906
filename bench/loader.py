"""Loader throughput: one split read three ways, timed in one run, printed as a markdown table.

    .venv/bin/python bench/loader.py                     # Fashion-MNIST train split, full
    .venv/bin/python bench/loader.py --limit 8000 --reps 2   # a quick run
    .venv/bin/python bench/loader.py --photos 2000       # the 224 px table on real-photo JPEGs

(a) shards, local   ShardReader over shards built with shards.build(SOURCE, <workdir>/shards)
(b) shards, S3      the same shard files, uploaded to s3:// on a moto server this script
                    starts on a free 127.0.0.1 port (and stops at the end; only that process)
(c) ImageFolder     torchvision ImageFolder over the same split's images written as PNG files
                    in class subfolders, with the equivalent torchvision.transforms.v2 pipeline
                    on PIL images, in a DataLoader (shuffle, drop_last like the reader)

All three use the same batch size, num_workers, prefetch_factor, augmentation parameters and
normalisation. Timing is airbench-style: time.perf_counter around a whole epoch, from building
the DataLoader (so worker start-up is included) to its last batch. The datasets themselves
(manifest, ImageFolder's directory scan) are opened once, outside the timing. One warm-up
epoch per method is discarded, then R epochs of each are interleaved (a, b, c, a, b, c, ...)
so load from other processes on the machine hits all three alike.

--photos N: the 224 px table (`photos_main`). N JPEG crops of real photographs (~500x375,
quality 90; bench/decode.py's write_photo_crops) are built into shards (split 1,0,0), and the
same JPEG files are written back out of the shards into class folders. Every method does
RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3) + horizontal flip and yields uint8
[B,3,224,224] batches, with the same batch size and workers (DALI: the same number of CPU
threads); then the decode-only limit (PIL's plain decode of the same files in the same
DataLoader). Epochs are interleaved as above.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

TARGET_VS_IMAGEFOLDER = 3.0   # shard loader (local) >= 3x ImageFolder
TARGET_S3_VS_LOCAL = 0.8      # S3 >= 0.8x local


# ---- the S3 endpoint: a moto server of our own ------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on a free loopback port; stop() ends exactly this process."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise TimeoutError(f"moto server not listening on {self.endpoint} after 60 s") from None
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench-key-id",
                "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- data: shards (local and S3) and the PNG folder -------------------------------------
def limited_source(source: str, limit: int, workdir: Path) -> str:
    """An .npz of the first `limit` samples of the source's own train part (no test split),
    built later with split 1,0,0 so the train split holds exactly `limit` samples."""
    from shards.sources import open_source

    src = open_source(source)
    pool = np.arange(len(src.labels)) if src.is_test is None else np.flatnonzero(~src.is_test)
    take = pool[:limit]
    images = np.stack([np.asarray(src.load(int(i))) for i in take])
    path = workdir / f"limit-{limit}.npz"
    np.savez(path, images=images, labels=src.labels[take], class_names=np.array(src.classes))
    return str(path)


def build_shards(source, dest, args, split):
    import shards

    return shards.build(source, dest, split=split, seed=0, shard_samples=args.shard_samples,
                        workers=2, progress=False)


def upload(local: Path, url: str) -> None:
    """The local shards, their indexes and the manifest, byte for byte, to `url` (the manifest last, as
    shards.build does), checked against the manifest's sizes and sha256."""
    import hashlib

    from shardio import storage

    manifest = json.loads((local / "manifest.json").read_bytes())
    fs, root = storage.filesystem(url)
    entries = [s for split in manifest["splits"].values() for s in split["shards"]]
    files = [path for s in entries for path in (s["path"], s.get("index")) if path]  # each shard's index too
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda path: fs.put_file(str(local / path), f"{root}/{path}"), files))
    fs.put_file(str(local / "manifest.json"), f"{root}/manifest.json")
    fs.invalidate_cache()
    for s in entries:
        data = fs.cat_file(f"{root}/{s['path']}")
        if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise RuntimeError(f"{url}/{s['path']} differs from the local shard after upload")


def write_png_folder(manifest: dict, shard_root: Path, split: str, root: Path) -> int:
    """The split's images as root/<NN_class>/<key>.png, decoded from the local shards.
    Folder names sort in label order, so ImageFolder's labels equal the shards' labels."""
    from shardio.format import decode_sample, read_tar

    shards_meta = manifest["splits"][split]["shards"]
    marker = root / ".built-from"
    stamp = json.dumps([s["sha256"] for s in shards_meta])
    if marker.exists() and marker.read_text() == stamp:
        return manifest["splits"][split]["count"]
    if root.exists():
        shutil.rmtree(root)
    classes = manifest["classes"]
    names = [f"{c:02d}_{''.join(ch if ch.isalnum() else '_' for ch in name)}"
             for c, name in enumerate(classes)]
    for name in names:
        (root / name).mkdir(parents=True)

    def write(shard):
        n = 0
        for sample in read_tar((shard_root / shard["path"]).read_bytes()):
            image, label = decode_sample(sample, manifest)
            pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
            pil.save(root / names[label] / f"{sample['__key__'].replace('/', '_')}.png")
            n += 1
        return n

    with ThreadPoolExecutor(2) as pool:
        total = sum(pool.map(write, shards_meta))
    marker.write_text(stamp)
    return total


# ---- the three loaders ------------------------------------------------------------------
def pil_loader(path: str, mode: str):
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def torchvision_pipeline(aug, height, width, mean, std):
    """torchvision.transforms.v2 on PIL images, with the AugmentConfig's parameters."""
    from torchvision.transforms import InterpolationMode, v2

    steps = []
    if aug.enabled:
        if aug.pad:
            steps.append(v2.RandomCrop((height, width), padding=aug.pad, fill=0))
        if aug.flip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        if aug.rotate_deg:
            # imgcls.augment: bilinear grid_sample, zeros outside
            steps.append(v2.RandomRotation(aug.rotate_deg, interpolation=InterpolationMode.BILINEAR, fill=0))
        if aug.brightness or aug.contrast:
            steps.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class Method:
    name = ""

    def epoch(self, epoch: int) -> int:
        """Read one whole epoch; return the number of samples delivered."""
        raise NotImplementedError


class ShardMethod(Method):
    def __init__(self, name, cfg, split):
        from imgcls.data import ShardReader

        self.name = name
        self.reader = ShardReader(cfg, split, seed=0, train=True)

    def epoch(self, epoch):
        self.reader.set_epoch(epoch)
        n = 0
        for batch in self.reader.loader():
            self.reader.transform(batch)  # rotation, jitter, normalisation: the trainer's share, on the CPU here
            n += len(batch["label"])
        return n


class ImageFolderMethod(Method):
    def __init__(self, name, root, transform, mode, batch_size, workers):
        from torchvision.datasets import ImageFolder

        self.name = name
        self.dataset = ImageFolder(str(root), transform=transform,
                                   loader=functools.partial(pil_loader, mode=mode))
        self.batch_size, self.workers = batch_size, workers

    def epoch(self, epoch):
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
                            persistent_workers=False, generator=torch.Generator().manual_seed(epoch))
        n = 0
        for _images, labels in loader:
            n += len(labels)
        return n


class PhotoShardMethod(Method):
    """Our reader at data.image_size 224: uint8 batches, as the trainer gets them (the float
    work happens on the device)."""

    def __init__(self, name, cfg):
        from imgcls.data import ShardReader

        self.name = name
        self.reader = ShardReader(cfg, "train", seed=0, train=True)

    def epoch(self, epoch):
        self.reader.set_epoch(epoch)
        return sum(len(batch["label"]) for batch in self.reader.loader())


class DecodeOnly:
    """The dataset of the decode-only limit: PIL's plain full decode of each file."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            image.load()
        return 0


class DecodeOnlyMethod(Method):
    def __init__(self, name, paths, batch_size, workers):
        self.name, self.dataset, self.batch_size, self.workers = name, DecodeOnly(paths), batch_size, workers

    def epoch(self, epoch):
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
                            generator=torch.Generator().manual_seed(epoch))
        return sum(len(labels) for labels in loader)


class DaliMethod(Method):
    """NVIDIA DALI's CPU pipeline (device_id=None): file reader, fused decode + random crop
    (area 0.08-1, ratio 3/4-4/3, 10 attempts), resize to 224, flip, CHW uint8."""

    def __init__(self, name, root, batch_size, threads):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=4)
        def pipeline():
            jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=True, name="files")
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=224, resize_y=224)
            images = fn.flip(images, horizontal=fn.random.coin_flip())
            return fn.transpose(images, perm=[2, 0, 1]), labels

        self.name, self.pipeline, self.batch_size = name, pipeline(), batch_size
        self.pipeline.build()
        self.size = self.pipeline.epoch_size("files")

    def epoch(self, epoch):
        n = 0
        for _ in range(self.size // self.batch_size):  # drop_last, like the others
            images, labels = self.pipeline.run()
            torch.from_numpy(images.as_array())  # the batch as one array, as a loader would hand it over
            n += len(labels)
        return n


def write_jpeg_folder(manifest: dict, shard_root: Path, root: Path) -> list[Path]:
    """The train split's JPEG members, byte for byte, as root/<NN_class>/<key>.jpg."""
    from shardio.format import read_tar

    if root.exists():
        shutil.rmtree(root)
    paths = []
    for shard in manifest["splits"]["train"]["shards"]:
        for sample in read_tar((shard_root / shard["path"]).read_bytes()):
            label = int(sample["cls"])
            path = root / f"{label:02d}_{manifest['classes'][label]}" / f"{sample['__key__'].replace('/', '_')}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(sample["jpg"])
            paths.append(path)
    return paths


def photos_main(args, workdir: Path) -> int:
    """The 224 px table (see the module docstring)."""
    from torchvision.transforms import v2

    import shards
    from bench.decode import write_photo_crops
    from imgcls.config import AugmentConfig, DataConfig

    t0, load = time.perf_counter(), os.getloadavg()
    source = workdir / "photo-crops"
    if not source.exists():
        write_photo_crops(source, args.photos)
    local = workdir / "photo-shards"
    shard_samples = max(1, math.ceil(args.photos / (2 * max(1, args.num_workers))))
    manifest = shards.build(str(source), str(local), split=(1.0, 0.0, 0.0), encoding="source",
                            shard_samples=shard_samples, workers=2, progress=False)
    paths = write_jpeg_folder(manifest, local, workdir / "photo-files")
    print(f"# {len(paths)} JPEGs, {len(manifest['splits']['train']['shards'])} shards "
          f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    server = MotoServer(workdir / "moto.log")
    try:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(k, None)
        os.environ.update(server.env())
        import s3fs

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        upload(local, f"s3://{bucket}/photos")
        aug = AugmentConfig(crop="resized", flip=True, pad=0)

        def cfg(url):
            return DataConfig(url=url, image_size=224, batch_size=args.batch_size, num_workers=args.num_workers,
                              verify_checksums=args.verify_checksums, augment=aug)

        tv = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
        methods = [PhotoShardMethod("imgcls shards, local", cfg(str(local))),
                   PhotoShardMethod("imgcls shards, S3 (moto)", cfg(f"s3://{bucket}/photos")),
                   ImageFolderMethod("ImageFolder + PIL + transforms.v2", workdir / "photo-files", tv, "RGB",
                                     args.batch_size, args.num_workers)]
        try:
            methods.append(DaliMethod("DALI CPU pipeline", workdir / "photo-files", args.batch_size,
                                      max(1, args.num_workers)))
            dali = "nvidia-dali " + __import__("nvidia.dali", fromlist=["__version__"]).__version__
        except ImportError as e:
            dali = f"not measured: {e}"
        methods.append(DecodeOnlyMethod("decode only (PIL, same files)", paths, args.batch_size, args.num_workers))
        results = {m.name: [] for m in methods}
        for rep in range(args.reps + 1):  # rep 0: warm-up, discarded
            for m in methods:
                r = timed(m, rep, server if "S3" in m.name else None)
                print(f"# {'warm-up' if rep == 0 else f'rep {rep}'} {m.name}: {r['n']} in {r['wall']:.2f} s "
                      f"= {r['n'] / r['wall']:,.0f}/s", file=sys.stderr, flush=True)
                if rep:
                    results[m.name].append(r)
    finally:
        server.stop()
    print(photos_report(args, methods, results, load, dali, len(paths)))
    print(f"# total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


PHOTO_TARGETS = (("imgcls local / ImageFolder", "imgcls shards, local", "ImageFolder + PIL + transforms.v2", 2.0),
                 ("imgcls local / DALI CPU", "imgcls shards, local", "DALI CPU pipeline", 1.0),
                 ("imgcls local / decode only", "imgcls shards, local", "decode only (PIL, same files)", 0.8),
                 ("S3 / local", "imgcls shards, S3 (moto)", "imgcls shards, local", 0.8))


def photos_report(args, methods, results, load, dali, count) -> str:
    rate = {m.name: rates(results[m.name]) for m in methods}
    lines = [
        f"224 px loader table: {count} JPEG crops of real photographs (~500x375, q90), RandomResizedCrop 224 "
        f"+ flip, uint8 batches of {args.batch_size}, num_workers {args.num_workers} for every method (DALI: "
        f"{args.num_workers} CPU threads; {dali}); {args.reps} timed epochs per method after 1 warm-up, "
        f"interleaved; {machine_text(load)}",
        "",
        "| method | images/epoch | images/s (mean ± std) | epoch s (mean) | CPU s/epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [method_row(m.name, results[m.name]) + " |" for m in methods]
    lines += ratio_table(rate, [t for t in PHOTO_TARGETS if t[1] in rate and t[2] in rate])
    lines += ["", "CPU s/epoch: this process and its DataLoader workers (DALI's threads run in this process)."]
    return "\n".join(lines)


# ---- timing and report ------------------------------------------------------------------
OPS_SIZES = ((1, 28), (3, 224))  # Fashion-MNIST's and a photo's model input


def ops_report(count: int, reps: int) -> str:
    """--ops: microseconds per image of every data.augment.ops op, applied with p=1 to `count`
    random uint8 images of each size, one worker thread (torch.set_num_threads(1)) as in a
    loader worker; mean ± std over `reps` timed passes after one warm-up pass. The uniforms of
    each image are drawn outside the timing."""
    from imgcls.augment import U_OPS, photo_uniforms
    from imgcls.augment_ops import OPS, Pipeline

    torch.set_num_threads(1)
    load = os.getloadavg()
    rng = np.random.default_rng(0)
    lines = [f"### data.augment.ops: µs per image, one thread ({count} images x {reps} passes; {machine_text(load)})",
             "", "| op | " + " | ".join(f"{c}x{s}x{s}" for c, s in OPS_SIZES) + " |",
             "|---|" + "---:|" * len(OPS_SIZES)]
    images = {size: [torch.from_numpy(rng.integers(0, 256, (size[0], size[1], size[1]), dtype=np.uint8))
                     for _ in range(count)] for size in OPS_SIZES}
    uniforms = [photo_uniforms(0, 0, str(i))[U_OPS] for i in range(count)]
    for name in OPS:
        pipeline, cells = Pipeline([{"op": name, "p": 1}]), []
        for size in OPS_SIZES:
            times = []
            for _rep in range(reps + 1):
                t0 = time.perf_counter()
                for image, w in zip(images[size], uniforms):
                    pipeline(image, w)
                times.append((time.perf_counter() - t0) / count * 1e6)
            mu, sd = mean_std(times[1:])
            cells.append(f"{mu:,.0f} ± {sd:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished, waited-for children
    (DataLoader workers are joined at the end of each epoch; the moto server is not)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(method: Method, epoch: int, server: MotoServer | None = None) -> dict:
    server_cpu, cpu = server.cpu_seconds() if server else 0.0, cpu_seconds()
    start = time.perf_counter()
    n = method.epoch(epoch)
    wall = time.perf_counter() - start
    return {"n": n, "wall": wall, "cpu": cpu_seconds() - cpu,
            "server_cpu": (server.cpu_seconds() - server_cpu) if server else 0.0}


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rates(runs: list[dict]) -> list[float]:
    """Samples/s of each timed epoch."""
    return [r["n"] / r["wall"] for r in runs]


def machine_text(load_at_start: tuple[float, ...]) -> str:
    return (f"{os.cpu_count()} CPUs (load average {load_at_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} "
            f"at the end: the machine is shared), torch {torch.__version__}")


def method_row(name: str, runs: list[dict]) -> str:
    """"| name | samples | rate mean ± std | epoch s | CPU s" of one method's timed epochs
    (no closing bar: a table may add columns)."""
    mu, sd = mean_std(rates(runs))
    cpu = statistics.fmean(r["cpu"] for r in runs)
    server = statistics.fmean(r["server_cpu"] for r in runs)
    cpu_text = f"{cpu:.2f}" + (f" + {server:.2f} moto" if server else "")
    return (f"| {name} | {runs[0]['n']} | {mu:,.0f} ± {sd:,.0f} | "
            f"{statistics.fmean(r['wall'] for r in runs):.2f} | {cpu_text}")


def ratio_table(rate: dict[str, list[float]], targets) -> list[str]:
    """The ratio rows, (label, numerator, denominator, target) each: of the means, and within
    each interleaved repetition."""
    lines = ["", "| ratio | of means | per repetition (min–max) | target | met |", "|---|---:|---:|---:|:---:|"]
    for label, num, den, target in targets:
        ratio = statistics.fmean(rate[num]) / statistics.fmean(rate[den])
        per_rep = [x / y for x, y in zip(rate[num], rate[den])]
        lines.append(f"| {label} | {ratio:.2f}x | {min(per_rep):.2f}–{max(per_rep):.2f}x | "
                     f">= {target}x | {'yes' if ratio >= target else 'NO'} |")
    return lines


def report(args, info, methods, results) -> str:
    a, b, c = methods
    rate = {m.name: rates(results[m.name]) for m in methods}
    lines = [
        f"Loader throughput: {info['source']} {args.split} split, {info['count']} samples "
        f"({info['shards']} shards of <= {args.shard_samples}), batch {args.batch_size}, "
        f"num_workers {args.num_workers}, {args.reps} timed epochs per method after 1 warm-up, "
        f"interleaved; {machine_text(info['load'])}",
        f"augmentation: {info['augment']}; normalize mean {info['mean']} std {info['std']}",
        "timing: time.perf_counter around whole epochs, DataLoader creation and worker start-up "
        "included; same batch size, num_workers and prefetch_factor (4) for all three; "
        f"local files under {info['workdir']}",
        "",
        "| method | samples/epoch | samples/s (mean ± std) | epoch s (mean) | CPU s/epoch | vs ImageFolder |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ref = statistics.fmean(rate[c.name])
    lines += [f"{method_row(m.name, results[m.name])} | {statistics.fmean(rate[m.name]) / ref:.2f}x |" for m in methods]
    lines += ratio_table(rate, [("shard-local / ImageFolder", a.name, c.name, TARGET_VS_IMAGEFOLDER),
                                ("S3 / local", b.name, a.name, TARGET_S3_VS_LOCAL)])
    lines += ["", "CPU s/epoch: this process (all threads) plus its DataLoader workers, per timed epoch; "
              "for S3 also the moto server's CPU, on the same cores. Per repetition: the ratio within "
              "each interleaved round."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="fashion-mnist",
                   help="any `python -m shards build` source (default fashion-mnist)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--limit", type=int, help="use only the first N samples of the source's train part")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed epochs per method (default 3)")
    p.add_argument("--shard-samples", type=int, default=2000, help="samples per shard (default 2000)")
    p.add_argument("--pad", type=int, default=2)
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--rotate-deg", type=float, default=10.0)
    p.add_argument("--brightness", type=float, default=0.2)
    p.add_argument("--contrast", type=float, default=0.2)
    p.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false",
                   help="skip the reader's sha256 check of each shard")
    p.add_argument("--workdir", type=Path,
                   help="keep shards and PNGs here and reuse them next time (default: a temporary "
                        "directory on /dev/shm when there is one, removed at the end)")
    p.add_argument("--only", default="abc", help="subset of methods to run, e.g. 'ac' (default abc)")
    p.add_argument("--photos", type=int, default=0,
                   help="N > 0: the 224 px table on N real-photo JPEG crops instead (e.g. 2000)")
    p.add_argument("--ops", type=int, default=0,
                   help="N > 0: the cost per image of each data.augment.ops op instead, over N images")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be positive")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from imgcls.config import AugmentConfig, DataConfig

    # SIGTERM runs the finally blocks below too: the moto server never outlives us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Default: a temporary directory on tmpfs. On this machine's disk (ext4 with online discard)
    # deleting the ~47k PNG files afterwards alone takes minutes.
    shm = Path("/dev/shm")
    tmp_root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loader-", dir=tmp_root))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.ops:
        print(ops_report(args.ops, args.reps))
        return 0
    if args.photos:
        try:
            return photos_main(args, workdir)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    server = None
    try:
        t0, load = time.perf_counter(), os.getloadavg()
        source, split_fractions = args.source, (0.7, 0.2, 0.1)
        if args.limit:
            if args.split != "train":
                sys.exit("--limit puts every sample in the train split; use --split train")
            # enough shards for every worker (the reader needs >= 1 each; 2 each balances them)
            args.shard_samples = min(args.shard_samples,
                                     max(1, math.ceil(args.limit / (2 * max(1, args.num_workers)))))
            source, split_fractions = limited_source(args.source, args.limit, workdir), (1.0, 0.0, 0.0)
        local = workdir / "shards"
        manifest = build_shards(source, str(local), args, split_fractions)
        split = manifest["splits"][args.split]
        print(f"# local shards: {local} ({split['count']} {args.split} samples in "
              f"{len(split['shards'])} shards) [{time.perf_counter() - t0:.1f} s]", file=sys.stderr)

        if "b" in args.only:
            server = MotoServer(workdir / "moto.log")
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                os.environ.pop(k, None)
            os.environ.update(server.env())  # inherited by the DataLoader workers (fork)
            import s3fs

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            s3_url = f"s3://{bucket}/shards"
            upload(local, s3_url)
            print(f"# S3 shards: {s3_url} at {server.endpoint} [{time.perf_counter() - t0:.1f} s]",
                  file=sys.stderr)

        png_root = workdir / f"png-{args.split}"
        if "c" in args.only:
            n_png = write_png_folder(manifest, local, args.split, png_root)
            print(f"# PNG folder: {png_root} ({n_png} files) [{time.perf_counter() - t0:.1f} s]",
                  file=sys.stderr)

        image = manifest["image"]
        channels = image["channels"]
        mean, std = [0.5] * channels, [0.5] * channels
        aug = AugmentConfig(enabled=True, pad=args.pad, flip=args.flip, rotate_deg=args.rotate_deg,
                            brightness=args.brightness, contrast=args.contrast)

        def data_cfg(url):
            return DataConfig(url=url, batch_size=args.batch_size, num_workers=args.num_workers,
                              verify_checksums=args.verify_checksums, mean=mean, std=std, augment=aug)

        methods = []
        if "a" in args.only:
            methods.append(ShardMethod("(a) shards, local", data_cfg(str(local)), args.split))
        if "b" in args.only:
            methods.append(ShardMethod("(b) shards, S3 (moto)", data_cfg(s3_url), args.split))
        if "c" in args.only:
            transform = torchvision_pipeline(aug, image["height"], image["width"], mean, std)
            methods.append(ImageFolderMethod("(c) ImageFolder PNG + v2", png_root, transform,
                                             "L" if channels == 1 else "RGB",
                                             args.batch_size, args.num_workers))

        results = {m.name: [] for m in methods}
        for rep in range(args.reps + 1):  # rep 0: warm-up, discarded
            for m in methods:
                r = timed(m, rep, server if m.name.startswith("(b)") else None)
                print(f"# {'warm-up' if rep == 0 else f'rep {rep}'} {m.name}: {r['n']} samples in "
                      f"{r['wall']:.2f} s = {r['n'] / r['wall']:,.0f}/s, CPU {r['cpu']:.2f} s"
                      + (f" + moto {r['server_cpu']:.2f} s" if r["server_cpu"] else ""),
                      file=sys.stderr, flush=True)
                if rep:
                    results[m.name].append(r)

        if len(methods) == 3:
            info = {"source": args.source + (f" (first {args.limit})" if args.limit else ""),
                    "count": split["count"], "shards": len(split["shards"]),
                    "augment": f"crop pad {aug.pad}, flip {aug.flip}, rotate ±{aug.rotate_deg:g}°, "
                               f"brightness {aug.brightness:g}, contrast {aug.contrast:g}",
                    "mean": mean, "std": std, "load": load, "workdir": workdir}
            print(report(args, info, methods, results))
        else:
            for m in methods:
                mu, sd = mean_std(rates(results[m.name]))
                print(f"| {m.name} | {mu:,.0f} ± {sd:,.0f} samples/s |")
        print(f"# total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
