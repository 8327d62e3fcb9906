"""The shard writer end to end: real sources in their real formats, a real S3 server (moto)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import shards
from shardio.format import decode_image, encode_image
from shards.cli import main as cli_main
from shards.cli import parse_bytes
from tests.conftest import FASHION_MNIST, REPO, needs_fashion_mnist

FOLDER_COUNTS = {"cat": 12, "dog": 9, "emu": 6}


def s3():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)


def strip(url: str) -> str:
    return url.removeprefix("s3://")


def read_split(dest: str, manifest: dict, split: str) -> list[dict]:
    """Every sample of a split, read back from S3 with tarfile: {key, cls, ext: bytes}."""
    fs, samples = s3(), []
    for shard in manifest["splits"][split]["shards"]:
        data = fs.cat_file(strip(f"{dest}/{shard['path']}"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def make_folder(root, counts=FOLDER_COUNTS, size=(8, 8)):
    """Class subfolders of 8x8 RGB images, PNG and JPEG mixed; returns {key: (label, array)}."""
    rng = np.random.default_rng(1)
    expected = {}
    for label, (cls, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            name = f"sub/img.{i}" if i == 0 else f"img{i:02d}"  # nested, and dots in a name
            path = root / cls / f"{name}.{'jpg' if i % 3 == 2 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(array).save(path)
            expected[f"{cls}/{name.replace('.', '_')}"] = (label, array, path.suffix == ".png")
    return expected


def make_npz(path, counts, shape=(6, 6), test_counts=None, class_names=None):
    rng = np.random.default_rng(2)

    def arrays(counts):
        y = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        return rng.integers(0, 256, (len(y), *shape), dtype=np.uint8), y

    x, y = arrays(counts)
    extra = {}
    if test_counts:
        extra["x_test"], extra["y_test"] = arrays(test_counts)
    if class_names:
        extra["class_names"] = np.array(class_names)
    np.savez(path, x=x, y=y, **extra)
    return x, y, extra


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_folder_build_verify_inspect_s3(tmp_path, s3_bucket):
    expected = make_folder(tmp_path / "pets")
    dest = f"{s3_bucket}/pets"
    m = shards.build(tmp_path / "pets", dest, shard_samples=4, workers=2, progress=False)

    assert m["classes"] == ["cat", "dog", "emu"]
    assert m["image"] == {"height": 8, "width": 8, "channels": 3}
    assert m["source"]["kind"] == "folder" and m["encoding"] == "raw"
    # Stratified, round(n * fraction) per class: cat 12 -> 9/2/1, dog 9 -> 6/2/1, emu 6 -> 4/1/1.
    assert [m["splits"][s]["class_counts"] for s in ("train", "val", "test")] == \
        [[9, 6, 4], [2, 2, 1], [1, 1, 1]]
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [19, 5, 3]
    assert m["warnings"] == []
    assert s3().exists(strip(f"{dest}/manifest.json"))
    assert shards.load_manifest(dest) == m

    seen = []
    for split in ("train", "val", "test"):
        samples = read_split(dest, m, split)
        assert {s["count"] for s in m["splits"][split]["shards"][:-1]} <= {4}
        for s in samples:
            label, array, lossless = expected[s["key"]]
            assert int(s["cls"]) == label
            decoded = decode_image(s["raw"], "raw", m["image"])
            if lossless:
                np.testing.assert_array_equal(decoded, array)
        keys = [s["key"] for s in samples]
        if split == "train":
            assert keys != sorted(keys) and keys != sorted(keys, key=lambda k: expected[k][0])
        seen += keys
    assert sorted(seen) == sorted(expected)  # every key exactly once across the splits

    assert shards.verify(dest) == []
    assert shards.verify(dest, deep=True) == []
    text = shards.inspect(dest)
    assert re.search(r"^cat\s+9\s+2\s+1\s+12$", text, re.M)
    assert re.search(r"^emu\s+4\s+1\s+1\s+6$", text, re.M)
    assert re.search(r"^total\s+19\s+5\s+3\s+27$", text, re.M)


@needs_fashion_mnist()
def test_fashion_mnist_build_verify_inspect_s3(s3_bucket):
    dest = f"{s3_bucket}/fmnist"
    m = shards.build("fashion-mnist", dest, shard_samples=25000, progress=False)

    assert m["source"] == {"kind": "idx", "path": str(FASHION_MNIST), "name": "fashion-mnist"}
    assert m["classes"][0] == "T-shirt/top" and m["classes"][9] == "Ankle boot"
    assert m["image"] == {"height": 28, "width": 28, "channels": 1}
    counts = {s: m["splits"][s]["count"] for s in ("train", "val", "test")}
    assert sum(counts.values()) == 70000
    assert counts["test"] == 10000 and m["splits"]["test"]["class_counts"] == [1000] * 10
    # val is 0.2 / (0.7 + 0.2) of each class's 6000 train images.
    assert m["splits"]["val"]["class_counts"] == [1333] * 10
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [25000, 21670]

    assert shards.verify(dest) == []
    test = {s["key"]: s for s in read_split(dest, m, "test")}
    assert len(test) == 10000
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in (0, 45, 9999):
        sample = test[f"test-{i:06d}"]
        assert int(sample["cls"]) == labels[i]
        np.testing.assert_array_equal(decode_image(sample["raw"], "raw", m["image"])[:, :, 0],
                                      images[i])
    assert re.search(r"^Ankle boot\s+4667\s+1333\s+1000\s+7000$", shards.inspect(dest), re.M)


def test_cli_verify_finds_flipped_missing_truncated_shards_and_never_prints_secrets(
        tmp_path, s3_bucket):
    make_npz(tmp_path / "d.npz", [20, 20, 20])
    dest = f"{s3_bucket}/cli"
    built = run_cli("build", str(tmp_path / "d.npz"), dest, "--shard-bytes", "8kB", "--no-progress")
    assert built.returncode == 0, built.stderr
    ok = run_cli("verify", dest)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    m = shards.load_manifest(dest)
    # 36-byte samples take 2048 tar bytes: 3 fit in 8 kB.
    assert {s["count"] for s in m["splits"]["train"]["shards"][:-1]} == {3}

    fs = s3()
    flipped, missing = (f"{dest}/{s['path']}" for s in m["splits"]["train"]["shards"][:2])
    truncated = f"{dest}/{m['splits']['val']['shards'][0]['path']}"
    data = bytearray(fs.cat_file(strip(flipped)))
    data[1540] ^= 0x01  # in the first image, after the .cls and .raw headers: only sha256 tells
    fs.pipe_file(strip(flipped), bytes(data))
    fs.rm(strip(missing))
    fs.pipe_file(strip(truncated), fs.cat_file(strip(truncated))[:3000])

    bad = run_cli("verify", dest)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    for url in (flipped, missing, truncated):
        assert any(url in line for line in lines), (url, bad.stdout)
    assert len(lines) == 4 and lines[-1].startswith("FAILED")

    shown = run_cli("inspect", dest)
    assert shown.returncode == 0 and re.search(r"^0\s+14\s+4\s+2\s+20$", shown.stdout, re.M)

    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    manifest_text = fs.cat_file(strip(f"{dest}/manifest.json")).decode()
    for out in (built.stdout, built.stderr, ok.stdout, ok.stderr, bad.stdout, bad.stderr,
                shown.stdout, shown.stderr, manifest_text):
        for secret in secrets:
            assert secret not in out


def test_rebuild_is_idempotent_and_byte_identical(tmp_path, s3_bucket, caplog):
    make_npz(tmp_path / "d.npz", [15, 15, 15])
    a, b = f"{s3_bucket}/a", f"{s3_bucket}/b"
    fs = s3()
    first = shards.build(tmp_path / "d.npz", a, shard_samples=6, progress=False)
    paths = [s["path"] for split in first["splits"].values() for s in split["shards"]]
    stamps = {p: fs.info(strip(f"{a}/{p}"))["LastModified"] for p in paths}
    manifest_bytes = fs.cat_file(strip(f"{a}/manifest.json"))
    # A shard corrupted in place (same size) must be uploaded again, the rest not.
    corrupt = paths[0]
    data = bytearray(fs.cat_file(strip(f"{a}/{corrupt}")))
    data[1540] ^= 0xFF
    fs.pipe_file(strip(f"{a}/{corrupt}"), bytes(data))
    stamps[corrupt] = fs.info(strip(f"{a}/{corrupt}"))["LastModified"]
    time.sleep(1.1)  # S3 LastModified has 1 s resolution

    with caplog.at_level(logging.INFO, logger="shards"):
        second = shards.build(tmp_path / "d.npz", a, shard_samples=6, progress=False)
    assert second == first
    assert fs.cat_file(strip(f"{a}/manifest.json")) == manifest_bytes
    assert f"1 uploaded, {len(paths) - 1} already up to date" in caplog.text
    fs.invalidate_cache()
    for p in paths:
        changed = fs.info(strip(f"{a}/{p}"))["LastModified"] != stamps[p]
        assert changed == (p == corrupt), p
    assert shards.verify(a) == []

    shards.build(tmp_path / "d.npz", b, shard_samples=6, progress=False)
    for p in paths:
        assert fs.cat_file(strip(f"{a}/{p}")) == fs.cat_file(strip(f"{b}/{p}"))

    # A different build over the old one: old shards it no longer names are listed.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shards"):
        shards.build(tmp_path / "d.npz", a, shard_samples=100, progress=False)
    assert "not in the new manifest" in caplog.text and f"{a}/train/train-000004.tar" in caplog.text
    assert shards.verify(a) == []


def test_deep_verify_finds_undecodable_image_and_bad_label(tmp_path, s3_bucket):
    make_npz(tmp_path / "d.npz", [10, 10, 10])
    dest = f"{s3_bucket}/deep"
    m = shards.build(tmp_path / "d.npz", dest, encoding="png", shard_samples=10, progress=False)
    shard = m["splits"]["train"]["shards"][0]
    url = f"{dest}/{shard['path']}"
    fs = s3()

    # Rewrite the shard: sample 0's PNG replaced by junk, sample 1's label out of range.
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(strip(url)))) as src, \
            tarfile.open(fileobj=out, mode="w") as dst:
        members = src.getmembers()
        keys = list(dict.fromkeys(mem.name.split(".")[0] for mem in members))
        for mem in members:
            data = src.extractfile(mem).read()
            if mem.name == f"{keys[0]}.png":
                data = b"not a png at all"
            elif mem.name == f"{keys[1]}.cls":
                data = b"7"
            mem.size = len(data)
            dst.addfile(mem, io.BytesIO(data))
    fs.pipe_file(strip(url), out.getvalue())
    shard.update(bytes=len(out.getvalue()), sha256=hashlib.sha256(out.getvalue()).hexdigest())
    fs.pipe_file(strip(f"{dest}/manifest.json"), json.dumps(m).encode())

    assert shards.verify(dest) == []
    problems = shards.verify(dest, deep=True)
    assert len(problems) == 2, problems
    assert url in problems[0] and keys[0] in problems[0] and "decode" in problems[0]
    assert url in problems[1] and keys[1] in problems[1] and "label 7" in problems[1]
    deep = run_cli("verify", "--deep", dest)
    assert deep.returncode == 1 and keys[1] in deep.stdout


def test_cifar10_cifar100_and_npz_sources(tmp_path, s3_bucket):
    rng = np.random.default_rng(3)

    def dump(path, obj):  # bytes keys, as the official Python 2 pickles load
        with open(path, "wb") as f:
            pickle.dump({k.encode(): v for k, v in obj.items()}, f)

    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
        labels = [(6 * (i - 1) + j) % 10 for j in range(6)]
        dump(c10 / f"data_batch_{i}", {"data": data, "labels": labels, "batch_label": b"x"})
        batches.append(data)
    dump(c10 / "test_batch", {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                              "labels": list(range(10))})
    names = [f"class{c}".encode() for c in range(10)]
    dump(c10 / "batches.meta", {"label_names": names, "num_cases_per_batch": 6})
    m = shards.build(c10, f"{s3_bucket}/c10", shard_samples=8, progress=False)
    assert m["source"]["kind"] == "cifar10"
    assert m["classes"] == [n.decode() for n in names]
    assert m["image"] == {"height": 32, "width": 32, "channels": 3}
    # 3 train images per class: val = round(3 * 2/9) = 1; the 10 test images stay test.
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [20, 10, 10]
    samples = {s["key"]: s for split in ("train", "val")
               for s in read_split(f"{s3_bucket}/c10", m, split)}
    row = batches[1][1]  # train image 7 = second row of data_batch_2, planes R, G, B
    np.testing.assert_array_equal(decode_image(samples["train-000007"]["raw"], "raw", m["image"]),
                                  row.reshape(3, 32, 32).transpose(1, 2, 0))
    assert samples["train-000007"]["cls"] == b"7"

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    dump(c100 / "train", {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                          "fine_labels": [j % 4 for j in range(20)], "coarse_labels": [0] * 20})
    dump(c100 / "test", {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "fine_labels": [0, 1, 2, 3], "coarse_labels": [0] * 4})
    dump(c100 / "meta", {"fine_label_names": [b"apple", b"bee", b"cup", b"dog"],
                         "coarse_label_names": [b"all"]})
    m = shards.build(c100, f"{s3_bucket}/c100", progress=False)
    assert m["source"]["kind"] == "cifar100" and m["classes"] == ["apple", "bee", "cup", "dog"]
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [16, 4, 4]
    assert shards.verify(f"{s3_bucket}/c100", deep=True) == []

    x, y, extra = make_npz(tmp_path / "digits.npz", [7, 7], test_counts=[2, 3],
                           class_names=["zero", "one"])
    m = shards.build(tmp_path / "digits.npz", f"{s3_bucket}/npz", encoding="jpeg", progress=False)
    assert m["source"]["kind"] == "npz" and m["source"]["name"] == "digits"
    assert m["classes"] == ["zero", "one"] and m["jpeg_quality"] == 90
    assert m["image"] == {"height": 6, "width": 6, "channels": 1}
    assert [m["splits"][s]["class_counts"] for s in ("train", "val", "test")] == \
        [[5, 5], [2, 2], [2, 3]]
    test = {s["key"]: s for s in read_split(f"{s3_bucket}/npz", m, "test")}
    assert sorted(test) == [f"test-{i:06d}" for i in range(5)]
    assert test["test-000004"]["cls"] == b"1"
    assert decode_image(test["test-000004"]["jpg"], "jpg", m["image"]).shape == (6, 6, 1)
    assert shards.verify(f"{s3_bucket}/npz", deep=True) == []


def test_warnings_for_imbalance_and_missing_classes(tmp_path, s3_bucket, caplog):
    make_npz(tmp_path / "skewed.npz", [80, 18, 2])
    with caplog.at_level(logging.WARNING, logger="shards"):
        m = shards.build(tmp_path / "skewed.npz", f"{s3_bucket}/skewed", progress=False)
    # class 2: round(2 * 0.2) = 0 val and round(2 * 0.1) = 0 test samples.
    assert m["splits"]["val"]["class_counts"] == [16, 4, 0]
    assert "class '0' is 80% of train (56 of 70 samples)" in m["warnings"]
    assert "class '0' is 80% of val (16 of 20 samples)" in m["warnings"]
    assert "class '2' has no samples in val or test" in m["warnings"]
    assert len(m["warnings"]) == 4  # also 80% of test
    for w in m["warnings"]:
        assert w in caplog.text
    assert shards.load_manifest(f"{s3_bucket}/skewed")["warnings"] == m["warnings"]
    assert "warnings:" in shards.inspect(f"{s3_bucket}/skewed")


def test_images_of_different_sizes(tmp_path, s3_bucket):
    make_folder(tmp_path / "mixed", {"a": 3, "b": 3})
    odd = tmp_path / "mixed" / "b" / "img02.jpg"
    Image.new("RGB", (8, 10)).save(odd)  # 10 high, 8 wide
    with pytest.raises(ValueError, match=r"img02\.jpg is 10x8.*--resize"):
        shards.build(tmp_path / "mixed", f"{s3_bucket}/mixed", encoding="raw", progress=False)
    m = shards.build(tmp_path / "mixed", f"{s3_bucket}/mixed", progress=False)
    assert m["encoding"] == "source" and m["image"]["height"] is None  # the default keeps the files
    assert shards.verify(f"{s3_bucket}/mixed", deep=True) == []
    m = shards.build(tmp_path / "mixed", f"{s3_bucket}/resized", resize=(4, 5), channels=1,
                     progress=False)
    assert m["image"] == {"height": 4, "width": 5, "channels": 1}
    assert shards.verify(f"{s3_bucket}/resized", deep=True) == []
    m = shards.build(tmp_path / "mixed", f"{s3_bucket}/png", encoding="png", progress=False)
    assert m["image"] == {"height": None, "width": None, "channels": 3}
    assert shards.verify(f"{s3_bucket}/png", deep=True) == []


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    dest = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="source not found: .*nowhere"):
        shards.build(tmp_path / "nowhere", dest)

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    (tmp_path / "table.npy").write_text("1,2")
    for path in (tmp_path / "notes", tmp_path / "table.npy"):
        with pytest.raises(ValueError, match="cannot tell what dataset"):
            shards.build(path, dest)

    make_folder(tmp_path / "broken", {"a": 2, "b": 2})
    (tmp_path / "broken" / "b" / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=r"cannot read image .*b/bad\.png"):
        shards.build(tmp_path / "broken", dest)

    make_folder(tmp_path / "clash", {"a": 2})
    Image.new("RGB", (8, 8)).save(tmp_path / "clash" / "a" / "img01.jpg")
    with pytest.raises(ValueError, match=r"img01\.(jpg|png) and .*img01\.(jpg|png).*'a/img01'"):
        shards.build(tmp_path / "clash", dest)

    idx = tmp_path / "mnist"
    idx.mkdir()
    write_idx(idx / "train-images-idx3-ubyte.gz", np.zeros((5, 4, 4)))
    write_idx(idx / "train-labels-idx1-ubyte.gz", np.zeros(4))
    write_idx(idx / "t10k-images-idx3-ubyte.gz", np.zeros((2, 4, 4)))
    write_idx(idx / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz has 5 images but "
                                         ".*train-labels-idx1-ubyte.gz has 4 labels"):
        shards.build(idx, dest)

    np.savez(tmp_path / "uneven.npz", x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="uneven.npz: 5 train images but 4 labels"):
        shards.build(tmp_path / "uneven.npz", dest)

    make_npz(tmp_path / "ok.npz", [5, 5])
    for split in [(0.5, 0.2, 0.1), (0.7, 0.3), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError, match="split fractions"):
            shards.build(tmp_path / "ok.npz", dest, split=split)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["build", str(tmp_path / "ok.npz"), dest, "--split", "0.5,0.5"])
    assert exit_.value.code == 2 and "split fractions" in capsys.readouterr().err
    assert cli_main(["build", str(tmp_path / "missing.npz"), dest]) == 2
    assert "source not found" in capsys.readouterr().err
    assert not os.path.exists(dest)  # nothing written by any failed build

    assert cli_main(["verify", dest]) == 1
    assert "no manifest at" in capsys.readouterr().out


def test_format_helpers():
    assert parse_bytes("1MB") == 10**6 and parse_bytes("1MiB") == 2**20
    assert parse_bytes("64mb") == 64 * 10**6 and parse_bytes("4096") == 4096
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    meta = {"height": 2, "width": 3, "channels": 3}
    for encoding in ("raw", "png"):
        ext, data = encode_image(array, encoding)
        np.testing.assert_array_equal(decode_image(data, ext, meta), array)
    with pytest.raises(ValueError, match="17 bytes, expected 18"):
        decode_image(b"x" * 17, "raw", meta)
    with pytest.raises(ValueError, match="cannot decode png"):
        decode_image(b"junk", "png", meta)
    with pytest.raises(ValueError, match="sample k: label 3 is outside"):
        shards.decode_sample({"__key__": "k", "cls": b"3", "raw": array.tobytes()},
                             {"encoding": "raw", "image": meta, "classes": ["a", "b", "c"]})


def _tar(members, **kwargs) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", **kwargs) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def test_read_tar_fast_path_agrees_with_tarfile_and_falls_back_for_other_headers():
    from shardio.format import _NotPlainUstar, _tarfile_members, _ustar_members, read_tar, write_tar

    plain = write_tar([(f"dir/k{i}", i % 3, "raw", bytes([i]) * (100 + 300 * i)) for i in range(5)])
    assert list(_ustar_members(plain)) == list(_tarfile_members(plain))
    samples = list(read_tar(plain))
    assert [s["__key__"] for s in samples] == [f"dir/k{i}" for i in range(5)]
    assert samples[3]["cls"] == b"0" and samples[3]["raw"] == bytes([3]) * 1000

    # A GNU long name and a pax header are not plain ustar: the whole shard goes through tarfile.
    long_key = "x" * 120
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = _tar([(f"{long_key}.cls", b"1"), (f"{long_key}.raw", b"abc"), ("b.cls", b"2")], format=fmt)
        with pytest.raises(_NotPlainUstar):
            list(_ustar_members(data))
        assert [(s["__key__"], s["cls"]) for s in read_tar(data)] == [(long_key, b"1"), ("b", b"2")]

    broken = bytearray(plain)
    broken[10] ^= 1  # a name byte: the header checksum no longer matches
    with pytest.raises(ValueError, match="bad checksum"):
        list(read_tar(bytes(broken)))
    with pytest.raises(ValueError, match="truncated"):
        list(read_tar(plain[:512 + 50]))
    with pytest.raises(ValueError, match="has no extension"):
        list(read_tar(_tar([("noext", b"1")], format=tarfile.USTAR_FORMAT)))
