"""A learning rate per part (optim.head_lr_mult, optim.layer_decay): the stages of the zoo's
networks, their rates, a stage unfrozen later training at its own rate, and the sample-based
schedule and its elastic resume keeping the ratios."""
from __future__ import annotations

import pytest
import torch

from imgcls.config import Config, ConfigError, ModelConfig
from imgcls.models import apply_unfreeze_schedule, build_model
from imgcls.models.parts import stages
from imgcls.optim import make_optimizer, make_schedule


def group_lr(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("name, first, count", [
    ("simple_cnn", ["stage1.0.weight", "stage1.1.weight", "stage1.1.bias", "stage1.3.weight", "stage1.4.weight",
                    "stage1.4.bias"], 4),
    ("resnet18", ["conv1.weight", "bn1.weight", "bn1.bias"], 10),       # timm's grouping of its resnet18
    ("timm/resnet18", ["conv1.weight", "bn1.weight", "bn1.bias"], 10),  # timm's own group_matcher
    ("fast_cnn", ["blocks.0.0.weight", "blocks.0.2.weight", "blocks.0.2.bias", "blocks.0.4.weight",
                  "blocks.0.5.weight", "blocks.0.5.bias"], 4),
])
def test_stages_run_from_the_stem_to_the_head(name, first, count):
    model = build_model(ModelConfig(name=name, width=8), 3, 1, 28)
    parts = stages(model)
    assert len(parts) == count and parts[0] == first and parts[-1][0].endswith("weight")
    assert sorted(n for part in parts for n in part) == sorted(n for n, _ in model.named_parameters())


def test_head_multiplier_and_layer_decay_set_each_stages_rate():
    cfg = Config()
    cfg.model.width, cfg.optim.head_lr_mult, cfg.optim.layer_decay = 8, 10.0, 0.5
    model = build_model(cfg.model, 4, 1, 28)
    lr = group_lr(make_optimizer(cfg, model, 0.01))
    expected = {"stage1": 0.01 * 0.125, "stage2": 0.01 * 0.25, "stage3": 0.01 * 0.5, "fc": 0.1}
    for name, p in model.named_parameters():
        assert lr[id(p)] == pytest.approx(expected[name.split(".")[0]]), name
    cfg.optim.layer_decay = 1.5
    with pytest.raises(ConfigError, match="optim.layer_decay=1.5"):
        make_optimizer(cfg, model, 0.01)


def test_a_stage_unfrozen_later_trains_at_its_own_rate():
    cfg = Config()
    cfg.model.width, cfg.model.freeze_backbone = 8, True
    cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay = 0.0, False, 0.0
    cfg.optim.head_lr_mult, cfg.optim.layer_decay = 10.0, 0.5
    model = build_model(cfg.model, 4, 1, 28)
    optimizer = make_optimizer(cfg, model, 0.01)
    assert apply_unfreeze_schedule(model, [[1, "stage3"]], 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 1, 28, 28)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    assert set(grads) == {n for n, _ in model.named_parameters() if n.startswith(("stage3", "fc"))}
    for name, p in model.named_parameters():  # plain SGD: the step is -lr x grad
        rate = {"stage3": 0.005, "fc": 0.1}.get(name.split(".")[0], 0.0)
        step = -rate * grads[name] if name in grads else torch.zeros_like(p)
        assert torch.allclose(p.detach() - before[name], step, atol=1e-7), name


def test_the_schedule_and_an_elastic_resume_keep_the_ratios():
    cfg = Config()
    cfg.model.width, cfg.optim.head_lr_mult, cfg.optim.layer_decay = 8, 4.0, 0.5
    cfg.data.batch_size, cfg.optim.base_batch, cfg.schedule.warmup_epochs = 32, 64, 1.0
    model = build_model(cfg.model, 4, 1, 28)

    def schedule(world_size, steps_per_epoch):
        optimizer = make_optimizer(cfg, model, lr=cfg.optim.lr * 32 * world_size / 64)
        return optimizer, make_schedule(cfg, optimizer, [steps_per_epoch] * 4, world_size)

    two_opt, two_ranks = schedule(2, 10)
    for _ in range(25):
        two_ranks.step()
    one_opt, one_rank = schedule(1, 20)
    one_opt.load_state_dict(two_opt.state_dict())
    one_rank.load_state_dict(two_ranks.state_dict())
    head, stem = model.fc.weight, model.stage1[0].weight
    for optimizer, peak in ((two_opt, 0.1), (one_opt, 0.05)):
        lr = group_lr(optimizer)
        assert lr[id(head)] / lr[id(stem)] == pytest.approx(4 / 0.125)
        assert lr[id(head)] == pytest.approx(4 * peak * two_ranks.factor())
