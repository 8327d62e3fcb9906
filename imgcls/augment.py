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


def sample_uniforms(seed: int, epoch: int, key: str) -> np.ndarray:
    """Six uniforms in [0, 1) from a hash of (seed, epoch, key): one blake2b call per sample,
    no generator object (building a numpy Generator per sample took longer than the hash)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=48).digest()
    return (np.frombuffer(digest, dtype="<u8") >> 11) * 2.0 ** -53  # the top 53 bits of each word


def draw_params(cfg: AugmentConfig, seed: int, epoch: int, keys: list[str]) -> np.ndarray:
    """One row per sample: dx, dy, flip, angle, brightness, contrast."""
    if not keys:
        return np.zeros((0, 6))
    # always six draws, so turning one option off leaves the others unchanged
    u = np.stack([sample_uniforms(seed, epoch, key) for key in keys])
    return np.stack([
        np.floor(u[:, 0] * (2 * cfg.pad + 1)) - cfg.pad,
        np.floor(u[:, 1] * (2 * cfg.pad + 1)) - cfg.pad,
        (u[:, 2] < 0.5) & cfg.flip,
        (2 * u[:, 3] - 1) * cfg.rotate_deg,
        1 + (2 * u[:, 4] - 1) * cfg.brightness,
        1 + (2 * u[:, 5] - 1) * cfg.contrast,
    ], axis=1)


def augment_batch(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """images: float [B,C,H,W] in [0,1]. Returns the augmented batch, still in [0,1]."""
    if params[:, 3].any():
        images = _warp(images, params)
    elif params[:, :3].any():  # no rotation: the same result by indexing, several times faster
        images = _shift_flip(images, params[:, 0].astype(np.int64), params[:, 1].astype(np.int64),
                             params[:, 2] > 0)
    if (params[:, 4:] != 1).any():
        bright, contrast = torch.from_numpy(params[:, 4:]).to(images.dtype).view(-1, 2, 1, 1, 1).unbind(1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean) * bright
        images = images.clamp_(0, 1)
    return images


def _warp(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """Crop (a shift with zero fill), flip and rotation as one bilinear affine grid_sample."""
    b, _, h, w = images.shape
    dx, dy, flip, angle = torch.from_numpy(params[:, :4]).to(images.dtype).unbind(1)
    theta = torch.deg2rad(angle)
    sign = 1 - 2 * flip  # -1 mirrors x
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Output pixel (x, y) samples input at R·(sign·x, y) - shift, in normalised coordinates.
    affine = torch.zeros(b, 2, 3, dtype=images.dtype)
    affine[:, 0, 0] = cos * sign
    affine[:, 0, 1] = -sin
    affine[:, 1, 0] = sin * sign
    affine[:, 1, 1] = cos
    affine[:, 0, 2] = -2 * dx / w
    affine[:, 1, 2] = -2 * dy / h
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift_flip(images: torch.Tensor, dx: np.ndarray, dy: np.ndarray, flip: np.ndarray) -> torch.Tensor:
    """Integer shifts with zero fill and horizontal flips by indexing: what `_warp` computes
    for these parameters with no rotation (it then samples exactly at pixel centres)."""
    b, _, h, w = images.shape
    pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
    padded = F.pad(images, (pad, pad, pad, pad))
    cols = torch.arange(w).repeat(b, 1)
    cols = torch.where(torch.from_numpy(flip)[:, None], w - 1 - cols, cols)  # flip, then shift
    cols = cols - torch.from_numpy(dx)[:, None] + pad
    rows = torch.arange(h)[None, :] - torch.from_numpy(dy)[:, None] + pad
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
