"""Datasets as users hold them: pre-split folders, label files, image folders on S3, and
shards that timm's own WebDataset reader counts (shards/sources.py, shards/writer.py)."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

import shards
from shardio.format import read_tar
from shardio.storage import join, read_bytes
from shards.cli import main as cli_main
from tests.conftest import REPO, upload_folder, write_image_tree

PRE_SPLIT = {"train/cat": 6, "train/dog": 5, "train/emu": 4, "val/cat": 2, "val/dog": 2, "test/emu": 3}


def keys_by_split(dest: str, manifest: dict) -> dict[str, list[str]]:
    return {name: [s["__key__"] for shard in split["shards"]
                   for s in read_tar(read_bytes(join(dest, shard["path"])))]
            for name, split in manifest["splits"].items()}


def one_line_error(capsys, argv: list[str]) -> str:
    """The CLI's error for `argv`: exit status 2 and one line on stderr."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_pre_split_folders_are_kept_as_the_splits(tmp_path, caplog):
    write_image_tree(tmp_path / "data", PRE_SPLIT)
    with caplog.at_level(logging.INFO, "shards"):
        m = shards.build(tmp_path / "data", tmp_path / "out", shard_samples=4, progress=False, workers=2)

    assert "layout: pre-split folders (train 15, val 4, test 3); 3 classes" in caplog.messages
    assert m["classes"] == ["cat", "dog", "emu"]
    assert m["source"]["layout"] == "pre-split folders" and m["split_fractions"] is None
    assert [m["splits"][s]["class_counts"] for s in ("train", "val", "test")] == \
        [[6, 5, 4], [2, 2, 0], [0, 0, 3]]
    keys = keys_by_split(str(tmp_path / "out"), m)
    for name, folder in (("train", "train"), ("val", "val"), ("test", "test")):
        assert keys[name] and all(k.startswith(f"{folder}/") for k in keys[name])
    assert shards.verify(str(tmp_path / "out"), deep=True) == []

    # --split re-splits only when asked: the test folder stays the test split.
    m = shards.build(tmp_path / "data", tmp_path / "resplit", split=(0.5, 0.5, 0.0),
                     progress=False, workers=1)
    assert m["split_fractions"] == [0.5, 0.5, 0.0]
    assert m["splits"]["test"]["class_counts"] == [0, 0, 3]
    # val: cat 4 of 8, dog 4 of 7, emu 2 of 4
    assert [m["splits"][s]["count"] for s in ("train", "val")] == [9, 10]


