"""Batch augmentation whose randomness comes from (seed, epoch, sample key) alone.

A resumed run, or the same sample read by a different worker, gets the same augmentation as
an uninterrupted run: nothing depends on a worker's running RNG state. Parameters are drawn
per sample, then applied to the whole batch at once (one affine grid_sample for crop, flip
and rotation; arithmetic for colour jitter).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    enabled: bool = True
    pad: int = 2                # random crop with this zero padding (pixels)
    flip: bool = True           # horizontal flip with p=0.5
    rotate_deg: float = 0.0     # uniform rotation in [-rotate_deg, rotate_deg]
    brightness: float = 0.0     # factor in [1-b, 1+b]
    contrast: float = 0.0       # factor in [1-c, 1+c]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def draw_params(cfg: AugmentConfig, seed: int, epoch: int, keys: list[str]) -> np.ndarray:
    """One row per sample: dx, dy, flip, angle, brightness, contrast."""
    params = np.zeros((len(keys), 6), dtype=np.float64)
    for i, key in enumerate(keys):
        rng = sample_rng(seed, epoch, key)
        u = rng.random(6)  # always six draws, so turning one option off leaves the others unchanged
        params[i] = (
            math.floor(u[0] * (2 * cfg.pad + 1)) - cfg.pad,
            math.floor(u[1] * (2 * cfg.pad + 1)) - cfg.pad,
            float(cfg.flip and u[2] < 0.5),
            (2 * u[3] - 1) * cfg.rotate_deg,
            1 + (2 * u[4] - 1) * cfg.brightness,
            1 + (2 * u[5] - 1) * cfg.contrast,
        )
    return params


def augment_batch(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """images: float [B,C,H,W] in [0,1]. Returns the augmented batch, still in [0,1]."""
    b, _, h, w = images.shape
    p = torch.from_numpy(params).to(images.dtype)
    dx, dy, flip, angle, bright, contrast = p.unbind(1)
    theta = torch.deg2rad(angle)
    sign = 1 - 2 * flip  # -1 mirrors x
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Output pixel (x, y) samples input at R·(sign·x, y) - shift, in normalised coordinates:
    # a crop from a zero-padded image is a shift with zero fill.
    affine = torch.zeros(b, 2, 3, dtype=images.dtype)
    affine[:, 0, 0] = cos * sign
    affine[:, 0, 1] = -sin
    affine[:, 1, 0] = sin * sign
    affine[:, 1, 1] = cos
    affine[:, 0, 2] = -2 * dx / w
    affine[:, 1, 2] = -2 * dy / h
    if params[:, :4].any():
        grid = F.affine_grid(affine, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if (params[:, 4:] != 1).any():
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * contrast.view(b, 1, 1, 1) + mean
        images = (images * bright.view(b, 1, 1, 1)).clamp_(0, 1)
    return images
