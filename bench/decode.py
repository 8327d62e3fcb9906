"""JPEG decode + RandomResizedCrop 224 speed, one process, four ways, on real-photo crops.

    .venv/bin/python bench/decode.py --count 1000 --reps 3

The crops (`write_photo_crops`, also used by bench/loader.py's 224 px table) are cut from the
real photographs on this machine: scikit-image's data folder (astronaut, coffee, chelsea,
rocket, motorcycle, retina, hubble, ihc) and gnome-backgrounds' wood photos, ~500x375 (long
side 400-500, 4:3 or 3:4), JPEG quality 90, one class folder per source photograph.

Each method gets the same bytes and the same crop boxes (imgcls.augment.resized_crop_box from
photo_uniforms of (seed 0, epoch 0, file name)) and returns a 224x224 uint8 image:
(0) PIL decode, PIL crop + resize (torchvision's RandomResizedCrop on PIL images);
(1) PIL full decode, then imgcls.augment.resize_uint8 (torch's uint8 antialiased bilinear);
(2) PIL with draft: DCT-domain downscale by 1/2, 1/4 or 1/8 when the box allows, then (1)'s resize;
(3) simplejpeg.decode_jpeg(min_height, min_width): libjpeg-turbo's smallest M/8 scale that
    keeps the box >= 224, then (1)'s resize;
(4) PyTurboJPEG 1.x decode(scaling_factor), likewise (PyTurboJPEG 2 needs libjpeg-turbo 3;
    Debian 12 has 2.1);
(5) shardio.image.Encoded: the header by simplejpeg, the decode by simplejpeg downscaled only
    by 1/2, 1/4, 1/8 (M/8 scales with other M measured slower than a full decode here), then
    (1)'s resize: the reader's path. Methods (0)-(4) get the size from the caller for free.
Reps are interleaved (1, 2, 3, 4, 1, 2, ...); images/s is mean ± std over reps.
"""
from __future__ import annotations

import argparse
import glob
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

WOOD_PHOTOS = "/usr/share/backgrounds/gnome/wood-*.webp"  # Debian's gnome-backgrounds
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png")


def photo_sources() -> list[Path]:
    """The real photographs found on this machine (see the module docstring)."""
    found = [Path(p) for p in sorted(glob.glob(WOOD_PHOTOS))]
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        found += [data / name for name in SKIMAGE_PHOTOS if (data / name).exists()]
    except ImportError:
        pass
    if not found:
        sys.exit("no real photographs found: pip install scikit-image, or apt-get install gnome-backgrounds")
    return found


def write_photo_crops(root: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEG crops (quality 90, ~500x375) of the real photographs, root/<source>/<n>.jpg."""
    rng = np.random.default_rng(seed)
    paths, written = photo_sources(), []
    sources, names = [Image.open(p).convert("RGB") for p in paths], [p.stem for p in paths]
    for n in range(count):
        i = n % len(sources)
        image = sources[i]
        long_side = int(rng.integers(400, 501))
        size = (long_side, long_side * 3 // 4) if rng.random() < 0.75 else (long_side * 3 // 4, long_side)
        aspect = size[0] / size[1]
        # a box of that aspect, 30-100% of the largest that fits, anywhere in the photograph
        fit_w = min(image.width, image.height * aspect)
        w = fit_w * rng.uniform(0.3, 1.0) if max(image.size) > 1000 else fit_w * rng.uniform(0.7, 1.0)
        h = w / aspect
        left, top = rng.uniform(0, image.width - w), rng.uniform(0, image.height - h)
        crop = image.resize(size, Image.BICUBIC, box=(left, top, left + w, top + h))
        path = root / names[i] / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
        written.append(path)
    return written


# ---- the four decoders: (bytes, full (w, h), box (top, left, h, w)) -> 224x224x3 uint8 ----
SIZE = 224


def _resize(array: np.ndarray, full, box):
    """imgcls's crop + resize (PhotoTransform.apply without flip and the rest)."""
    from imgcls.augment import resize_uint8

    top, left, h, w = box
    sy, sx = array.shape[0] / full[1], array.shape[1] / full[0]
    x = torch.from_numpy(array).permute(2, 0, 1)
    return resize_uint8(x[:, round(top * sy):round((top + h) * sy), round(left * sx):round((left + w) * sx)],
                        (SIZE, SIZE))


def pil_pil(data, full, box):
    top, left, h, w = box
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR))


