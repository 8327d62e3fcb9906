"""Batch augmentation whose randomness comes from (seed, epoch, sample key) alone.

A resumed run, or the same sample read by a different worker, gets the same augmentation as
an uninterrupted run: nothing depends on a worker's running RNG state. Parameters are drawn
per sample in the loader worker and applied to the whole batch at once, in two halves:

- in the worker, on uint8: the random crop (an integer shift with zero fill) and the flip,
  by indexing, exact on integers; batches stay uint8, 4x less host-to-device traffic;
- on the training device (`InputTransform`): float conversion, rotation (one bilinear
  grid_sample), colour jitter and normalisation, where a GPU does them for free.

Photos (images of any size, read at `data.image_size`) get their geometry per sample in the
worker, on the decoded PIL image (`PhotoTransform`): RandomResizedCrop with torchvision's
algorithm, flip, TrivialAugmentWide/RandAugment through torchvision's own ops and random
erasing, all with parameters from `photo_uniforms`; evaluation resizes the shorter side and
center-crops (`eval_resize_crop`, shared with predict and export).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import AugmentConfig


def sample_uniforms(seed: int, epoch: int, key: str) -> np.ndarray:
    """Six uniforms in [0, 1) from a hash of (seed, epoch, key): one blake2b call per sample,
    no generator object (building a numpy Generator per sample took longer than the hash)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=48).digest()
    return (np.frombuffer(digest, dtype="<u8") >> 11) * 2.0 ** -53  # the top 53 bits of each word


# photo_uniforms(...)[i]: what each uniform draws (fixed, so an option never shifts another's)
RRC_TRIES = 10               # torchvision's RandomResizedCrop: 10 tries, then a center crop
U_RRC = slice(0, 20)         # (area, log-ratio) per try
U_RRC_POS = slice(20, 22)    # top, left of the chosen box
U_SATURATION = 22
U_AUTO = slice(23, 27)       # (op, magnitude bin or sign) for up to two ops
U_ERASE = 27                 # erase or not
U_ERASE_BOX = slice(28, 48)  # (area, log-ratio) per try
U_ERASE_POS = slice(48, 50)
U_ERASE_NOISE = 50           # seed of the noise
OPS_UNIFORMS = 128           # data.augment.ops: 4 per op or one-of group (imgcls.augment_ops)
U_OPS = slice(51, 51 + OPS_UNIFORMS)  # last: shake_128 is an XOF, so the earlier draws are unchanged
PHOTO_UNIFORMS = 51 + OPS_UNIFORMS


def photo_uniforms(seed: int, epoch: int, key: str) -> np.ndarray:
    """PHOTO_UNIFORMS more uniforms in [0, 1) from (seed, epoch, key), independent of the six
    of `sample_uniforms` (one shake_128 call)."""
    digest = hashlib.shake_128(f"photo:{seed}:{epoch}:{key}".encode()).digest(8 * PHOTO_UNIFORMS)
    return (np.frombuffer(digest, dtype="<u8") >> 11) * 2.0 ** -53


def draw_params(cfg: AugmentConfig, seed: int, epoch: int, keys: list[str], pad: int | None = None) -> np.ndarray:
    """One row per sample: dx, dy, flip, angle, brightness, contrast, saturation. `pad`
    overrides cfg.pad (0: no shift)."""
    if not keys:
        return np.zeros((0, 7))
    pad = cfg.pad if pad is None else pad
    # always six draws, so turning one option off leaves the others unchanged
    u = np.stack([sample_uniforms(seed, epoch, key) for key in keys])
    saturation = np.ones(len(keys))
    if cfg.saturation:
        v = np.array([photo_uniforms(seed, epoch, key)[U_SATURATION] for key in keys])
        saturation = 1 + (2 * v - 1) * cfg.saturation
    return np.stack([
        np.floor(u[:, 0] * (2 * pad + 1)) - pad,
        np.floor(u[:, 1] * (2 * pad + 1)) - pad,
        (u[:, 2] < 0.5) & cfg.flip,
        (2 * u[:, 3] - 1) * cfg.rotate_deg,
        1 + (2 * u[:, 4] - 1) * cfg.brightness,
        1 + (2 * u[:, 5] - 1) * cfg.contrast,
        saturation,
    ], axis=1)


