"""Gradient health: the norm before clipping in the train records, clipping under fp16 on the
unscaled gradient (GradScaler), and a non-finite gradient norm stopping the run naming its step."""
from __future__ import annotations

import json

import torch

from imgcls.trainer import clip_grad_norm
from tests.conftest import BASE_RUN, launch


def test_clipping_under_fp16_unscales_first():
    """The GradScaler path: the loss is scaled by 2**16, yet the norm and the clipped step are
    the fp32 run's (a clip on the scaled gradient would shrink every step to almost nothing)."""
    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(torch.randn(16, 8)).square().mean() * 100
        scaler.scale(loss).backward()
        norm = clip_grad_norm(model, optimizer, scaler, max_norm=1.0)
        scaler.step(optimizer)
        scaler.update()
        return norm, [p.detach().clone() for p in model.parameters()]

    fp16 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    assert fp16.is_enabled()
    norm, weights = run(fp16)
    reference_norm, reference = run(torch.amp.GradScaler("cpu", enabled=False))
    assert reference_norm > 1.0  # so the clip is active
    assert torch.allclose(norm, reference_norm, rtol=1e-5)
    for a, b in zip(weights, reference):
        assert torch.allclose(a, b, atol=1e-6)
    assert fp16.get_scale() == 2.0 ** 16  # the step was taken, not skipped


def test_grad_norm_is_logged_and_a_non_finite_one_names_its_step(bands_dataset, tmp_path):
    run_dir = tmp_path / "run"
    out = launch(["--config", "", f"data.url={bands_dataset}", f"run.dir={run_dir}", *BASE_RUN,
                  "model.name=tests.user_nets:inf_grad_net", "model.kwargs={good_steps: 12}", "train.sync_every=10",
                  "train.ckpt_every=100", "train.grad_clip=0"], nproc=None, check=False, timeout=180)
    assert out.returncode != 0
    assert "non-finite gradient norm at step 13 (epoch 0)" in out.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/grad_norm" in r]
    assert [r["step"] for r in logged] == [5, 10]  # train.log_every=5; the flags were read at step 15
    assert all(0 < r["train/grad_norm"] <= r["train/grad_norm_max"] < float("inf") for r in logged)