def test_valid_folder_without_test_and_the_cli_line(tmp_path, capsys):
    write_image_tree(tmp_path / "data", {"train/a": 3, "train/b": 3, "valid/a": 2})
    assert cli_main(["build", str(tmp_path / "data"), str(tmp_path / "out"), "--no-progress",
                     "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "layout: pre-split folders (train 6, val 2); 2 classes" in err
    m = shards.load_manifest(str(tmp_path / "out"))
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [6, 2, 0]


@pytest.mark.parametrize("tree, message", [
    ({"train/a": 1, "val/a": 1, "cats/x": 1},
     r"folders train, val are named like splits but cats are not: "
     r".*rename train, val or list the images in a label file"),
    ({"train/a": 1, "val/a": 1, "val/zebra": 1, "test/yak": 1},
     r"classes only in val or test, not in train: test/yak, val/zebra"),
    ({"train/a": 1, "train/val": 1},
     r"class folder train/val is named like a split: .*give .*/data/train as SOURCE"),
    ({"train": 2, "test": 1},
     r"test/000.png is directly in a split folder, not in a class folder"),
    ({"train/a": 1, "val/a": 1, "validation/a": 1},
     r"both val/ and validation/ are the val split"),
    ({"val/a": 1, "test/a": 1},
     r"pre-split folders test, val without train/"),
])
def test_folders_colliding_with_split_names_are_refused_in_one_line(tmp_path, capsys, tree, message):
    write_image_tree(tmp_path / "data", tree)
    line = one_line_error(capsys, ["build", str(tmp_path / "data"), str(tmp_path / "out"), "--no-progress"])
    assert re.search(message, line), line


def test_label_file_with_split_column_and_a_headerless_tsv(tmp_path, caplog):
    files = write_image_tree(tmp_path / "kaggle" / "images", {"all": 12})
    names = sorted(files)
    rows = ["path,label,split"] + [f"images/{n},{'cat' if i % 2 else 'dog'},{'train' if i < 8 else 'val'}"
                                    for i, n in enumerate(names)]
    (tmp_path / "kaggle" / "labels.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.INFO, "shards"):
        m = shards.build(tmp_path / "kaggle" / "labels.csv", tmp_path / "out", progress=False, workers=2)
    assert "layout: label file (train 8, val 4); 2 classes" in caplog.messages
    assert m["classes"] == ["cat", "dog"] and m["source"]["kind"] == "labels"
    assert m["source"]["layout"] == "label file" and m["source"]["name"] == "kaggle"
    assert [m["splits"][s]["class_counts"] for s in ("train", "val", "test")] == [[4, 4], [2, 2], [0, 0]]
    keys = keys_by_split(str(tmp_path / "out"), m)
    assert sorted(keys["val"]) == [f"images/all/{n[4:-4]}" for n in names[8:]]

    # ImageNet's flat val folder and its labels: no header, numeric labels in numeric order.
    flat = write_image_tree(tmp_path / "imagenet", {"val": 11})
    lines = [f"val/{p.name}\t{i}" for i, p in enumerate(flat.values())]
    (tmp_path / "imagenet" / "val_labels.tsv").write_text("\n".join(lines))
    m = shards.build(tmp_path / "imagenet" / "val_labels.tsv", tmp_path / "flat", progress=False, workers=1)
    assert m["classes"] == [str(i) for i in range(11)] and m["split_fractions"] == [0.7, 0.2, 0.1]
    assert sum(m["splits"][s]["count"] for s in m["splits"]) == 11


def test_bad_label_rows_are_reported_together(tmp_path, capsys, caplog):
    write_image_tree(tmp_path / "d", {"img": 3})
    (tmp_path / "d" / "labels.csv").write_text(
        "path,label,split\n"
        "img/000.png,cat,train\n"
        "img/missing.jpg,cat,train\n"
        "img/001.jpg,,train\n"
        "img/002.png,dog,holdout\n"
        "img/000.png,dog,val\n"
        "img/000.png,cat\n")
    line = one_line_error(capsys, ["build", "--labels", str(tmp_path / "d" / "labels.csv"),
                                   str(tmp_path / "out"), "--no-progress"])
    assert "5 bad row(s) in" in line and line.endswith("fix or remove them")
    for why in ("line 3: img/missing.jpg: no such file", "line 4: img/001.jpg: empty label",
                "line 5: img/002.png: split 'holdout' is not train",
                "line 6: img/000.png is listed twice (also line 2)", "line 7: 2 columns, expected 3"):
        assert why in line
    assert not (tmp_path / "out").exists()

    (tmp_path / "d" / "only.csv").write_text(
        "path,label,split\nimg/000.png,cat,train\nimg/002.png,yak,test\n")
    assert "classes only in val or test rows, not in train: yak" in \
        one_line_error(capsys, ["build", "--labels", str(tmp_path / "d" / "only.csv"), str(tmp_path / "out")])
    assert "give SOURCE or --labels FILE" in \
        one_line_error(capsys, ["build", str(tmp_path / "d"), str(tmp_path / "out"),
                                "--labels", str(tmp_path / "d" / "only.csv")])


def test_pre_split_folder_and_label_file_read_directly_from_s3(tmp_path, s3_bucket):
    write_image_tree(tmp_path / "data", PRE_SPLIT)
    (tmp_path / "data" / "labels.csv").write_text(
        "path,label\n" + "".join(f"train/{c}/000.png,{c}\n" for c in ("cat", "dog", "emu")))
    upload_folder(tmp_path / "data", f"{s3_bucket}/images")

    local = shards.build(tmp_path / "data" / "train", tmp_path / "local", progress=False, workers=1)
    remote = shards.build(f"{s3_bucket}/images/train", tmp_path / "remote", progress=False, workers=1)
    assert remote["source"]["path"] == f"{s3_bucket}/images/train"
    for name in ("train", "val", "test"):  # the same files, keys and split: the same shard bytes
        assert [s["sha256"] for s in remote["splits"][name]["shards"]] == \
            [s["sha256"] for s in local["splits"][name]["shards"]]

    m = shards.build(f"{s3_bucket}/images", f"{s3_bucket}/shards", progress=False, workers=2)
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [15, 4, 3]
    assert shards.verify(f"{s3_bucket}/shards", deep=True) == []

    m = shards.build(f"{s3_bucket}/images/labels.csv", tmp_path / "from-labels", progress=False,
                     workers=1, split=(1, 0, 0))
    assert m["classes"] == ["cat", "dog", "emu"] and m["splits"]["train"]["count"] == 3


def test_timm_reads_every_sample_of_our_shards(tmp_path):
    timm_data = pytest.importorskip("timm.data")
    pytest.importorskip("webdataset")
    files = write_image_tree(tmp_path / "data", PRE_SPLIT)
    files["train/cat/000.png"].rename(tmp_path / "data" / "train" / "cat" / "IMG.2024.01.png")  # dots
    dest = tmp_path / "out"
    m = shards.build(tmp_path / "data", dest, shard_samples=4, progress=False, workers=1)
    assert "train/cat/IMG_2024_01" in keys_by_split(str(dest), m)["train"]
    info = json.loads((dest / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 3]
    for split in ("train", "val", "test"):
        dataset = timm_data.create_dataset("wds/ours", root=str(dest), split=split,
                                           input_key="jpg;png;webp")
        labels = sorted(int(target) for _, target in dataset)
        assert len(labels) == m["splits"][split]["count"]
        assert labels == sorted(c for c, n in enumerate(m["splits"][split]["class_counts"]) for _ in range(n))


def test_a_script_without_a_main_guard_gets_told_why_the_workers_died(tmp_path):
    write_image_tree(tmp_path / "data", {"a": 2, "b": 2})
    script = tmp_path / "unguarded.py"
    script.write_text(f"import shards\nshards.build({str(tmp_path / 'data')!r}, {str(tmp_path / 'out')!r}, "
                      "workers=2, progress=False)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode != 0
    assert "RuntimeError: a build worker process died" in run.stderr
    assert "if __name__ == '__main__'" in run.stderr.splitlines()[-1]