def pil_full(data, full, box):
    return _resize(np.array(Image.open(io.BytesIO(data)).convert("RGB")), full, box)


def pil_draft(data, full, box):
    from imgcls.augment import jpeg_scale
    from shardio.image import image_array

    image = Image.open(io.BytesIO(data))
    scale = jpeg_scale(full[1], full[0], box[2], box[3], SIZE)
    if scale > 1:
        image.draft("RGB", (full[0] // scale, full[1] // scale))
    return _resize(image_array(image, "RGB"), full, box)


def imgcls_decode(data, full, box):
    from imgcls.augment import jpeg_scale
    from shardio.image import Encoded

    image = Encoded(data)  # the header, as the reader reads it
    scale = jpeg_scale(image.size[1], image.size[0], box[2], box[3], SIZE)
    return _resize(image.array("RGB", scale), image.size, box)


def simplejpeg_scaled(data, full, box):
    import simplejpeg

    need = SIZE / min(box[2], box[3])  # the scale the box needs
    array = simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(full[1] * need),
                                   min_width=math.ceil(full[0] * need))
    return _resize(array, full, box)


_turbo = None


def turbojpeg_scaled(data, full, box):
    global _turbo
    from turbojpeg import TJPF_RGB, TurboJPEG

    _turbo = _turbo or TurboJPEG()
    need = SIZE / min(box[2], box[3])
    factor = min((f for f in _turbo.scaling_factors if f[0] / f[1] >= need and f[0] <= f[1]),
                 key=lambda f: f[0] / f[1], default=(1, 1))
    array = _turbo.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor)
    return _resize(array, full, box)


METHODS = {"PIL decode + PIL crop/resize (torchvision)": pil_pil, "PIL full decode": pil_full,
           "PIL draft 1/2^k": pil_draft,
           "simplejpeg min_height/width": simplejpeg_scaled, "PyTurboJPEG scaling_factor": turbojpeg_scaled,
           "imgcls: simplejpeg at 1/2^k (Encoded)": imgcls_decode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-decode-crops"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker's share
    from imgcls.augment import photo_uniforms, resized_crop_box

    paths = sorted(args.workdir.rglob("*.jpg"))
    if len(paths) < args.count:
        paths = write_photo_crops(args.workdir, args.count)
    paths = paths[:args.count]
    items = []
    for path in paths:
        data = path.read_bytes()
        full = Image.open(io.BytesIO(data)).size
        box = resized_crop_box(full[1], full[0], photo_uniforms(0, 0, path.name), (0.08, 1.0), (3 / 4, 4 / 3))
        items.append((data, full, box))
    rates = {name: [] for name in METHODS}
    for rep in range(args.reps + 1):  # rep 0: warm-up
        for name, fn in METHODS.items():
            start = time.perf_counter()
            for item in items:
                fn(*item)
            if rep:
                rates[name].append(len(items) / (time.perf_counter() - start))
    load = os.getloadavg()[0]
    mean_kb = statistics.fmean(len(d) for d, _, _ in items) / 1024
    print(f"JPEG decode + RandomResizedCrop(224) in one process: {len(items)} real-photo crops "
          f"(~500x375, q90, {mean_kb:.0f} KiB mean), {args.reps} reps after a warm-up, interleaved; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print("\n| method | images/s (mean ± std) | vs (0) |\n|---|---:|---:|")
    ref = statistics.fmean(rates["PIL decode + PIL crop/resize (torchvision)"])
    for name, values in rates.items():
        mu, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {mu:,.0f} ± {sd:,.0f} | {mu / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
