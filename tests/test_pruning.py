"""Magnitude pruning: the requested sparsity, fine-tuning through the real trainer (torchrun)
that keeps the zeros and resumes bitwise, and jobs/prune.py end to end."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from imgcls import checkpoint
from imgcls.config import ModelConfig, from_dict
from imgcls.data import read_manifest
from imgcls.models import build_model
from imgcls.models.trained import model_from_state
from imgcls.pruning import apply_pruning, make_permanent, sparsity_report
from tests.conftest import BASE_RUN, REPO, launch

# Deterministic and accumulating, with an EMA, and a checkpoint only at the end of each epoch.
PRUNE_RUN = [
    *BASE_RUN, "data.batch_size=16", "data.eval_batch_size=200", "optim.lr=0.05", "optim.base_batch=64",
    "train.epochs=2", "train.accum_steps=2", "train.ckpt_every=1000", "train.keep_last=2", "data.mean=[0.5]",
    "data.std=[0.25]", "run.deterministic=true", "train.ema_decay=0.9",
]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(bands_dataset, tmp_path_factory):
    """A tiny trained checkpoint to prune."""
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *PRUNE_RUN, "train.ema_decay=0"], nproc=1)
    assert last_json(out.stdout)["status"] == "done"
    return str(run_dir / "checkpoints" / "best.pt")


@pytest.mark.parametrize("method,channels_last", [("unstructured", False), ("channel", False),
                                                   ("unstructured", True), ("channel", True)])
def test_apply_pruning_gives_the_requested_sparsity(method, channels_last):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="simple_cnn", width=16, channels_last=channels_last), 4, 1)
    apply_pruning(model, SimpleNamespace(sparsity=0.5, method=method))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert model.stage2.get_submodule("1").weight_orig.is_contiguous(memory_format=layout)
    report = sparsity_report(model, method)
    assert report["pruned"] == pytest.approx(0.5, abs=1e-3)
    assert report["layers"]["fc"]["sparsity"] == 0.0  # the classifier head stays dense
    if method == "channel":  # whole output filters, half of them in every conv
        for name in ("stage1.0", "stage3.4"):
            conv = model.get_submodule(name)
            zero_filters = (conv.weight.flatten(1) == 0).all(dim=1)
            assert zero_filters.sum() == conv.out_channels // 2
    assert {"stage1.0.weight_orig", "stage1.0.weight_mask"} <= model.state_dict().keys()
    copy.deepcopy(model)  # the EMA copies the model: a pruned one must be copyable
    x = torch.randn(2, 1, 12, 12)
    masked_out = model.eval()(x)
    make_permanent(model)
    assert "stage1.0.weight" in model.state_dict() and "stage1.0.weight_mask" not in model.state_dict()
    assert sparsity_report(model, method)["pruned"] == report["pruned"]
    assert torch.equal(model(x), masked_out)  # the same function, now without hooks


def effective_weights(state: dict) -> dict:
    """weight_orig * weight_mask for every masked layer of a model state_dict."""
    return {k.removesuffix("_orig"): v * state[k.replace("_orig", "_mask")] for k, v in state.items()
            if k.endswith("weight_orig")}


def test_fine_tuning_keeps_the_zeros_and_resumes_bitwise(trained, bands_dataset, tmp_path):
    prune = [f"model.pretrained={trained}", "prune.sparsity=0.5", "prune.method=unstructured"]
    straight = tmp_path / "straight"
    out = launch([f"data.url={bands_dataset}", f"run.dir={straight}", *PRUNE_RUN, *prune])
    assert last_json(out.stdout)["status"] == "done"
    stopped = tmp_path / "stopped"
    out = launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *PRUNE_RUN, *prune, "train.max_steps=9"])
    assert last_json(out.stdout)["status"] == "stopped"
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *PRUNE_RUN, *prune])

    a, _ = checkpoint.load_latest(str(straight))
    b, _ = checkpoint.load_latest(str(stopped))
    assert b["progress"]["restarts"] == 1 and a["progress"]["step"] == b["progress"]["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs after resume"

    # the masks are the ones of the trained (pretrained) weights' magnitudes, unchanged by training
    cfg = from_dict(a["config"])
    reference = apply_pruning(build_model(cfg.model, 4, 1), cfg.prune).state_dict()
    masks = {k: v for k, v in a["model"].items() if k.endswith("weight_mask")}
    assert masks and all(torch.equal(v, reference[k]) for k, v in masks.items())
    # fine-tuning moved the surviving weights, and the pruned ones still act as zeros
    start = checkpoint.load(trained)["model"]
    moved = [k for k, v in effective_weights(a["model"]).items() if not torch.equal(v, start[k] * masks[k + "_mask"])]
    assert moved
    model, weights = model_from_state(a, read_manifest(cfg.data.url))
    assert weights == "ema" and sparsity_report(model, "unstructured")["pruned"] == pytest.approx(0.5, abs=1e-3)


def test_prune_job_reports_accuracy_sparsity_and_size(trained, tmp_path):
    run_dir = tmp_path / "pruned"
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "prune.py"), trained, "--sparsity", "0.5",
                          "--method", "channel", "--epochs", "1", "--run-dir", str(run_dir), "optim.lr=0.02"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((run_dir / "prune_report.json").read_text())
    assert "pruned + fine-tuned" in out.stdout and "gzip bytes" in out.stdout
    acc = report["accuracy"]
    assert acc["original"] > 0.6 and acc["fine_tuned"] > 0.5  # chance is 0.25
    assert report["sparsity"]["pruned_layers"] == pytest.approx(0.5)
    size = report["bytes"]
    assert size["pruned"] == pytest.approx(size["dense"], rel=0.01)  # dense shapes: same file size
    assert size["pruned_gzip"] < 0.8 * size["dense_gzip"]  # the zeros only show once compressed
    assert report["channels_removed"] is False and report["train_status"] == "done"
    config = from_dict(checkpoint.load(report["final_checkpoint"])["config"])
    assert config.model.pretrained == trained and config.prune.method == "channel" and config.train.epochs == 1
    assert (run_dir / "pruned_weights.pt.gz").stat().st_size == size["pruned_gzip"]


def test_a_pruned_checkpoint_is_a_valid_pretrained_file(tmp_path):
    """model.pretrained=<pruned run's checkpoint> starts from the pruned weights, zeros included."""
    from imgcls.models import load_pretrained

    torch.manual_seed(0)
    pruned = build_model(ModelConfig(name="simple_cnn", width=8), 4, 1)
    apply_pruning(pruned, SimpleNamespace(sparsity=0.5, method="unstructured"))
    path = tmp_path / "pruned.pt"
    torch.save({"model": pruned.state_dict()}, path)
    fresh = build_model(ModelConfig(name="simple_cnn", width=8), 4, 1)
    report = load_pretrained(fresh, str(path))
    assert not report.missing and not report.skipped
    expected = make_permanent(copy.deepcopy(pruned)).state_dict()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert sparsity_report(fresh)["overall"] > 0.4
