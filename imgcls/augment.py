"""Batch augmentation whose randomness comes from (seed, epoch, sample key) alone.

A resumed run, or the same sample read by a different worker, gets the same augmentation as
an uninterrupted run: nothing depends on a worker's running RNG state. Parameters are drawn
per sample in the loader worker and applied to the whole batch at once, in two halves:

- in the worker, on uint8: the random crop (an integer shift with zero fill) and the flip,
  by indexing, exact on integers; batches stay uint8, 4x less host-to-device traffic;
- on the training device (`InputTransform`): float conversion, rotation (one bilinear
  grid_sample), colour jitter and normalisation, where a GPU does them for free.
"""
from __future__ import annotations

import hashlib
import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import AugmentConfig


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


def crop_flip(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """The worker's half: images uint8 [B,C,H,W], shifted (zero fill) and flipped by `params`."""
    if not params[:, :3].any():
        return images
    return _shift_flip(images, params[:, 0].astype(np.int64), params[:, 1].astype(np.int64), params[:, 2] > 0)


def photometric(params: np.ndarray) -> torch.Tensor | None:
    """The device's half of `params`: [B, 3] float32 (angle, brightness, contrast), or None
    when they change nothing."""
    rest = params[:, 3:]
    if not (rest[:, 0].any() or (rest[:, 1:] != 1).any()):
        return None
    return torch.from_numpy(rest.astype(np.float32))


class InputTransform:
    """uint8 batches -> the model's float input, on the batch's device: rotation and colour
    jitter (with `photometric` parameters), normalisation, and channels_last when asked."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, params: torch.Tensor | None = None,
                 channels_last: bool = False) -> torch.Tensor:
        images = images.float().div_(255)
        if params is not None:
            images = _rotate_jitter(images, params.to(images.device, non_blocking=True))
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        images = (images - self.mean) / self.std
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _rotate_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """images float [B,C,H,W] in [0,1]; params [B, 3]: angle, brightness, contrast."""
    angle, bright, contrast = params.to(images.dtype).unbind(1)
    if angle.any():
        images = _rotate(images, angle)
    if (bright != 1).any() or (contrast != 1).any():
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast.view(-1, 1, 1, 1) + mean) * bright.view(-1, 1, 1, 1)
        images = images.clamp_(0, 1)
    return images


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotation about the centre, zero fill, as one bilinear affine grid_sample."""
    theta = torch.deg2rad(degrees)
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift_flip(images: torch.Tensor, dx: np.ndarray, dy: np.ndarray, flip: np.ndarray) -> torch.Tensor:
    """Integer shifts with zero fill and horizontal flips by indexing (any dtype)."""
    b, _, h, w = images.shape
    pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
    padded = F.pad(images, (pad, pad, pad, pad))
    cols = torch.arange(w).repeat(b, 1)
    cols = torch.where(torch.from_numpy(flip)[:, None], w - 1 - cols, cols)  # flip, then shift
    cols = cols - torch.from_numpy(dx)[:, None] + pad
    rows = torch.arange(h)[None, :] - torch.from_numpy(dy)[:, None] + pad
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