def crop_flip(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """The worker's half: images uint8 [B,C,H,W], shifted (zero fill) and flipped by `params`."""
    if not params[:, :3].any():
        return images
    return _shift_flip(images, params[:, 0].astype(np.int64), params[:, 1].astype(np.int64), params[:, 2] > 0)


def photometric(params: np.ndarray) -> torch.Tensor | None:
    """The device's half of `params`: [B, 4] float32 (angle, brightness, contrast,
    saturation), or None when they change nothing."""
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
    """images float [B,C,H,W] in [0,1]; params [B, 4]: angle, brightness, contrast, saturation."""
    angle, bright, contrast, saturation = params.to(images.dtype).unbind(1)
    if angle.any():
        images = _rotate(images, angle)
    if (bright != 1).any() or (contrast != 1).any():
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast.view(-1, 1, 1, 1) + mean) * bright.view(-1, 1, 1, 1)
        images = images.clamp_(0, 1)
    if images.shape[1] == 3 and (saturation != 1).any():
        # torchvision's adjust_saturation: blend with the ITU-R 601 grey image
        weights = images.new_tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (images * weights).sum(dim=1, keepdim=True)
        images = ((images - grey) * saturation.view(-1, 1, 1, 1) + grey).clamp_(0, 1)
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


# ---- photos: per-sample geometry on uint8 CHW tensors, in the loader worker -------------
def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CHW uint8 -> CHW uint8 of `size` (h, w), bilinear with antialias: torch's uint8
    channels-last kernel, ~5x PIL's resize here and within 1 (2 when upscaling) of
    torchvision's PIL path."""
    x = image[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True)[0]


def eval_resize_crop(image: torch.Tensor, size: int, crop_pct: float) -> torch.Tensor:
    """timm's evaluation transform on a CHW uint8 image: the shorter side resized to
    floor(size / crop_pct) (the longer in proportion, truncated, as torchvision's Resize),
    then the center size x size. One function for the reader's evaluation, predict, serve
    and export checks."""
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    short = math.floor(size / crop_pct)
    new = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    if new != (height, width):
        image = resize_uint8(image, new)
    return TF.center_crop(image, [size, size])


def _box_sides(area: float, a: float, r: float, scale, log_ratio) -> tuple[int, int]:
    """torchvision's random box (RandomResizedCrop, RandomErasing): an area drawn from `scale`
    (by `a`) and an aspect ratio log-uniform in `log_ratio` (by `r`); returns
    (round(sqrt(area * aspect)), round(sqrt(area / aspect)))."""
    target = area * (scale[0] + a * (scale[1] - scale[0]))
    aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
    return int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))


