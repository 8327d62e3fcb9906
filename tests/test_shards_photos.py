"""Photo folders (images of many sizes, JPEG/PNG/WebP) and existing WebDataset shards:
source bytes kept, --max-side, sizes and pixel statistics in the manifest, bad files
collected, `shards index` on shards written by webdataset's own TarWriter."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import shards
from imgcls.data import DataConfig, ShardReader
from shardio import shard as shardfile
from shardio.format import decode_image, read_tar
from shardio.storage import filesystem, join, read_bytes
from shards.cli import main as cli_main
from shards.sources import FASHION_MNIST_CLASSES, open_source
from tests.conftest import FASHION_MNIST, needs_fashion_mnist

pytestmark = needs_fashion_mnist()
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def source_files(root) -> dict[str, str]:
    """{sample key: file path} as the folder source keys them (class/name, no extension)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            key = os.path.splitext(os.path.relpath(path, root))[0].replace(" ", "_")
            files[key] = path
    return files


def samples(dest: str, manifest: dict, split: str):
    """(shard entry, position in shard, sample dict) for every sample of a split."""
    for shard in manifest["splits"][split]["shards"]:
        for n, sample in enumerate(read_tar(read_bytes(join(dest, shard["path"])))):
            yield shard, n, sample


def shard_sizes(dest: str, shard: dict) -> list[list[int]]:
    """[width, height] per sample of a shard, from its index (the manifest keeps per-shard totals)."""
    return [list(wh) for wh in shardfile.read_index(join(dest, shard["path"])).records[["width", "height"]].tolist()]


def image_ext(sample: dict) -> str:
    (ext,) = set(sample) & {"jpg", "png", "webp"}
    return ext


