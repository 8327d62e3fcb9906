"""Per-channel pixel statistics from histograms: exact, cheap (PIL and numpy count in C), and
additive, so images of any size are summed as they stream past."""
from __future__ import annotations

import numpy as np
from PIL import Image


def histogram(image: np.ndarray | Image.Image) -> np.ndarray:
    """(channels, 256) counts of an HWC uint8 array or an "L"/"RGB" PIL image."""
    if isinstance(image, Image.Image):
        return np.array(image.histogram(), np.int64).reshape(-1, 256)
    return np.stack([np.bincount(image[:, :, c].ravel(), minlength=256) for c in range(image.shape[2])])


def channel_stats(hist: np.ndarray, split: str, images: int) -> dict:
    """The manifest's "stats": per-channel mean and std (population) of the pixels, in [0, 1]."""
    values = np.arange(256) / 255.0
    n = hist.sum(axis=1)
    if not n.all():  # no pixels: nothing to say
        return {"split": split, "images": images, "mean": None, "std": None}
    mean = hist @ values / n
    std = np.sqrt(np.maximum(hist @ values ** 2 / n - mean ** 2, 0.0))
    return {"split": split, "images": images,
            "mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}
