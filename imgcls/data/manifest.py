"""What the reader takes from a shard manifest: the manifest itself, the input geometry and the
normalisation. Shared by training, evaluation, inference and export."""
from __future__ import annotations

from imgcls.config import DataConfig
from shardio import manifest as manifests
from shardio import storage


class DataError(RuntimeError):
    """Bad shard or sample. The message names the shard URL and, where known, the sample key."""


def read_manifest(url: str, retry_s: float = storage.DEFAULT_RETRY_S) -> dict:
    if not url:
        raise DataError("data.url is empty: set data.url=PATH_OR_URL, a dataset written by `python -m shards build`")
    try:
        return manifests.read(url, retry_s)
    except FileNotFoundError:
        raise DataError(f"no shard manifest at {manifests.url_of(url)}: build one with "
                        "`python -m shards build`") from None
    except ValueError as e:
        raise DataError(str(e)) from None


def normalization(cfg: DataConfig, manifest: dict) -> tuple[list[float], list[float]]:
    """(mean, std) per channel: the config's, else the manifest's training-split statistics,
    else 0.5 (a manifest written before shards recorded them)."""
    channels = manifest["image"]["channels"]
    stats = manifest.get("stats") or {}
    mean = cfg.mean or stats.get("mean") or [0.5] * channels
    std = cfg.std or stats.get("std") or [0.5] * channels
    return list(mean), list(std)


CROPS = ("auto", "resized", "pad", "none")
PHOTO_MEMBERS = ("jpg", "jpeg", "png", "webp")  # encoded image members, stored as their source


def geometry(cfg: DataConfig, manifest: dict) -> tuple[int, str]:
    """(output side, training crop). Side 0: the dataset's own fixed size, read as it is
    (today's fast path: pad crop on whole batches). Otherwise every image is brought to
    side x side per sample: RandomResizedCrop when training with crop `resized`, the
    evaluation resize + center crop elsewhere (then `pad` shifts and `none` does nothing)."""
    image, crop = manifest["image"], cfg.augment.crop
    if crop not in CROPS:
        raise DataError(f"data.augment.crop={crop!r}: expected one of {', '.join(CROPS)}")
    height, width = image.get("height"), image.get("width")
    if height is None or width is None:
        if cfg.image_size <= 0:
            raise DataError(f"{cfg.url}: images of variable size: set data.image_size (e.g. data.image_size=224)")
        return cfg.image_size, "resized" if crop == "auto" else crop
    native = cfg.image_size <= 0 or (cfg.image_size == height == width)
    if native and crop != "resized":
        return 0, "pad" if crop == "auto" else crop
    if cfg.image_size <= 0 and height != width:
        raise DataError(f"{cfg.url}: a resized crop of {height}x{width} images needs data.image_size")
    return cfg.image_size or height, "resized" if crop == "auto" else crop


def input_size(cfg: DataConfig, manifest: dict) -> int:
    """The side of the model's square input: data.image_size, else the dataset's fixed size."""
    side, _ = geometry(cfg, manifest)
    return side or max(manifest["image"]["height"], manifest["image"]["width"])
