"""Photos: variable-size images read at data.image_size, with per-sample crops from (seed, epoch, key)."""
from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import checkpoint
from imgcls.augment import PhotoTransform, jpeg_scale, photo_uniforms, resized_crop_box
from imgcls.config import AugmentConfig, DataConfig
from imgcls.data import PHOTO_MEMBERS, DataError, ShardReader, read_manifest
from imgcls.inference import load_image
from shardio.format import read_tar, write_tar
from shardio.image import Encoded

from .conftest import PHOTO_RUN, REPO, build_photo_folder, launch, needs_fashion_mnist

pytestmark = needs_fashion_mnist()
SIZE = 48


def photo_cfg(url, **kw):
    augment = AugmentConfig(**{"saturation": 0.3, "brightness": 0.2, "erasing": 0.3, **kw.pop("augment", {})})
    return DataConfig(url=url, image_size=kw.pop("image_size", SIZE), batch_size=kw.pop("batch_size", 8),
                      eval_batch_size=8, num_workers=kw.pop("num_workers", 0), augment=augment, **kw)


def by_key(batches) -> dict[str, torch.Tensor]:
    return {key: image for batch in batches for key, image in zip(batch["key"], batch["image"])}


def test_variable_size_photos_give_uint8_batches_at_image_size(photo_dataset):
    for train in (True, False):
        reader = ShardReader(photo_cfg(photo_dataset), "train", train=train)
        batches = list(reader.loader())
        assert batches and all(b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, SIZE, SIZE)
                               for b in batches)
        assert reader.transform(batches[0]).shape == (len(batches[0]["key"]), 3, SIZE, SIZE)


def test_variable_size_photos_without_image_size_are_a_one_line_error(photo_dataset):
    with pytest.raises(DataError, match=r"variable size: set data.image_size") as error:
        ShardReader(photo_cfg(photo_dataset, image_size=0), "train")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("auto_augment", ["", "trivial", "randaugment"])
def test_same_crops_across_worker_counts_and_resume(photo_dataset, auto_augment):
    """Every parameter comes from (seed, epoch, key): the worker that reads a sample and a
    resume in the middle of the epoch change nothing, bit for bit."""
    def reader(workers):
        r = ShardReader(photo_cfg(photo_dataset, num_workers=workers, augment={"auto_augment": auto_augment}),
                        "train", seed=3)
        r.set_epoch(1)
        return r

    whole = by_key(reader(0).loader())
    assert by_key(reader(2).loader()).keys() == whole.keys()
    for key, image in by_key(reader(2).loader()).items():
        assert torch.equal(image, whole[key]), key
    resumed = reader(2)
    resumed.load_state_dict({**resumed.state_dict(), "position": 2})
    rest = by_key(resumed.loader())
    assert rest and all(torch.equal(image, whole[key]) for key, image in rest.items())
    other_epoch = reader(0)
    other_epoch.set_epoch(2)
    assert any(not torch.equal(image, whole[key]) for key, image in by_key(other_epoch.loader()).items())


def test_resized_crop_respects_scale_and_ratio():
    scale, ratio = (0.25, 0.6), (0.75, 4 / 3)
    areas, fallbacks = [], 0
    for i in range(2000):
        top, left, h, w = resized_crop_box(375, 500, photo_uniforms(0, 0, f"k{i}"), scale, ratio)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        fraction = h * w / (375 * 500)
        if fraction > scale[1] + 0.01:  # the center fallback after 10 failed tries
            fallbacks += 1
            continue
        areas.append(fraction)
        assert scale[0] - 0.01 <= fraction and ratio[0] - 0.02 <= w / h <= ratio[1] + 0.02
    # the area is uniform on [0.25, 0.6] (every try fits here): mean 0.425, no fallback
    assert fallbacks == 0 and abs(np.mean(areas) - 0.425) < 0.01
    assert np.quantile(areas, 0.1) < 0.3 and np.quantile(areas, 0.9) > 0.55


