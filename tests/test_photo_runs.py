"""A folder of photos of different sizes, end to end: built into moto's S3 without --resize,
trained under a 2-process torchrun from there at 32 px, stopped and resumed exactly, then
evaluated and predicted on the original files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardio import storage
from tests.conftest import (PHOTO_RUN, REPO, assert_same_weights, build_photo_folder, final_state,
                            torchrun)


@pytest.fixture(scope="module")
def photos(s3_bucket, tmp_path_factory):
    folder = build_photo_folder(tmp_path_factory.mktemp("photos"), per_class=20, classes=4)
    url = f"{s3_bucket}/photos"
    subprocess.run([sys.executable, "-m", "shards", "build", str(folder), url, "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    return folder, url, json.loads(storage.read_bytes(f"{url}/manifest.json"))


@pytest.fixture(scope="module")
def straight(photos, tmp_path_factory):
    _, url, _ = photos
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    torchrun([f"data.url={url}", f"run.dir={run_dir}", *PHOTO_RUN])
    return run_dir


def test_a_photo_folder_builds_as_it_is(photos):
    folder, _, manifest = photos
    assert manifest["encoding"] == "source" and manifest["image"]["height"] is None
    assert manifest["image"]["channels"] == 3 and len(manifest["stats"]["mean"]) == 3
    sizes = {tuple(size) for split in manifest["splits"].values() for shard in split["shards"] for size in shard["sizes"]}
    assert len(sizes) > 20  # the images kept their own sizes
    assert sum(split["count"] for split in manifest["splits"].values()) == len(list(folder.rglob("*.*")))


def test_trained_from_s3_stopped_and_resumed_it_ends_with_the_same_weights(photos, straight, tmp_path):
    _, url, _ = photos
    stopped = tmp_path / "stopped"
    torchrun([f"data.url={url}", f"run.dir={stopped}", *PHOTO_RUN, "train.max_steps=3"])
    assert final_state(stopped)["progress"]["step"] == 3
    torchrun([f"data.url={url}", f"run.dir={stopped}", *PHOTO_RUN])
    assert_same_weights(final_state(stopped)["model"], final_state(straight)["model"])


def test_evaluate_and_predict_read_the_photos_as_the_training_did(photos, straight, tmp_path):
    folder, _, manifest = photos
    best = straight / "checkpoints" / "best.pt"
    out = subprocess.run([sys.executable, "jobs/evaluate.py", str(best), "--split", "test"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["count"] == manifest["splits"]["test"]["count"] and 0 <= summary["balanced_acc"] <= 1

    files = sorted(folder.rglob("*.*"))[:: len(list(folder.rglob("*.*"))) // 5][:5]  # some of each format
    predictions = tmp_path / "predictions.json"
    out = subprocess.run([sys.executable, "jobs/predict.py", str(best), *map(str, files), "--top-k", "2",
                          "--output", str(predictions)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(predictions.read_text())["predictions"]
    assert len(rows) == len(files) and {f.suffix for f in files} >= {".jpg", ".png"}
    assert all(len(row["top_k"]) == 2 and row["top_k"][0]["class"] in manifest["classes"] for row in rows), rows