def resized_crop_box(height: int, width: int, u: np.ndarray, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop.get_params, with its randomness
    taken from `u` (photo_uniforms): 10 tries at an area and aspect ratio, then the whole
    image clipped to the ratio range, centred."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    tries = u[U_RRC].reshape(RRC_TRIES, 2)
    for a, r in tries:
        w, h = _box_sides(area, a, r, scale, log_ratio)  # the ratio is width / height
        if 0 < w <= width and 0 < h <= height:
            top, left = u[U_RRC_POS]
            return int(top * (height - h + 1)), int(left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jpeg_scale(height: int, width: int, box_h: int, box_w: int, size: int) -> int:
    """The largest of 8, 4, 2 by which a JPEG can be downscaled in the DCT domain (while
    decoding) with the box still at least `size` pixels a side; 1 when none."""
    return next((k for k in (8, 4, 2) if min(box_h, box_w) >= k * size), 1)


class PhotoTransform:
    """Training geometry of one photo: RandomResizedCrop to `size` (bilinear, antialiased),
    flip, TrivialAugmentWide or RandAugment, random erasing; every parameter from
    sample_uniforms and photo_uniforms of (seed, epoch, key).

    The box is drawn on the full-size image (`full` = (width, height) from the header) and
    scaled to the decoded one, which may be smaller (a JPEG decoded at 1/jpeg_scale): the
    parameters never depend on how the image was decoded."""

    def __init__(self, cfg: AugmentConfig, size: int, seed: int):
        from imgcls.augment_ops import Pipeline

        self.cfg, self.size, self.seed = cfg, size, seed
        self.auto = _auto_augment(cfg.auto_augment)
        self.ops = Pipeline(cfg.ops)
        if self.ops.slots > OPS_UNIFORMS:
            raise ValueError(f"data.augment.ops: {self.ops.slots // 4} ops and groups; at most {OPS_UNIFORMS // 4}")

    def uniforms(self, epoch: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        return sample_uniforms(self.seed, epoch, key), photo_uniforms(self.seed, epoch, key)

    def box(self, full: tuple[int, int], v: np.ndarray) -> tuple[int, int, int, int]:
        """(top, left, h, w) on the full-size image."""
        return resized_crop_box(full[1], full[0], v, self.cfg.scale, self.cfg.ratio)

    def apply(self, image: np.ndarray, full: tuple[int, int], box, u: np.ndarray, v: np.ndarray) -> torch.Tensor:
        """image: the decoded HWC uint8 array -> CHW uint8 tensor of size x size."""
        x = torch.from_numpy(image).permute(2, 0, 1)
        sy, sx = x.shape[1] / full[1], x.shape[2] / full[0]  # 1 unless decoded downscaled
        top, left, h, w = box
        x = x[:, round(top * sy):max(round((top + h) * sy), round(top * sy) + 1),
              round(left * sx):max(round((left + w) * sx), round(left * sx) + 1)]
        x = resize_uint8(x, (self.size, self.size))
        if self.cfg.flip and u[2] < 0.5:
            x = x.flip(-1)
        return self.extras(x, v)

    @property
    def has_extras(self) -> bool:
        return self.auto is not None or self.cfg.erasing > 0 or bool(self.ops)

    def extras(self, x: torch.Tensor, v: np.ndarray) -> torch.Tensor:
        """TrivialAugmentWide/RandAugment, data.augment.ops and random erasing of one CHW uint8
        image (also applied per sample to fixed-size batches after their pad crop)."""
        if self.auto is not None:
            x = self.auto(x, v)
        if self.ops:
            x = self.ops(x, v[U_OPS])
        if self.cfg.erasing and v[U_ERASE] < self.cfg.erasing:
            x = _erase(x, v)
        return x


def _auto_augment(name: str):
    """fn(CHW uint8 tensor, photo uniforms) -> tensor applying TrivialAugmentWide (one op, a
    random magnitude bin) or RandAugment (two ops, magnitude 9 of 31) through torchvision's
    own op table and op implementation, the choices drawn from the uniforms, not torch's RNG."""
    if not name:
        return None
    from torchvision.transforms import v2

    if name == "trivial":
        policy, ops, magnitude_bin = v2.TrivialAugmentWide(), 1, None
    elif name == "randaugment":
        policy = v2.RandAugment()
        ops, magnitude_bin = policy.num_ops, policy.magnitude
    else:
        raise ValueError(f"data.augment.auto_augment={name!r}: expected '', trivial or randaugment")
    space = list(policy._AUGMENTATION_SPACE.items())
    bins = policy.num_magnitude_bins

    def apply(image: torch.Tensor, v: np.ndarray) -> torch.Tensor:
        for op_u, mag_u in v[U_AUTO].reshape(2, 2)[:ops]:
            op, (magnitudes_fn, signed) = space[int(op_u * len(space))]
            magnitudes = magnitudes_fn(bins, image.shape[-2], image.shape[-1])
            magnitude = 0.0
            if magnitudes is not None:
                # one uniform: its integer part over `bins` is the bin, its fraction the sign
                index = magnitude_bin if magnitude_bin is not None else int(mag_u * bins)
                magnitude = float(magnitudes[index])
                if signed and (mag_u * bins) % 1 < 0.5:
                    magnitude = -magnitude
            image = policy._apply_image_or_video_transform(image, op, magnitude,
                                                           interpolation=policy.interpolation, fill=policy._fill)
        return image

    return apply


def _erase(image: torch.Tensor, v: np.ndarray, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """torchvision's RandomErasing box (10 tries, else nothing) on CHW uint8, filled with
    uniform noise (torchvision's value="random" draws it after normalisation)."""
    channels, height, width = image.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for a, r in v[U_ERASE_BOX].reshape(10, 2):
        h, w = _box_sides(height * width, a, r, scale, log_ratio)  # the ratio is height / width
        if h < height and w < width:
            top, left = (int(p * (n + 1)) for p, n in zip(v[U_ERASE_POS], (height - h, width - w)))
            noise = np.random.default_rng(int(v[U_ERASE_NOISE] * 2 ** 53))
            image = image.clone()
            image[:, top:top + h, left:left + w] = torch.from_numpy(
                noise.integers(0, 256, (channels, h, w), dtype=np.uint8))
            return image
    return image
