"""The Trainer and the Checkpointer as components, in this process: no torchrun, no subprocess."""
from __future__ import annotations

import torch

from imgcls import distributed
from imgcls.checkpoint import Checkpointer, step_of
from imgcls.config import load_config, to_dict
from imgcls.signals import StopRequest
from imgcls.trainer import Progress, Trainer

from .conftest import BASE_RUN


def parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()  # momentum buffers exist, so the optimizer has state to save
    progress = Progress()
    progress.step, progress.best = 7, 0.5
    return {"model": model, "optimizer": optimizer, "progress": progress}


def test_a_checkpointer_saves_and_restores_a_dict_of_parts(tmp_path):
    run_dir = str(tmp_path / "run")
    first = Checkpointer(run_dir, keep_last=2, is_main=True, config={"seed": 1})
    assert not first.resuming
    first.parts = parts(seed=0)
    first.save(step=7)
    first.close()

    second = Checkpointer(run_dir, keep_last=2, is_main=True, config={"seed": 1})
    assert second.resuming and step_of(second.url) == 7
    second.parts = fresh = parts(seed=1)
    assert not torch.equal(fresh["model"].weight, first.parts["model"].weight)
    second.restore()
    second.close()
    assert torch.equal(fresh["model"].weight, first.parts["model"].weight)
    saved_momentum = first.parts["optimizer"].state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(fresh["optimizer"].state_dict()["state"][0]["momentum_buffer"], saved_momentum)
    assert (fresh["progress"].step, fresh["progress"].best) == (7, 0.5)


def test_a_trainer_built_from_a_config_takes_one_step(bands_dataset, tmp_path):
    cfg = load_config(None, [f"data.url={bands_dataset}", f"run.dir={tmp_path / 'run'}", *BASE_RUN,
                             "train.max_steps=1", "run.device=cpu"])
    dist = distributed.init_distributed(cfg.run.device)
    assert not dist.enabled  # one process: no group, no torchrun
    checkpointer = Checkpointer(cfg.run.dir, cfg.train.keep_last, dist.is_main, config=to_dict(cfg))
    stop = StopRequest()
    try:
        trainer = Trainer(cfg, dist, stop, checkpointer)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        result = trainer.train()
    finally:
        stop.close()
        checkpointer.close()
    assert (result["status"], result["reason"], result["step"]) == ("stopped", "max_steps", 1)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert checkpointer.url is None and len(list((tmp_path / "run" / "checkpoints").glob("step-*1.pt"))) == 1
