"""Multi-label data as users bring it: a label file whose `labels` column names several classes
per image (the multi-label Kaggle layout), built into shards with `task: multilabel`, indexed,
and run end to end from moto S3 under 2-process torchrun (shards/sources.py, shards/writer.py)."""
from __future__ import annotations

import json

import numpy as np

import shards
from shardio.format import read_tar
from shardio.storage import join, read_bytes
from tests.conftest import write_image_tree, write_multilabel_label_file
from tests.test_shards_layouts import one_line_error

NAMES = ("top", "upper", "lower", "bottom")  # write_multilabel_label_file's bands, top down


def cls_by_key(dest: str, manifest: dict) -> dict[str, str]:
    return {s["__key__"]: s["cls"].decode() for split in manifest["splits"].values() for shard in split["shards"]
            for s in read_tar(read_bytes(join(dest, shard["path"])))}


def test_a_labels_column_builds_multi_label_shards(tmp_path):
    label_file = write_multilabel_label_file(tmp_path / "kaggle", n=60)
    m = shards.build(label_file, tmp_path / "out", shard_samples=16, encoding="source", progress=False, workers=1)
    assert m["task"] == "multilabel" and m["classes"] == sorted(NAMES)
    rows = dict(line.split(",") for line in label_file.read_text().splitlines()[1:])
    stored = cls_by_key(str(tmp_path / "out"), m)
    assert len(stored) == 60
    positives = np.zeros(4, np.int64)
    for path, names in rows.items():  # every .cls lists the row's classes, as indices
        indices = [int(i) for i in stored[path[:-4]].split()]
        assert [m["classes"][i] for i in indices] == sorted(names.split(), key=m["classes"].index)
        positives[indices] += 1
    assert (positives > 0).all() and any(" " in c for c in stored.values()) and "" in stored.values()
    assert np.sum([m["splits"][s]["class_counts"] for s in m["splits"]], axis=0).tolist() == positives.tolist()
    assert sum(e["class_counts"][0] for e in m["splits"]["train"]["shards"]) == m["splits"]["train"]["class_counts"][0]
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == m["splits"]["train"]["count"]
    assert shards.verify(str(tmp_path / "out"), deep=True) == []  # the counts are of positives

    # `shards index` of the same tars tells they are multi-label and agrees with the build,
    # and writes timm's _info.json as build does
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "_info.json").unlink()
    indexed = shards.index(str(tmp_path / "out"), classes=m["classes"], progress=False)
    assert indexed["task"] == "multilabel" and indexed["splits"] == m["splits"]
    assert json.loads((tmp_path / "out" / "_info.json").read_text())["splits"] == info["splits"]

    # the reader yields the multi-hot rows the .cls files name
    from imgcls.config import DataConfig
    from imgcls.data import ShardReader

    batch = next(iter(ShardReader(DataConfig(url=str(tmp_path / "out"), batch_size=8, num_workers=0),
                                  "train").loader()))
    assert batch["label"].shape == (8, 4) and set(batch["label"].unique().tolist()) <= {0.0, 1.0}


def test_bad_multi_label_rows_are_reported_together(tmp_path, capsys):
    write_image_tree(tmp_path / "d", {"img": 3})
    (tmp_path / "d" / "labels.csv").write_text(
        "path,labels,split\n"
        "img/000.png,cat dog,train\n"
        "img/001.jpg,,train\n"           # no label: fine for multi-label
        "img/002.png,cat cat,train\n"
        "img/missing.png,dog,val\n"
        "img/001.jpg,emu yak,holdout\n")
    line = one_line_error(capsys, ["build", "--labels", str(tmp_path / "d" / "labels.csv"),
                                   str(tmp_path / "out"), "--no-progress"])
    assert "3 bad row(s) in" in line
    for why in ("line 4: img/002.png: a class is listed twice in 'cat cat'", "line 5: img/missing.png: no such file",
                "line 6: img/001.jpg: split 'holdout' is not train"):
        assert why in line
    (tmp_path / "d" / "both.csv").write_text("path,label,labels\nimg/000.png,cat,cat dog\n")
    assert "needs one 'label' column (one class per image) or one 'labels' column" in \
        one_line_error(capsys, ["build", "--labels", str(tmp_path / "d" / "both.csv"), str(tmp_path / "out")])


