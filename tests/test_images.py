"""The one decoder (shardio/image.py) behind every caller: predict's load_image, the shard
reader, verify. Foreign formats are refused by their bytes; a thin image costs no more than
a square one."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import shards
from imgcls.config import DataConfig
from imgcls.data import DataError, ShardReader
from imgcls.inference import load_image
from shardio.format import write_tar
from shardio.image import UnsupportedFormat

from .conftest import REPO

META = {"image": {"height": 224, "width": 224, "channels": 3}, "image_size": 224, "crop_pct": 0.875,
        "mean": [0.5] * 3, "std": [0.25] * 3}


def encoded(fmt: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "EPS", "PPM", "TGA", "ICO"])
def test_predict_refuses_formats_outside_the_allow_list_even_named_png(tmp_path, fmt):
    path = tmp_path / "photo.png"  # the name lies: the bytes decide
    path.write_bytes(encoded(fmt))
    with pytest.raises(UnsupportedFormat, match="not an image in a format decoded here"):
        load_image(path, META)
    with pytest.raises(UnsupportedFormat):
        load_image(io.BytesIO(path.read_bytes()), META)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_predict_decodes_jpeg_png_webp_whatever_their_name(tmp_path, fmt):
    path = tmp_path / "photo.bmp"
    path.write_bytes(encoded(fmt))
    assert load_image(path, META).shape == (3, 224, 224)


def tar_dataset(root, samples) -> str:
    """A one-shard val split of (key, label, ext, bytes) samples, indexed by `shards index`."""
    root.mkdir()
    (root / "val-000000.tar").write_bytes(write_tar(samples))
    (root / "train-000000.tar").write_bytes(write_tar([("t0", 0, "png", encoded("PNG")),
                                                       ("t1", 1, "png", encoded("PNG"))]))
    shards.index(str(root), progress=False, workers=1)
    return str(root)


def test_reader_refuses_a_bmp_member_named_png_naming_the_shard_and_key(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "val-000000.tar").write_bytes(write_tar([("good", 0, "png", encoded("PNG")),
                                                     ("t1", 1, "png", encoded("PNG"))]))
    (root / "train-000000.tar").write_bytes(write_tar([("t0", 0, "png", encoded("PNG"))]))
    shards.index(str(root), progress=False, workers=1)
    # swapped in after indexing (index refuses it too), checksums off: the reader must refuse it
    (root / "val-000000.tar").write_bytes(write_tar([("good", 0, "png", encoded("PNG")),
                                                     ("bad", 1, "png", encoded("BMP"))]))
    reader = ShardReader(DataConfig(url=str(root), image_size=32, eval_batch_size=2, num_workers=0,
                                    verify_checksums=False), "val", train=False)
    with pytest.raises(DataError, match=r"val-000000.tar, sample bad: not an image in a format decoded here"):
        list(reader)


def test_index_refuses_a_bmp_member_named_png(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "val-000000.tar").write_bytes(write_tar([("bad", 0, "png", encoded("BMP"))]))
    with pytest.raises(ValueError, match="sample bad: .*not an image in a format decoded here"):
        shards.index(str(root), progress=False, workers=1)


# Peak resident memory of predict's and the evaluation reader's decode + transform, in a fresh
# process (VmHWM, after the imports and a first small image), so it does not count pytest.
PEAK = """
import re, sys
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) // 1024
from imgcls.inference import load_image
from imgcls.data import ShardReader
from imgcls.config import DataConfig
meta = {"image": {"height": 224, "width": 224, "channels": 3}, "image_size": 224, "crop_pct": 0.875,
        "mean": [0.5] * 3, "std": [0.25] * 3}
small, thin, dataset = sys.argv[1:]
load_image(small, meta)  # the one-off allocations of the resize
before = peak_mb()
predicted = load_image(thin, meta).shape
cfg = DataConfig(url=dataset, image_size=224, eval_batch_size=4, num_workers=0)
read = tuple(next(iter(ShardReader(cfg, "val", train=False)))["image"].shape)
print(predicted, read, peak_mb() - before)
"""


def test_a_thin_image_costs_no_more_than_the_output_in_predict_and_a_val_shard(tmp_path):
    """A 1x2000 PNG (a few kB) at 224 px: the evaluation transform used to resize it whole to
    256 x 512000 pixels (778 MB more peak memory in predict). Now its cost is bounded by the
    output; a 1x60000 one in the same shard too."""
    thin = encoded("PNG", (1, 2000))
    (tmp_path / "small.png").write_bytes(encoded("PNG", (300, 200)))
    (tmp_path / "thin.png").write_bytes(thin)
    dataset = tar_dataset(tmp_path / "ds", [("thin", 0, "png", thin), ("wide", 1, "png", encoded("PNG", (60000, 1)))])
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "small.png"), str(tmp_path / "thin.png"), dataset],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("(3, 224, 224) (2, 3, 224, 224) "), out.stdout
    assert int(out.stdout.split()[-1]) < 50, out.stdout


def test_the_clamped_eval_transform_keeps_the_center_crop():
    """Cutting a long source to MAX_ASPECT before resizing changes the output by rounding only."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from imgcls.augment import MAX_ASPECT, eval_resize_crop, resize_uint8
    rng = np.random.default_rng(0)
    smooth = resize_uint8(torch.from_numpy(rng.integers(0, 255, (3, 8, 8 * 3 * MAX_ASPECT), dtype=np.uint8)),
                          (60, 60 * 3 * MAX_ASPECT))
    ours = eval_resize_crop(smooth, 48, 0.875)
    short = int(48 / 0.875)
    whole = TF.center_crop(resize_uint8(smooth, (short, short * 3 * MAX_ASPECT)), [48, 48])
    assert (ours.int() - whole.int()).abs().max() <= 3


# ---- shards index: duplicate members, a stray label -------------------------------------
def test_index_refuses_duplicate_members_naming_the_shard_and_key(tmp_path):
    """`d.cls d.png d.cls d.png` used to be read as one sample, silently losing the other."""
    root = tmp_path / "ds"
    root.mkdir()
    png = encoded("PNG")
    (root / "train-000000.tar").write_bytes(write_tar([("a", 0, "png", png), ("d", 0, "png", png),
                                                       ("d", 1, "png", png)]))
    with pytest.raises(ValueError,
                       match=r"train-000000.tar is not a readable tar: sample d: member 'd.cls' appears twice"):
        shards.index(str(root), progress=False, workers=1)


def test_a_stray_label_does_not_define_the_class_count(tmp_path):
    """Without --classes, one `.cls` of 400000 used to make 400,000 classes."""
    root = tmp_path / "ds"
    root.mkdir()
    png = encoded("PNG")
    samples = [(f"s{i}", i % 3, "png", png) for i in range(6)] + [("stray", 400000, "png", png)]
    (root / "train-000000.tar").write_bytes(write_tar(samples))
    with pytest.raises(ValueError, match=r"train-000000.tar: sample stray: label 400000 would make 400001 classes, "
                                         r"but only 4 distinct labels"):
        shards.index(str(root), progress=False, workers=1)
    assert not (root / "manifest.json").exists()
