"""data.augment.ops: each op does what its name says, one-of groups pick one op by weight,
bad specs are one-line errors naming the entry, and the draws come from (seed, epoch, key) so a
reader restarted mid-epoch, on another number of workers, yields the same augmented batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcls.augment import U_OPS, PhotoTransform, photo_uniforms
from imgcls.augment_ops import OPS, Pipeline
from imgcls.config import AugmentConfig, DataConfig
from imgcls.data import DataError, ShardReader

RNG = np.random.default_rng(0)
IMAGE = torch.from_numpy(RNG.integers(0, 256, (3, 16, 16), dtype=np.uint8))


def run(spec, image=IMAGE, key="k", epoch=0, seed=0):
    return Pipeline(spec)(image, photo_uniforms(seed, epoch, key)[U_OPS])


@pytest.mark.parametrize("op, expected", [
    ("vflip", lambda x: x.flip(-2)), ("hflip", lambda x: x.flip(-1)), ("transpose", lambda x: x.transpose(-2, -1))])
def test_exact_ops_are_indexing(op, expected):
    assert torch.equal(run([{"op": op, "p": 1}]), expected(IMAGE))
    assert torch.equal(run([{"op": op, "p": 0}]), IMAGE)


def test_rotate90_turns_by_a_quarter_half_or_three_quarters():
    turns = set()
    for key in map(str, range(30)):
        out = run([{"op": "rotate90", "p": 1}], key=key)
        turns.add(next(k for k in (1, 2, 3) if torch.equal(out, torch.rot90(IMAGE, k, (-2, -1)))))
    assert turns == {1, 2, 3}


def test_translate_shifts_with_zero_fill_and_zoom_out_shrinks_onto_zeros():
    ones = torch.full((1, 20, 20), 200, dtype=torch.uint8)
    shifted = [run([{"op": "translate", "frac": 0.2, "p": 1}], ones, key=str(k)) for k in range(10)]
    assert all(int((s == 0).sum()) > 0 for s in shifted) and all(set(s.unique().tolist()) <= {0, 200} for s in shifted)
    assert len({int((s == 0).sum()) for s in shifted}) > 1  # the shift is drawn per sample
    zoomed = run([{"op": "zoom_out", "scale": [2.0, 2.0], "p": 1}], ones)
    assert int((zoomed == 200).sum()) == 100 and int((zoomed == 0).sum()) == 300  # a 10x10 image on a 20x20 canvas


@pytest.mark.parametrize("op", ["gauss_blur", "blur", "median_blur", "motion_blur"])
def test_blurs_spread_or_remove_an_impulse_and_keep_a_flat_image(op):
    flat = torch.full((3, 16, 16), 77, dtype=torch.uint8)
    impulse = flat.clone()
    impulse[:, 8, 8] = 255
    spec = [{"op": op, "p": 1}]
    out = run(spec, impulse)
    assert out.max() < 255 and out.float().sum() >= flat.float().sum()
    assert (out[:, 8, 8] == 77).all() if op == "median_blur" else (out > 77).sum() > 3
    assert torch.equal(run(spec, flat), flat)


def test_gauss_noise_has_the_drawn_std_and_is_fixed_by_the_key():
    grey = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    spec = [{"op": "gauss_noise", "std": [0.1, 0.1], "p": 1}]
    noisy = run(spec, grey)
    assert (noisy.float() - 128).std().item() == pytest.approx(25.5, rel=0.05)
    assert torch.equal(noisy, run(spec, grey)) and not torch.equal(noisy, run(spec, grey, epoch=1))


def test_one_of_applies_exactly_one_op_weighted_by_p():
    spec = [{"one_of": [{"op": "vflip", "p": 0.75}, {"op": "hflip", "p": 0.25}], "p": 1}]
    picks = []
    for key in map(str, range(400)):
        out = run(spec, key=key)
        picks.append("v" if torch.equal(out, IMAGE.flip(-2)) else "h" if torch.equal(out, IMAGE.flip(-1)) else "?")
    assert "?" not in picks and 0.65 < picks.count("v") / 400 < 0.85


@pytest.mark.parametrize("spec, match", [
    ([{"op": "blurr"}], r"data.augment.ops\[0\].op='blurr': expected one of hflip"),
    ([{"op": "vflip"}, {"op": "blur", "sigma": 1}], r"data.augment.ops\[1\]: blur takes p, size, not sigma"),
    ([{"one_of": [{"op": "vflip", "p": 2}]}], r"ops\[0\].one_of\[0\].p=2: expected a probability"),
    ([{"op": "vflip"}] * 40, "40 ops and groups; at most 32"),
])
def test_bad_specs_are_one_line_errors_naming_the_entry(spec, match):
    with pytest.raises(ValueError, match=match):
        PhotoTransform(AugmentConfig(ops=spec), 0, 0)


def test_rotate90_on_non_square_data_is_refused_at_start(tmp_path):
    import shards

    src = tmp_path / "wide.npz"
    np.savez(src, images=np.zeros((40, 8, 12, 1), np.uint8), labels=np.arange(40) % 2)
    shards.build(str(src), str(tmp_path / "wide"), shard_samples=20, progress=False, workers=1)
    cfg = DataConfig(url=str(tmp_path / "wide"), augment=AugmentConfig(ops=[{"op": "rotate90"}]))
    with pytest.raises(DataError, match="rotate90 need square images, not 8x12"):
        ShardReader(cfg, "train")


ALL_OPS = [{"op": "vflip"}, {"op": "rotate90"}, {"op": "translate", "frac": 0.2},
           {"one_of": [{"op": "gauss_blur"}, {"op": "median_blur"}, {"op": "motion_blur"}, {"op": "blur"}], "p": 0.7},
           {"op": "gauss_noise"}, {"op": "zoom_out"}, {"op": "transpose"}]


def test_every_op_resumes_exactly_mid_epoch(bands_dataset):
    """(The 200-sample test split, read as training data.) A reader restarted at batch 4 yields the
    uninterrupted epoch's batches, and a reader on another worker count gives every sample the same
    augmented image."""
    assert {o.get("op") for o in ALL_OPS} | {"gauss_blur", "median_blur", "motion_blur", "blur", "hflip"} >= set(OPS)

    def epoch_one(workers, position=0, ops=ALL_OPS):
        cfg = DataConfig(url=bands_dataset, batch_size=20, num_workers=workers,
                         augment=AugmentConfig(crop="pad", ops=ops))
        reader = ShardReader(cfg, "test", seed=3)
        reader.set_epoch(1, position)
        return [(b["key"], b["image"]) for b in reader.loader()]

    whole = epoch_one(0)
    rest = epoch_one(0, 4)
    assert len(rest) == len(whole) - 4 and all(torch.equal(a[1], b[1]) for a, b in zip(whole[4:], rest))
    by_key = {k: im for keys, images in whole for k, im in zip(keys, images)}
    other = epoch_one(2, 2)
    assert all(torch.equal(by_key[k], im) for keys, images in other for k, im in zip(keys, images))
    plain = epoch_one(0, 9, ops=[])
    assert not torch.equal(plain[0][1], whole[9][1])
