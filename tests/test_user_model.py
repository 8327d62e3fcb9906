"""model.name=package.module:factory: a network defined in a test file (tests/user_nets) trains
with freezing and a later unfreeze, fine-tunes from its own checkpoint with EWC, exports to
ONNX, and travels in the code snapshot of jobs/submit.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imgcls import checkpoint
from imgcls.cluster import carry_user_code
from imgcls.config import ModelConfig, load_config
from imgcls.models import UnknownModel, build_model, head_name
from tests.conftest import BASE_RUN, REPO, launch

USER_NET = "model.name=tests.user_nets:tiny_net"


def test_a_factory_of_ones_own_is_built_with_its_kwargs():
    model = build_model(ModelConfig(name="tests.user_nets:tiny_net", kwargs={"width": 4}), 5, 3)
    assert type(model).__name__ == "TinyNet" and model.head.out_features == 5 and model.stem[0].in_channels == 3
    assert model.head.in_features == 8 and head_name(model) == "head"
    with pytest.raises(UnknownModel, match="cannot import 'no_such_pkg.nets'.*PYTHONPATH"):
        build_model(ModelConfig(name="no_such_pkg.nets:net"), 5, 3)
    with pytest.raises(UnknownModel, match="has no callable 'nope'"):
        build_model(ModelConfig(name="tests.user_nets:nope"), 5, 3)
    with pytest.raises(ValueError, match="model.kwargs applies to"):
        build_model(ModelConfig(name="simple_cnn", kwargs={"width": 4}), 5, 3)


def test_own_network_trains_freezes_fine_tunes_with_ewc_and_exports(bands_dataset, tmp_path):
    from imgcls.export import export_checkpoint

    first = tmp_path / "a"
    launch(["--config", "", f"data.url={bands_dataset}", f"run.dir={first}", *BASE_RUN, "train.epochs=2",
           USER_NET, "model.kwargs={width: 4}", "model.freeze_backbone=true",
           "model.unfreeze_schedule=[[1, body]]"], nproc=None)
    steps = checkpoint.list_checkpoints(str(first))
    after_epoch = [torch.load(url, weights_only=False)["model"] for url in steps[-2:]]
    # epoch 0 trained the head only; epoch 1 also the unfrozen body, never the stem
    torch.manual_seed(0)  # run.seed: the run's initial weights
    start = build_model(ModelConfig(name="tests.user_nets:tiny_net", kwargs={"width": 4}), 4, 1).state_dict()
    assert torch.equal(after_epoch[-1]["stem.0.weight"], start["stem.0.weight"])
    assert not torch.equal(after_epoch[-1]["body.0.weight"], start["body.0.weight"])

    second = tmp_path / "b"
    launch(["--config", "", f"data.url={bands_dataset}", f"run.dir={second}", *BASE_RUN, USER_NET,
           "model.kwargs={width: 4}", f"model.pretrained={steps[-1]}", f"ewc.previous={steps[-1]}",
           "ewc.fisher_samples=64", "ewc.importance=10", "optim.name=adamw", "optim.lr=0.001"],
           nproc=None)
    state = torch.load(checkpoint.list_checkpoints(str(second))[-1], weights_only=False)
    assert "ewc" in state and set(state["ewc"]["fisher"]) >= {"stem.0.weight", "head.weight"}

    result = export_checkpoint(checkpoint.list_checkpoints(str(second))[-1], "onnx", tmp_path / "net.onnx",
                               check_samples=64)
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0


def test_submit_snapshot_carries_the_module_and_names_it(tmp_path, monkeypatch):
    package = tmp_path / "src" / "mynets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from tests.user_nets import tiny_net\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    cfg = load_config(None, ["model.name=mynets:tiny_net"])
    code = tmp_path / "run" / "code"
    code.mkdir(parents=True)
    origins = carry_user_code(code, [cfg])
    assert origins == {"mynets": str(package)} and (code / "mynets" / "__init__.py").exists()
    # the job imports it from its working directory, the snapshot, not from where it was
    (package / "__init__.py").write_text("raise ImportError('the original, not the snapshot')\n")
    out = subprocess.run([sys.executable, "-c", "import mynets; print(mynets.__file__)"], cwd=code,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(code / "mynets" / "__init__.py"), out.stderr
    assert json.dumps(origins)  # recorded in submit.json as it is