def numpy_stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([im.reshape(-1, im.shape[2]) for im in images]) / 255.0
    return pixels.mean(axis=0), pixels.std(axis=0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_photo_folder_builds_without_resize_and_keeps_every_files_bytes(photo_folder, tmp_path):
    dest = str(tmp_path / "shards")
    m = shards.build(photo_folder, dest, shard_samples=16, workers=2, progress=False)

    assert m["encoding"] == "source"  # chosen because the sizes differ; no --encoding, no --resize
    assert m["image"] == {"height": None, "width": None, "channels": 3}
    files = source_files(photo_folder)
    seen = set()
    for split in ("train", "val", "test"):
        for shard, n, sample in samples(dest, m, split):
            path, ext = files[sample["__key__"]], image_ext(sample)
            with open(path, "rb") as f:
                source = f.read()
            assert sha256(sample[ext]) == sha256(source)  # byte for byte, no re-encode
            with Image.open(path) as image:
                assert FORMATS[ext] == image.format
                assert shard_sizes(dest, shard)[n] == [image.width, image.height]
            seen.add(sample["__key__"])
    assert seen == set(files)
    assert {image_ext(s) for _, _, s in samples(dest, m, "train")} == {"jpg", "png", "webp"}
    assert shards.verify(dest, deep=True) == []
    all_sizes = np.array([wh for s in m["splits"].values() for shard in s["shards"] for wh in shard_sizes(dest, shard)])
    (low_w, low_h), (high_w, high_h) = all_sizes.min(axis=0), all_sizes.max(axis=0)
    assert 40 <= min(low_w, low_h) < 60 and 280 < max(high_w, high_h) <= 300  # what the folder holds
    assert (f"images: variable size (WxH {low_w}x{low_h} to {high_w}x{high_h}), 3 channel(s), "
            "source encoding") in shards.inspect(dest)


def test_manifest_stats_are_the_train_pixels_mean_and_std(photo_folder, tmp_path):
    dest = str(tmp_path / "shards")
    m = shards.build(photo_folder, dest, progress=False)
    images = [decode_image(s[image_ext(s)], image_ext(s), m["image"]) for _, _, s in samples(dest, m, "train")]
    mean, std = numpy_stats(images)
    assert m["stats"]["split"] == "train" and m["stats"]["images"] == len(images) == m["splits"]["train"]["count"]
    np.testing.assert_allclose(m["stats"]["mean"], mean, atol=2e-6)
    np.testing.assert_allclose(m["stats"]["std"], std, atol=2e-6)
    val = [decode_image(s[image_ext(s)], image_ext(s), m["image"]) for _, _, s in samples(dest, m, "val")]
    assert not np.allclose(numpy_stats(val)[0], mean, atol=1e-4)  # it is the train split's, not another's


def test_max_side_downscales_the_big_images_once_in_their_own_format(photo_folder, s3_bucket):
    dest = f"{s3_bucket}/small"
    m = shards.build(photo_folder, dest, max_side=100, progress=False)

    assert m["encoding"] == "source" and m["max_side"] == 100
    files = source_files(photo_folder)
    kept = shrunk = 0
    images = []
    for shard, n, sample in (x for split in m["splits"] for x in samples(dest, m, split)):
        path, ext = files[sample["__key__"]], image_ext(sample)
        image = Image.open(io.BytesIO(sample[ext]))
        with Image.open(path) as original:
            assert image.format == original.format  # re-encoded in the file's own format
            w, h = original.size
        assert shard_sizes(dest, shard)[n] == [image.width, image.height]
        if max(w, h) <= 100:
            assert sample[ext] == open(path, "rb").read()
            kept += 1
        else:
            assert max(image.size) == 100 and abs(image.width / image.height - w / h) < 0.05
            shrunk += 1
        if split_of(m, shard) == "train":
            images.append(decode_image(sample[ext], ext, m["image"]))
    assert kept > 5 and shrunk > 5
    with pytest.raises(ValueError, match="resize .* or max_side .*, not both"):
        shards.build(photo_folder, f"{s3_bucket}/both", max_side=100, resize=(64, 64), progress=False)
    np.testing.assert_allclose(m["stats"]["mean"], numpy_stats(images)[0], atol=2e-6)
    assert shards.verify(dest, deep=True) == []


def split_of(manifest: dict, shard: dict) -> str:
    return next(name for name, s in manifest["splits"].items() if shard in s["shards"])


def test_fixed_size_sources_stay_raw_with_stats(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    x[..., 0] //= 2  # channels differ
    np.savez(tmp_path / "small.npz", x=x, y=np.arange(40) % 4)
    m = shards.build(tmp_path / "small.npz", tmp_path / "out", progress=False)
    assert m["encoding"] == "raw" and m["image"] == {"height": 6, "width": 6, "channels": 3}
    assert "sizes" not in m["splits"]["train"]["shards"][0]  # one size for all: manifest["image"]
    train = [decode_image(s["raw"], "raw", m["image"]) for _, _, s in samples(str(tmp_path / "out"), m, "train")]
    mean, std = numpy_stats(train)
    np.testing.assert_allclose(m["stats"]["mean"], mean, atol=2e-6)
    np.testing.assert_allclose(m["stats"]["std"], std, atol=2e-6)
    with pytest.raises(ValueError, match="small.npz: encoding 'source' keeps image files' bytes"):
        shards.build(tmp_path / "small.npz", tmp_path / "out2", encoding="source", progress=False)


def test_index_of_built_shards_agrees_with_the_build(photo_folder, tmp_path):
    dest = str(tmp_path / "shards")
    built = shards.build(photo_folder, dest, shard_samples=16, progress=False)
    indexed = shards.index(dest, classes=built["classes"], progress=False)
    assert indexed["stats"] == built["stats"] and indexed["image"] == built["image"]
    assert indexed["splits"] == built["splits"]  # counts, sha256s, class counts and sizes


def break_files(folder) -> list[str]:
    """Three bad files among good ones: a truncated JPEG, a PNG that is not one, an empty WebP."""
    jpg = sorted(folder.rglob("*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (folder / "Coat" / "junk.png").write_bytes(b"\x89PNG but not really")
    (folder / "Dress" / "empty.webp").write_bytes(b"")
    return [str(jpg.relative_to(folder)), "Coat/junk.png", "Dress/empty.webp"]


def test_bad_files_are_reported_together_and_skip_bad_counts_them(photo_folder, tmp_path, capsys, caplog):
    folder = tmp_path / "photos"
    shutil.copytree(photo_folder, folder)
    bad = break_files(folder)
    dest = tmp_path / "out"

    assert cli_main(["build", str(folder), str(dest), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 3 bad image file(s) in ") and "--skip-bad" in err
    for name in bad:
        assert name in err
    assert "truncated" in err
    assert not dest.exists()  # nothing written: the files are checked first

    with caplog.at_level(logging.WARNING, logger="shards"):
        m = shards.build(folder, dest, skip_bad=True, progress=False)
    assert m["skipped"] == {"count": 3, "files": sorted(bad)}
    assert sum(s["count"] for s in m["splits"].values()) == 60 - 1  # 60 files, one broken, two added
    assert "left out 3 bad image file(s)" in caplog.text and "Coat/junk.png" in caplog.text
    assert shards.verify(dest, deep=True) == []
    assert "skipped 3 bad image file(s)" in shards.inspect(dest)


def test_verify_deep_shows_progress_as_log_lines_off_a_terminal(photo_folder, tmp_path, capsys):
    dest = str(tmp_path / "out")
    shards.build(photo_folder, dest, shard_samples=8, progress=False)
    assert cli_main(["verify", dest, "--deep"]) == 0
    err = capsys.readouterr().err
    assert "verify: 60 of 60 images (100%)" in err and len(err.splitlines()) <= 11


def test_verify_deep_shows_a_tqdm_bar_on_a_terminal(photo_folder, tmp_path):
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.conftest import REPO

    dest = str(tmp_path / "out")
    shards.build(photo_folder, dest, progress=False)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with os.fdopen(primary, "rb", buffering=0) as terminal:
        proc = subprocess.run([sys.executable, "-m", "shards", "verify", dest, "--deep"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=secondary, timeout=120)
        os.close(secondary)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the process's side is closed
            while chunk := terminal.read(4096):
                shown += chunk
    assert proc.returncode == 0 and b"OK:" in proc.stdout
    assert b"verify: 100%" in shown and b"60/60" in shown and b"INFO" not in shown


# ---- shards index: shards another tool wrote ---------------------------------------------

def fashion_images(count: int, seed: int = 0):
    source = open_source(FASHION_MNIST)
    picks = np.random.default_rng(seed).choice(60000, count, replace=False)
    return [(source.load(i)[:, :, 0], int(source.labels[i])) for i in picks]


def write_with_tarwriter(folder, images, names, ext: str = "png", resize=None):
    """webdataset's own TarWriter: KEY.png (or .jpg) + KEY.cls, shards named by `names`
    (one per chunk of images); returns {key: (label, HWC array as decoded)}."""
    import webdataset as wds

    written = {}
    chunks = np.array_split(np.arange(len(images)), len(names))
    for name, chunk in zip(names, chunks):
        with wds.TarWriter(str(folder / name)) as sink:
            for i in chunk:
                pixels, label = images[i]
                image = Image.fromarray(pixels)
                if resize:
                    image = image.resize(resize(i))
                out = io.BytesIO()
                image.save(out, format="PNG" if ext == "png" else "JPEG")
                key = f"sample{i:05d}"
                sink.write({"__key__": key, ext: out.getvalue(), "cls": label})
                written[key] = (label, np.asarray(Image.open(io.BytesIO(out.getvalue())))[:, :, None])
    return written


def read_every_sample(url: str, split: str) -> dict:
    reader = ShardReader(DataConfig(url=url, eval_batch_size=16, num_workers=0), split, train=False)
    out = {}
    for batch in reader.loader():
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            out[key] = (int(label), image.permute(1, 2, 0).numpy())
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_index_describes_tarwriter_shards_that_imgcls_then_reads(tmp_path, where, request):
    folder = tmp_path / "wds"
    folder.mkdir()
    names = ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    written = write_with_tarwriter(folder, fashion_images(90), names)
    url = str(folder)
    if where == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/wds"
        fs, root = filesystem(url)
        for name in names:
            fs.put_file(str(folder / name), f"{root}/{name}")

    assert cli_main(["index", url, "--no-progress", "--classes", ",".join(FASHION_MNIST_CLASSES)]) == 0
    m = shards.load_manifest(url)
    assert m["encoding"] == "source" and m["source"]["kind"] == "webdataset"
    assert m["image"] == {"height": 28, "width": 28, "channels": 1}
    assert [s["path"] for s in m["splits"]["train"]["shards"]] == names[:2]
    assert m["splits"]["val"]["count"] == 30 and m["splits"]["test"] == {
        "count": 0, "class_counts": [0] * 10, "shards": []}
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            data = (folder / shard["path"]).read_bytes()
            assert shard["sha256"] == sha256(data) and shard["bytes"] == len(data)
        labels = [written[k][0] for k in read_every_sample(url, split)]
        assert m["splits"][split]["class_counts"] == np.bincount(labels, minlength=10).tolist()
    train = read_every_sample(url, "train")
    assert len(train) == 60
    for key, (label, image) in train.items():  # imgcls's reader gives exactly what TarWriter got
        assert label == written[key][0]
        np.testing.assert_array_equal(image, written[key][1])
    mean, std = numpy_stats([written[k][1] for k in train])
    np.testing.assert_allclose(m["stats"]["mean"], mean, atol=2e-6)
    np.testing.assert_allclose(m["stats"]["std"], std, atol=2e-6)
    assert shards.verify(url, deep=True) == []


def test_index_records_the_sizes_of_variable_size_jpegs_and_names_bad_samples(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    sizes = {i: (40 + 7 * i, 60 + 3 * i) for i in range(20)}
    write_with_tarwriter(folder, fashion_images(20, seed=1), ["shard-a.tar"], ext="jpg", resize=sizes.get)

    with pytest.raises(ValueError, match=r"shard-a\.tar: cannot tell its split .*--split"):
        shards.index(str(folder), progress=False)
    m = shards.index(str(folder), split="train", progress=False)
    assert m["image"]["height"] is None and m["classes"] == [str(c) for c in range(len(m["classes"]))]
    keys = [s["__key__"] for s in read_tar((folder / "shard-a.tar").read_bytes())]
    assert shard_sizes(str(folder), m["splits"]["train"]["shards"][0]) == [list(sizes[int(k[6:])]) for k in keys]
    assert shards.verify(str(folder), deep=True) == []

    import webdataset as wds
    with wds.TarWriter(str(folder / "train-bad.tar")) as sink:
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "cls": 1})
        sink.write({"__key__": "nolabel", "png": b"x"})
    with pytest.raises(ValueError) as error:
        shards.index(str(folder), split="train", progress=False)
    text = str(error.value)
    assert text.startswith(f"2 bad sample(s) under {folder}: ") and "\n" not in text
    assert "train-bad.tar: sample broken: cannot decode image" in text
    assert "train-bad.tar: sample nolabel: " in text
