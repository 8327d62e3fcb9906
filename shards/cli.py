"""Command line: python -m shards build|verify|inspect|index. Parsing only; the work is in the library."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from shardio.errors import is_storage_error, storage_message
from shardio.format import ENCODINGS

from .checks import inspect, load_manifest, verify
from .index import index
from .writer import SPLITS, build, check_fractions, default_workers

_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(text: str) -> int:
    """64MB, 500kB, 1GiB or plain bytes: kB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MB, 500kB, 1GiB)")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** _UNITS[unit.lower()])


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not HEIGHTxWIDTH: {text!r} (e.g. 32x32 or 32,32)")
    return int(match[1]), int(match[2])


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        return check_fractions(text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    # `python -m shards` says so; the console script imgcls-shards keeps its own name
    prog = "python -m shards" if sys.argv[0].endswith("__main__.py") else None
    p = argparse.ArgumentParser(prog=prog,
                                description="Image datasets -> WebDataset shards + manifest.json")
    commands = p.add_subparsers(dest="command", required=True)

    b = commands.add_parser("build", help="write a dataset as shards",
                            description="Write SOURCE as shards and DEST/manifest.json.")
    b.add_argument("source", nargs="?", help="a folder of class subfolders of images, pre-split "
                   "folders (train/<class>/, val/<class>/, test/<class>/: kept as the splits), a "
                   "label file (as --labels), an MNIST-style IDX folder, a CIFAR-10/100 python folder, "
                   "a .npz file, or fashion-mnist / mnist (Debian's /usr/share/datasets). Image "
                   "folders and label files may be at any fsspec URL (s3://bucket/images)")
    b.add_argument("dest", help="where to write: a path, file://... or s3://bucket/prefix "
                   "(credentials come from the AWS environment or fsspec config)")
    b.add_argument("--labels", metavar="FILE", help="a .csv or .tsv label file instead of SOURCE: "
                   "path,label rows (paths relative to the file), optionally a split column "
                   "(train, val, test); a header row naming the columns is optional")
    b.add_argument("--split", type=parse_split, metavar="TRAIN,VAL,TEST",
                   help="re-split with these stratified fractions. Default: a source that comes split "
                   "(pre-split folders, a label file's split column) keeps its splits; others are "
                   "split 0.7,0.2,0.1. A source with its own test split keeps it; val is then "
                   "VAL/(TRAIN+VAL) of the source's train part")
    b.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default 0)")
    b.add_argument("--encoding", choices=ENCODINGS, help="source: keep each JPEG/PNG/WebP file's "
                   "bytes (the default for a folder of images of different sizes); raw: uint8 pixels "
                   "(the default otherwise); png, jpeg: re-encode every image")
    b.add_argument("--jpeg-quality", type=int, default=90, metavar="Q",
                   help="for --encoding jpeg, and for JPEG/WebP files that --max-side downscales (default 90)")
    b.add_argument("--resize", type=parse_size, metavar="HxW", help="resize every image")
    b.add_argument("--max-side", type=int, metavar="N",
                   help="downscale images whose longer side is above N pixels (once, at build time)")
    b.add_argument("--skip-bad", action="store_true", help="leave out image files that do not decode "
                   "(counted in the manifest) instead of failing the build")
    color = b.add_mutually_exclusive_group()
    color.add_argument("--grayscale", dest="channels", action="store_const", const=1, help="store 1 channel")
    color.add_argument("--rgb", dest="channels", action="store_const", const=3,
                       help="store 3 channels (default: grayscale when every image is, else RGB)")
    b.add_argument("--shard-bytes", type=parse_bytes, metavar="SIZE",
                   help="target shard size, e.g. 64MB (the default when --shard-samples is unset)")
    b.add_argument("--shard-samples", type=int, metavar="N", help="samples per shard")
    b.add_argument("--workers", type=int, default=default_workers(),
                   help="parallel encoders/uploaders (default min(4, cpus))")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress report")

    v = commands.add_parser("verify", help="recheck shards against the manifest")
    v.add_argument("dest", help="the dataset: a path or URL holding manifest.json")
    v.add_argument("--deep", action="store_true", help="also decode every sample")
    v.add_argument("--workers", type=int, default=default_workers(), help="parallel readers (default min(4, cpus))")
    v.add_argument("--no-progress", dest="progress", action="store_false", help="no progress report")

    x = commands.add_parser("index", help="write manifest.json for existing WebDataset shards",
                            description="Write URL/manifest.json for the .tar shards under URL that "
                            "another tool wrote (e.g. webdataset's TarWriter): per sample KEY.cls "
                            "(decimal label) and one KEY.jpg/.jpeg/.png/.webp image.")
    x.add_argument("dest", metavar="URL", help="the folder (path or s3://...) that holds the shards")
    x.add_argument("--split", choices=SPLITS, help="the split of every shard (default: from each "
                   "file name: train..., val... or valid..., test...)")
    x.add_argument("--classes", type=lambda s: s.split(","), metavar="A,B,...",
                   help="class names in label order (default: 0, 1, ...)")
    x.add_argument("--workers", type=int, default=default_workers(), help="parallel readers (default min(4, cpus))")
    x.add_argument("--no-progress", dest="progress", action="store_false", help="no progress report")

    i = commands.add_parser("inspect", help="print counts per split and the class histogram")
    i.add_argument("dest", help="the dataset: a path or URL holding manifest.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logs = [logging.getLogger(name) for name in ("shards", "shardio")]  # shardio: storage retries
    for log in logs:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return _run(args)
    except Exception as e:
        if not (is_storage_error(e) or isinstance(e, (OSError, ValueError))):
            raise  # a bug: its traceback
        print(f"error: {error_line(e, args.dest)}", file=sys.stderr)
        return 2
    finally:
        for log in logs:
            log.removeHandler(handler)  # main() may run more than once in a process (tests)


def error_line(error: Exception, dest: str) -> str:
    """One line naming what failed. An object store's error (s3fs: "Forbidden") names no URL,
    so the URL being read or written, else DEST, is added, with the setting to check."""
    if is_storage_error(error) or isinstance(error, OSError):
        return storage_message(error, dest)
    return " ".join(str(error).split())


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        if (args.source is None) == (args.labels is None):
            raise ValueError("give SOURCE or --labels FILE (one of them)")
        manifest = build(args.labels or args.source, args.dest, split=args.split, seed=args.seed,
                         encoding=args.encoding, jpeg_quality=args.jpeg_quality,
                         shard_bytes=args.shard_bytes, shard_samples=args.shard_samples,
                         workers=args.workers, resize=args.resize, channels=args.channels,
                         max_side=args.max_side, skip_bad=args.skip_bad, progress=args.progress)
        counts = ", ".join(f"{n} {s['count']}" for n, s in manifest["splits"].items())
        print(f"built {args.dest.rstrip('/')}/manifest.json: {counts}")
    elif args.command == "index":
        manifest = index(args.dest, split=args.split, classes=args.classes,
                         workers=args.workers, progress=args.progress)
        counts = ", ".join(f"{n} {s['count']}" for n, s in manifest["splits"].items())
        print(f"indexed {args.dest.rstrip('/')}/manifest.json: {counts}")
    elif args.command == "verify":
        problems = verify(args.dest, deep=args.deep, workers=args.workers, progress=args.progress)
        for problem in problems:
            print(problem)
        if problems:
            print(f"FAILED: {len(problems)} problem(s) in {args.dest}")
            return 1
        m = load_manifest(args.dest)
        shards = [s for split in m["splits"].values() for s in split["shards"]]
        print(f"OK: {args.dest}: {len(shards)} shards, {sum(s['count'] for s in shards)} "
              f"samples match the manifest{' (decoded)' if args.deep else ''}")
    else:
        print(inspect(args.dest))
    return 0