def test_downscaled_jpeg_decode_keeps_the_crop():
    """A crop decoded from a 1/8-size JPEG decode is the same region as from the full image:
    the box is computed on full-size coordinates and scaled (a box one output pixel off is far
    worse). The rest is the DCT's area average against bilinear's wider filter."""
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 384x512
    buf = io.BytesIO()
    Image.fromarray(blocks).save(buf, format="JPEG", quality=95)
    transform = PhotoTransform(AugmentConfig(flip=False), 32, seed=0)
    u, v = np.ones(6), np.zeros(51)

    def crop(box, scale):
        array = Encoded(buf.getvalue()).array("RGB", scale)
        assert array.shape == (384 // scale, 512 // scale, 3)
        return transform.apply(array, (512, 384), box, u, v).numpy().astype(int)

    assert jpeg_scale(384, 512, 256, 256, 32) == 8 and jpeg_scale(384, 512, 256, 256, 129) == 1
    full = crop((64, 96, 256, 256), 1)
    aligned = np.abs(full - crop((64, 96, 256, 256), 8)).mean()
    shifted = np.abs(full - crop((64, 104, 256, 256), 8)).mean()
    assert aligned < 8 and aligned < shifted / 2


def shard_images(url: str, split: str = "val") -> dict[str, bytes]:
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        for sample in read_tar((Path(url) / shard["path"]).read_bytes()):
            out[sample["__key__"]] = image_member(sample)[1]
    return out


def test_eval_transform_is_timm_resize_and_center_crop_and_predict_uses_it(photo_dataset, tmp_path):
    """The reader's evaluation batch is torchvision's Resize(floor(S / crop_pct)) + CenterCrop(S)
    (exactly on the uint8 tensor, within 2 levels of its PIL path), and predict's
    preprocessing of the same file is the reader's, bit for bit."""
    from torchvision.transforms import InterpolationMode, v2

    reader = ShardReader(photo_cfg(photo_dataset, crop_pct=0.8, mean=[0.5] * 3, std=[0.25] * 3), "val", train=False)
    batches = list(reader.loader())
    images = by_key(batches)
    inputs = {key: x for batch in batches for key, x in zip(batch["key"], reader.transform(batch))}
    resize = v2.Resize(math.floor(SIZE / 0.8), interpolation=InterpolationMode.BILINEAR)
    reference = v2.Compose([v2.PILToTensor(), resize, v2.CenterCrop(SIZE)])
    reference_pil = v2.Compose([resize, v2.CenterCrop(SIZE), v2.PILToTensor()])
    meta = {"image": {"height": SIZE, "width": SIZE, "channels": 3}, "image_size": SIZE, "crop_pct": 0.8,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    for key, data in shard_images(photo_dataset).items():
        photo = Image.open(io.BytesIO(data)).convert("RGB")
        assert (images[key].int() - reference(photo).int()).abs().max() <= 1, key
        assert (images[key].int() - reference_pil(photo).int()).abs().max() <= 2, key
        path = tmp_path / "photo.jpg"
        path.write_bytes(data)
        assert np.array_equal(load_image(path, meta), inputs[key].numpy()), key


def image_member(sample: dict) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's one image member: the source file's own format."""
    ext = next(ext for ext in PHOTO_MEMBERS if ext in sample)
    return ext, sample[ext]


def corrupt_copy(url: str, dest: Path, damage) -> tuple[str, str]:
    """A copy of the dataset whose first train shard has its first sample's image replaced by
    damage(bytes); the manifest's size and sha256 are kept, so checksums must be off."""
    shutil.copytree(url, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    samples = list(read_tar((dest / shard["path"]).read_bytes()))
    ext, data = image_member(samples[0])
    samples[0][ext] = damage(data)
    (dest / shard["path"]).write_bytes(write_tar((s["__key__"], int(s["cls"]), *image_member(s)) for s in samples))
    return shard["path"], samples[0]["__key__"]


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 3], lambda b: b"\xff\xd8garbage"],
                         ids=["truncated", "garbage"])
def test_undecodable_photo_names_shard_and_key_and_counts_as_bad(photo_dataset, tmp_path, damage):
    path, key = corrupt_copy(photo_dataset, tmp_path / "bad", damage)
    url = str(tmp_path / "bad")
    with pytest.raises(DataError, match=rf"shard .*{path}, sample {key}: cannot decode") as error:
        list(ShardReader(photo_cfg(url, verify_checksums=False), "train", train=False))
    assert "\n" not in str(error.value)
    reader = ShardReader(photo_cfg(url, verify_checksums=False, max_bad_samples=1), "train", train=False)
    batches = list(reader)
    assert sum(b["bad"] for b in batches) == 1
    assert key not in by_key(batches) and len(by_key(batches)) == reader.split_count() - 1