def test_multi_label_from_a_label_file_on_s3_end_to_end(s3_bucket, tmp_path):
    """The issue's whole path: a label file and its PNGs on moto S3 built into multi-label shards
    on S3; 2 torchrun ranks train, a run stopped at step 7 and resumed ends bit for bit as the
    uninterrupted one; evaluate, export to ONNX, predict, and a real server answering every
    label over the threshold on /predict and on the v2 protocol (tritonclient), as predict does."""
    import httpx
    import torch
    import tritonclient.http as triton

    from imgcls import checkpoint
    from imgcls.export import read_samples
    from imgcls.inference import read_meta
    from tests.conftest import (
        EXACT_RUN,
        assert_same_weights,
        final_state,
        job,
        last_json,
        launch,
        save_test_images,
        serving,
        upload_folder,
    )

    write_multilabel_label_file(tmp_path / "kaggle", n=600)
    upload_folder(tmp_path / "kaggle", f"{s3_bucket}/kaggle")
    url = f"{s3_bucket}/multilabel"
    m = shards.build(f"{s3_bucket}/kaggle/labels.csv", url, shard_samples=100, progress=False, workers=1)
    assert m["task"] == "multilabel" and m["source"]["layout"] == "label file"

    run = [f"data.url={url}", *EXACT_RUN, "optim.lr=0.2", "train.label_smoothing=0", "train.mixup_alpha=0.2"]
    launch([*run, f"run.dir={tmp_path / 'whole'}"])
    launch([*run, f"run.dir={tmp_path / 'split'}", "train.max_steps=7"])
    out = launch([*run, f"run.dir={tmp_path / 'split'}"])
    assert "resumed from" in out.stderr and "val mAP" in out.stderr
    assert_same_weights(final_state(tmp_path / "whole")["model"], final_state(tmp_path / "split")["model"])

    ckpt = checkpoint.list_checkpoints(str(tmp_path / "whole"))[-1]
    threshold = torch.load(ckpt, weights_only=False)["progress"]["threshold"]
    stdout, _, _ = job("evaluate", ckpt, "--output", str(tmp_path / "eval"))
    assert f"at threshold {threshold:.3f}" in stdout
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["task"] == "multilabel" and set(saved["per_class"]) == set(NAMES)
    assert saved["map"] > 0.6  # chance is the positive rate, ~0.35

    stdout, _, code = job("export", ckpt, "--format", "onnx", "--check-samples", "32", "--threads", "1")
    assert code == 0
    onnx_path = last_json(stdout)["path"]
    meta = read_meta(onnx_path)
    assert meta["task"] == "multilabel" and meta["threshold"] == threshold
    images, _ = read_samples(meta, "test", limit=8)
    paths = save_test_images(tmp_path / "images", images, meta, 8)
    _, _, code = job("predict", onnx_path, *map(str, paths), "--output", str(tmp_path / "pred.json"))
    assert code == 0
    predicted = {r["path"]: [label["class"] for label in r["labels"]]
                 for r in json.loads((tmp_path / "pred.json").read_text())["predictions"]}
    assert any(len(labels) > 1 for labels in predicted.values()), predicted

    with serving(onnx_path, "--name", "attrs") as server:
        for path in paths:
            answer = httpx.post(server + "/predict", content=path.read_bytes(), timeout=30).json()
            assert [label["class"] for label in answer["labels"]] == predicted[str(path)]
            assert answer["threshold"] == threshold
        client = triton.InferenceServerClient(server.removeprefix("http://"))
        assert client.get_model_metadata("attrs")["parameters"]["threshold"] == threshold
        tensor = triton.InferInput("image", [len(paths)], "BYTES")
        tensor.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=object), binary_data=True)
        result = client.infer("attrs", [tensor], outputs=[triton.InferRequestedOutput("labels"),
                                                          triton.InferRequestedOutput("probabilities")])
        client.close()
    rows = result.as_numpy("labels")
    assert rows.shape == (len(paths), 4)
    for path, row, probs in zip(paths, rows, result.as_numpy("probabilities")):
        assert [name.decode() for name in row if name] == predicted[str(path)]
        assert ((probs >= threshold).sum()) == len(predicted[str(path)])  # sigmoids, not a softmax
