"""Datasets are not trusted code: pickles, decompression bombs, manifest paths, and the
error a wrong S3 credential gives."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import shards
from tests.conftest import REPO, build_bands_dataset, moto_server


def run_cli(*args, env: dict | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    return lines[-1]


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_cifar10(folder, protocol: int, legacy_numpy_names: bool = False) -> None:
    """A CIFAR-10 python folder: bytes keys, as the official Python 2 pickles load; with
    `legacy_numpy_names` the arrays are rebuilt by numpy.core.multiarray, as in those files."""
    rng = np.random.default_rng(0)
    folder.mkdir()

    def dump(name, obj):
        data = pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=protocol)
        if legacy_numpy_names:
            data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            assert b"numpy.core.multiarray\n" in data or b"data" not in obj
        (folder / name).write_bytes(data)

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        dump(name, {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10)),
                    "batch_label": b"batch", "filenames": [f"{i}.png".encode() for i in range(10)]})
    dump("batches.meta", {"label_names": [f"c{i}".encode() for i in range(10)], "num_cases_per_batch": 10})


def test_cifar_pickle_that_runs_a_command_is_refused(tmp_path):
    source = tmp_path / "cifar-10-batches-py"
    write_cifar10(source, protocol=2)
    marker = tmp_path / "ran"
    (source / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsACommand(marker), b"labels": [0]}))
    line = error_line(run_cli("build", str(source), str(tmp_path / "out"), "--no-progress"))
    assert str(source / "data_batch_1") in line and "refusing to load posix.system" in line
    assert not marker.exists()


@pytest.mark.parametrize("protocol, legacy", [(2, True), (2, False), (5, False)])
def test_cifar_pickles_of_arrays_lists_and_bytes_still_load(tmp_path, protocol, legacy):
    source = tmp_path / "cifar-10-batches-py"
    write_cifar10(source, protocol, legacy)
    manifest = shards.build(source, str(tmp_path / "out"), progress=False, workers=1)
    assert manifest["classes"] == [f"c{i}" for i in range(10)] and manifest["splits"]["test"]["count"] == 10


def png_bomb(height: int, width: int) -> bytes:
    """A PNG whose header says height x width grey pixels, all zero: about 1/1000 of that."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pack = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte, then the pixels
    pixels = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# Peak memory from VmHWM, this process image's own: ru_maxrss survives exec, so it would
# count the (large) pytest process that forked it.
DECODE_AND_REPORT = """
import re, sys
from shardio.format import decode_image
try:
    decode_image(open(sys.argv[1], "rb").read(), "png", {"height": 12, "width": 12, "channels": 1})
except ValueError as e:
    print(e)
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) // 1024)
"""


def test_png_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(12000, 12000))  # 144M pixels
    assert bomb.stat().st_size < 300_000
    out = subprocess.run([sys.executable, "-c", DECODE_AND_REPORT, str(bomb)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    message, peak_mb = out.stdout.splitlines()
    assert message.startswith("12000x12000 pixels, more than the") and "refused before decoding" in message
    assert int(peak_mb) < 200, f"decoding took {peak_mb} MB before refusing"  # decoded: 144 MB or more

    folder = tmp_path / "pets"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "bomb.png").write_bytes(bomb.read_bytes())
    line = error_line(run_cli("build", str(folder), str(tmp_path / "out"), "--no-progress"))
    assert str(folder / "cat" / "bomb.png") in line and "refused before decoding" in line


@pytest.mark.parametrize("path", ["/etc/passwd", "../elsewhere/train-000000.tar", "s3://other/x.tar"])
def test_manifest_shard_paths_must_stay_inside_the_dataset(tmp_path, path):
    dest = build_bands_dataset(tmp_path, n=200)
    manifest_path = os.path.join(dest, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["splits"]["train"]["shards"][0]["path"] = path
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    verify = run_cli("verify", dest)
    assert verify.returncode == 1 and f"shard path {path!r} must be relative" in verify.stdout
    line = error_line(run_cli("inspect", dest))
    assert manifest_path in line and repr(path) in line


def test_wrong_s3_credentials_give_one_line_naming_the_url(tmp_path):
    source = tmp_path / "tiny.npz"
    np.savez(source, images=np.zeros((8, 4, 4, 1), np.uint8), labels=np.arange(8) % 2)
    with moto_server(tmp_path / "moto.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "wrong-key", "AWS_SECRET_ACCESS_KEY": "wrong",
               "AWS_DEFAULT_REGION": "us-east-1"}
        line = error_line(run_cli("build", str(source), "s3://data/tiny", "--no-progress", env=env))
    assert line.startswith("error: s3://data/tiny: ") and "credentials" in line


def test_the_trainer_refuses_escaping_shard_paths_too(tmp_path):
    from imgcls.data import DataError, read_manifest

    dest = build_bands_dataset(tmp_path, n=200)
    manifest_path = os.path.join(dest, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["splits"]["train"]["shards"][0]["path"] = "/etc/passwd"
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(DataError, match="shard path '/etc/passwd' must be relative"):
        read_manifest(dest)