def test_fixed_size_data_at_another_size_is_resized(bands_dataset):
    reader = ShardReader(DataConfig(url=bands_dataset, image_size=20, batch_size=16, num_workers=0), "train")
    assert (reader.size, reader.crop) == (20, "resized")
    assert next(iter(reader))["image"].shape == (16, 1, 20, 20)
    native = ShardReader(DataConfig(url=bands_dataset, image_size=12, batch_size=16, num_workers=0), "train")
    assert (native.size, native.crop) == (0, "pad")


def test_unknown_auto_augment_is_a_one_line_error(photo_dataset):
    with pytest.raises(DataError, match=r"auto_augment='autoaug': expected '', trivial or randaugment"):
        ShardReader(photo_cfg(photo_dataset, augment={"auto_augment": "autoaug"}), "train")


def test_fixed_size_data_gets_auto_augment_and_erasing_per_sample(bands_dataset):
    def batch(**augment):
        cfg = DataConfig(url=bands_dataset, batch_size=64, num_workers=0, augment=AugmentConfig(**augment))
        return next(iter(ShardReader(cfg, "train", seed=1)))["image"]

    plain, erased = batch(), batch(erasing=1.0)
    assert plain.shape == erased.shape == (64, 1, 12, 12)
    changed = [(p != e).any().item() for p, e in zip(plain, erased)]
    assert 0.5 < np.mean(changed) and torch.equal(erased, batch(erasing=1.0))
    assert not torch.equal(plain, batch(auto_augment="trivial"))


def test_photo_folder_builds_trains_from_s3_resumes_exactly_evaluates_and_predicts(s3_bucket, tmp_path):
    """The user's path: a folder of variable-size photos -> shards on S3 -> 2-process torchrun,
    stopped mid-epoch and resumed bit for bit -> evaluate -> predict."""
    folder = build_photo_folder(tmp_path / "photos", per_class=8, seed=1)
    url = f"{s3_bucket}/photos"
    subprocess.run([sys.executable, "-m", "shards", "build", str(folder), url, "--shard-samples", "10",
                    "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    assert read_manifest(url)["encoding"] == "source"  # the files' own JPEG, PNG and WebP bytes
    args = [f"data.url={url}", *PHOTO_RUN]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    launch([*args, f"run.dir={straight}"])
    first = launch([*args, f"run.dir={stopped}", "train.max_steps=2"])
    assert json.loads(first.stdout.strip().splitlines()[-1])["status"] == "stopped"
    launch([*args, f"run.dir={stopped}"])
    a, _ = checkpoint.load_latest(straight)
    b, _ = checkpoint.load_latest(stopped)
    assert b["progress"]["restarts"] == 1 and a["progress"]["step"] == b["progress"]["step"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name

    best = f"{straight}/checkpoints/best.pt"
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), best, "--split", "test"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["count"] == read_manifest(url)["splits"]["test"]["count"] > 0
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())[:5]
    onnx = str(tmp_path / "model.onnx")
    subprocess.run([sys.executable, str(REPO / "jobs" / "export.py"), best, "--format", "onnx", "--out", onnx],
                   cwd=REPO, capture_output=True, text=True, timeout=300, check=True)  # checked on the test split
    for model in (best, onnx):
        subprocess.run([sys.executable, str(REPO / "jobs" / "predict.py"), model, *files, "--output",
                        str(tmp_path / "pred.json")], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
        predictions = json.loads((tmp_path / "pred.json").read_text())["predictions"]
        assert [p["path"] for p in predictions] == files and all("top_k" in p for p in predictions)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpg")])
def test_encoded_members_of_any_source_format_decode_like_pil(fmt, ext):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, format=fmt, quality=90)
    image = Encoded(buf.getvalue())
    assert image.size == (40, 30)
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(image.array("RGB"), expected)
    assert image.array("L").shape == (30, 40, 1)
