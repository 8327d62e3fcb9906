"""`data.augment.ops`: an ordered list of the tutorials' augmentations, composed the way
Albumentations' `A.Compose` and `A.OneOf` compose them, e.g.

    ops:
      - {op: vflip, p: 0.5}
      - {op: rotate90, p: 0.5}
      - {one_of: [{op: gauss_blur, sigma: [0.5, 1.5]}, {op: median_blur, size: 5},
                  {op: motion_blur, size: 7}], p: 0.3}
      - {op: gauss_noise, std: [0.02, 0.08], p: 0.3}
      - {op: zoom_out, scale: [1.0, 1.3], p: 0.5}

Every op has a probability `p` (default 0.5); a one-of group applies with its own `p` one of
its ops, chosen with weights in proportion to their `p` (as A.OneOf). They run per sample in
the loader worker on CHW uint8 images (after the crop, flip and auto-augment, before erasing),
where the exact integer ops (flips, rotate90, transpose, translate) are indexing, the blurs
are PIL's C filters, and `bench/loader.py --ops` shows what each costs per image (a 224 px
photo: a blur or the noise a few ms, median_blur the most). Every draw comes from the sample's photo uniforms of
(seed, epoch, key): each op owns a fixed slot of them, so a resumed run sees the same images.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

SLOT = 4  # uniforms per op: [apply?, three for its parameters]


def _odd_size(u: float, limit: int) -> int:
    """An odd kernel size in [3, limit], uniform over them (A.Blur's blur_limit)."""
    sizes = list(range(3, max(3, limit) + 1, 2))
    return sizes[min(int(u * len(sizes)), len(sizes) - 1)]


def _between(u: float, bounds) -> float:
    low, high = bounds
    return low + u * (high - low)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """One 2-d kernel over every channel of CHW uint8, reflect-padded (OpenCV's default border)."""
    k = kernel.shape[-1]
    c = x.shape[0]
    padded = F.pad(x[None].float(), (k // 2,) * 4, mode="reflect")
    return _to_uint8(F.conv2d(padded, kernel.expand(c, 1, k, k), groups=c)[0])


def _pil_filter(x: torch.Tensor, image_filter) -> torch.Tensor:
    """A PIL ImageFilter over CHW uint8: PIL's C filters are ~50x an unfold-and-median here."""
    from PIL import Image

    channels = [x.permute(1, 2, 0).cpu().numpy()] if x.shape[0] == 3 else [c.cpu().numpy() for c in x]
    out = [np.array(Image.fromarray(np.ascontiguousarray(c)).filter(image_filter)) for c in channels]
    if x.shape[0] == 3:
        return torch.from_numpy(out[0]).permute(2, 0, 1).contiguous()
    return torch.from_numpy(np.stack(out))


def vflip(x, w):
    return x.flip(-2)


def hflip(x, w):
    return x.flip(-1)


def rotate90(x, w):
    """A quarter, half or three-quarter turn (A.RandomRotate90 without the no-op turn)."""
    return torch.rot90(x, 1 + min(int(w[1] * 3), 2), (-2, -1))


def transpose(x, w):
    return x.transpose(-2, -1)


def translate(x, w, frac: float = 0.1):
    """Keras' width/height shift: up to `frac` of each side, zero fill."""
    h, wd = x.shape[-2:]
    dy, dx = (round((2 * u - 1) * frac * n) for u, n in ((w[1], h), (w[2], wd)))
    out = torch.zeros_like(x)
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):wd + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):wd + min(-dx, 0)]
    return out


def zoom_out(x, w, scale=(1.0, 1.5)):
    """Keras' zoom with a factor above 1: the image shrunk by a factor in `scale`, placed at a
    random position on a zero canvas of its own size."""
    from imgcls.augment import resize_uint8

    h, wd = x.shape[-2:]
    s = _between(w[1], scale)
    nh, nw = max(1, round(h / s)), max(1, round(wd / s))
    if (nh, nw) == (h, wd):
        return x
    top, left = int(w[2] * (h - nh + 1)), int(w[3] * (wd - nw + 1))
    out = torch.zeros_like(x)
    out[:, top:top + nh, left:left + nw] = resize_uint8(x, (nh, nw))
    return out


def gauss_noise(x, w, std=(0.01, 0.05)):
    """Additive Gaussian noise, its std drawn from `std` (in units of the 0-255 range)."""
    sigma = _between(w[1], std) * 255
    noise = torch.from_numpy(np.random.default_rng(int(w[2] * 2 ** 53)).standard_normal(x.shape, np.float32))
    return _to_uint8(x.float() + noise * sigma)


def gauss_blur(x, w, sigma=(0.1, 2.0)):
    """A Gaussian blur, sigma drawn from `sigma` px (PIL's GaussianBlur: three box passes)."""
    from PIL import ImageFilter

    return _pil_filter(x, ImageFilter.GaussianBlur(float(_between(w[1], sigma))))


def blur(x, w, size: int = 7):
    """A box blur (A.Blur), its odd size drawn from [3, size]."""
    from PIL import ImageFilter

    return _pil_filter(x, ImageFilter.BoxBlur(_odd_size(w[1], size) // 2))


def median_blur(x, w, size: int = 5):
    """A median filter (A.MedianBlur), its odd size drawn from [3, size]."""
    from PIL import ImageFilter

    return _pil_filter(x, ImageFilter.MedianFilter(_odd_size(w[1], size)))


def motion_blur(x, w, size: int = 7):
    """A motion blur (A.MotionBlur): a line of odd length from [3, size] through the centre at a
    random angle, averaged along."""
    k = _odd_size(w[1], size)
    angle = w[2] * math.pi
    t = torch.linspace(-(k // 2), k // 2, 4 * k)
    kernel = torch.zeros(k, k)
    rows = (k // 2 + t * math.sin(angle)).round().long().clamp(0, k - 1)
    cols = (k // 2 + t * math.cos(angle)).round().long().clamp(0, k - 1)
    kernel[rows, cols] = 1.0
    return _filter(x, kernel / kernel.sum())


OPS: dict[str, Callable] = {f.__name__: f for f in (
    hflip, vflip, rotate90, transpose, translate, zoom_out, gauss_noise, gauss_blur, blur, median_blur, motion_blur)}
SQUARE_ONLY = ("rotate90", "transpose")  # they swap height and width


class Pipeline:
    """The ops of data.augment.ops as one function of (CHW uint8 image, uniforms)."""

    def __init__(self, spec: list, where: str = "data.augment.ops"):
        self.steps, self.slots, self.names = [], 0, set()
        for i, entry in enumerate(spec):
            self.steps.append(self._parse(entry, f"{where}[{i}]"))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def _parse(self, entry, where: str):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping such as {{op: vflip, p: 0.5}}, got {entry!r}")
        entry = dict(entry)
        p = entry.pop("p", 0.5)
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"{where}.p={p!r}: expected a probability in [0, 1]")
        slot, self.slots = self.slots, self.slots + SLOT
        if "one_of" in entry:
            choices = entry.pop("one_of")
            if entry or not (isinstance(choices, list) and choices):
                raise ValueError(f"{where}: a one_of group takes a non-empty list of ops and p only")
            options = [self._parse(c, f"{where}.one_of[{j}]") for j, c in enumerate(choices)]
            weights = np.cumsum([o[1] for o in options])
            if weights[-1] <= 0:
                raise ValueError(f"{where}: every op of the one_of group has p=0")
            return ("one_of", p, slot, options, weights / weights[-1])
        name = entry.pop("op", None)
        if name not in OPS:
            raise ValueError(f"{where}.op={name!r}: expected one of {', '.join(OPS)}")
        fn = OPS[name]
        known = fn.__code__.co_varnames[2:fn.__code__.co_argcount]
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise ValueError(f"{where}: {name} takes {', '.join(('p', *known))}, not {', '.join(unknown)}")
        self.names.add(name)
        return ("op", p, slot, fn, entry)

    def check_shape(self, height: int, width: int) -> None:
        square_only = self.names & set(SQUARE_ONLY)
        if square_only and height != width:
            raise ValueError(f"data.augment.ops: {', '.join(sorted(square_only))} need square images, "
                             f"not {height}x{width} (set data.image_size)")

    def __call__(self, x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
        for step in self.steps:
            x = self._run(step, x, w, forced=False)
        return x

    def _run(self, step, x, w, forced: bool):
        kind, p, slot, *rest = step
        u = w[slot:slot + SLOT]
        if not forced and u[0] >= p:
            return x
        if kind == "op":
            fn, params = rest
            return fn(x, u, **params)
        options, cumulative = rest
        choice = min(int(np.searchsorted(cumulative, u[1], side="right")), len(options) - 1)
        return self._run(options[choice], x, w, forced=True)
