"""EWC under real torchrun processes (2 ranks, gloo, bf16 autocast, accumulation): the Fisher
is the mean squared per-sample gradient whatever the world size, the penalty holds the weights
that matter near the previous task's, and a resume restores it without recomputing."""
from __future__ import annotations

import pytest
import torch

from imgcls import checkpoint
from imgcls.augment import sample_uniforms
from imgcls.data import ShardReader
from imgcls.distributed import DistInfo
from imgcls.ewc import FISHER_DRAW, fisher_sums, previous_model
from tests.conftest import EXACT_RUN, build_bands_dataset, final_state, launch

FISHER_SAMPLES = 250  # spans three 100-sample shards: the ranks hold unequal shares


@pytest.fixture(scope="module")
def tasks(bands_dataset, reversed_bands_dataset):
    """(task A's data, task B's data: the same images, the bands counted from the other end)."""
    return bands_dataset, reversed_bands_dataset


@pytest.fixture(scope="module")
def previous(tasks, tmp_path_factory):
    """Task A's final checkpoint (with an EMA beside the raw weights, as EXACT_RUN trains one)."""
    run_dir = tmp_path_factory.mktemp("runs") / "a"
    launch([f"data.url={tasks[0]}", f"run.dir={run_dir}", *EXACT_RUN])
    return checkpoint.list_checkpoints(str(run_dir))[-1]


def task_b(tasks, previous, run_dir, *extra, check=True):
    return launch([f"data.url={tasks[1]}", f"run.dir={run_dir}", *EXACT_RUN, f"model.pretrained={previous}", *extra],
                  check=check)


def ewc_args(previous, importance):
    return [f"ewc.previous={previous}", f"ewc.importance={importance}", f"ewc.fisher_samples={FISHER_SAMPLES}"]


@pytest.fixture(scope="module")
def runs(tasks, previous, tmp_path_factory):
    """Task B three ways: plain fine-tuning, EWC with importance 0, and EWC with importance 10."""
    root = tmp_path_factory.mktemp("b")
    out = {"plain": task_b(tasks, previous, root / "plain")}
    for importance in (0, 10):
        out[importance] = task_b(tasks, previous, root / f"ewc{importance}", *ewc_args(previous, importance))
    return {name: (out[name], final_state(root / name if name == "plain" else root / f"ewc{name}")) for name in out}


def test_fisher_is_the_mean_squared_per_sample_gradient_of_a_draw_from_the_model(previous, runs, tasks):
    """The 2-rank all-reduced Fisher equals one computed here sample by sample, with plain
    autograd, at the previous checkpoint's raw weights (not its EMA)."""
    out, state = runs[10]
    assert "ewc: diagonal Fisher of" in out.stderr and f"from {FISHER_SAMPLES} samples" in out.stderr
    model, data_cfg, manifest = previous_model(state_config(state).ewc)
    prev = checkpoint.load(previous)
    assert "ema" in prev
    for name, _p in model.named_parameters():
        assert torch.equal(state["ewc"]["anchor"][name], prev["model"][name]), name
    assert not all(torch.equal(prev["model"][n], prev["ema"]["module." + n]) for n, _ in model.named_parameters())

    reader = ShardReader(data_cfg, "train", train=False, manifest=manifest)  # one process: shard order
    samples = [(image, key) for batch in reader for image, key in zip(reader.transform(batch), batch["key"])]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    seen = 0
    for image, key in samples[:FISHER_SAMPLES]:
        model.zero_grad()
        log_probs = model(image[None])[0].float().log_softmax(0)
        u = sample_uniforms(0, FISHER_DRAW, key)[0]
        label = min(int((log_probs.detach().exp().cumsum(0) < u).sum()), len(log_probs) - 1)
        log_probs[label].backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square()
        seen += 1
    assert seen == FISHER_SAMPLES
    fisher = state["ewc"]["fisher"]
    assert fisher.keys() == expected.keys()
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name] / seen, rtol=1e-4, atol=1e-9)
    assert max(f.max() for f in fisher.values()) > 0

    # the same in this single process, through fisher_sums: independent of the world size
    sums, count = fisher_sums(model, data_cfg, manifest, state_config(state).ewc, DistInfo(), seed=0)
    assert count == FISHER_SAMPLES
    for name in fisher:
        torch.testing.assert_close(sums[name] / count, fisher[name], rtol=1e-5, atol=1e-10)


def state_config(state):
    from imgcls.config import from_dict

    return from_dict(state["config"])


def fisher_distance(state: dict, ewc: dict) -> float:
    """sum F (w - w*)^2: what the penalty measures."""
    return sum((ewc["fisher"][n] * (state["model"][n] - ewc["anchor"][n]).square()).sum().item() for n in ewc["fisher"])


def test_zero_importance_is_plain_fine_tuning_and_the_penalty_holds_the_weights(runs):
    plain, zero, strong = runs["plain"][1], runs[0][1], runs[10][1]
    for name in plain["model"]:  # computing the Fisher changed nothing else (weights, RNG, data order)
        assert torch.equal(zero["model"][name], plain["model"][name]), name
    ewc = strong["ewc"]
    moved_plain, moved_ewc = fisher_distance(plain, ewc), fisher_distance(strong, ewc)
    assert moved_plain > 0
    assert moved_ewc < 0.2 * moved_plain, (moved_ewc, moved_plain)  # measured: 0.07


def test_a_huge_importance_with_adamw_barely_moves_the_weights(tasks, previous, tmp_path):
    """AdamW's normalised steps stay stable where SGD would need lr x importance x max Fisher
    small (the run warns about that): at importance 1e6 the weights that matter stay put."""
    adamw = ["optim.name=adamw", "optim.lr=0.002", "train.epochs=1"]
    task_b(tasks, previous, tmp_path / "plain", *adamw)
    held = task_b(tasks, previous, tmp_path / "held", *adamw, *ewc_args(previous, 1e6))
    assert "SGD diverges" not in held.stderr
    ewc = final_state(tmp_path / "held")["ewc"]
    moved_plain = fisher_distance(final_state(tmp_path / "plain"), ewc)
    moved_held = fisher_distance(final_state(tmp_path / "held"), ewc)
    assert moved_held < 0.01 * moved_plain, (moved_held, moved_plain)  # measured: 7e-5
    assert "SGD diverges" in task_b(tasks, previous, tmp_path / "sgd", *ewc_args(previous, 1e6),
                                    "train.max_steps=1").stderr


def test_resume_restores_the_fisher_without_recomputing_and_is_bitwise_exact(runs, tasks, previous, tmp_path):
    run_dir = tmp_path / "stopped"
    args = ewc_args(previous, 10)
    first = task_b(tasks, previous, run_dir, *args, "train.max_steps=7")
    assert first.stderr.count("ewc: diagonal Fisher of") == 1  # rank 0 logs it once
    out = task_b(tasks, previous, run_dir, *args)
    assert "; resuming at step 7 (epoch 0, batch 14)" in out.stderr
    assert "ewc: diagonal Fisher of" not in out.stderr
    assert "ewc: Fisher and anchor of" in out.stderr and "restored from the checkpoint (not recomputed)" in out.stderr
    resumed, straight = final_state(run_dir), runs[10][1]
    assert resumed["progress"]["restarts"] == 1
    for part in ("fisher", "anchor"):
        for name, tensor in straight["ewc"][part].items():
            assert torch.equal(resumed["ewc"][part][name], tensor), (part, name)
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_a_head_for_other_classes_is_left_out_of_the_penalty(previous, tmp_path):
    """Task B with 3 classes after task A's 4: the head (fc) starts as initialised and is not
    protected; every other weight is."""
    three = build_bands_dataset(tmp_path / "data", classes=3)
    out = launch([f"data.url={three}", f"run.dir={tmp_path / 'run'}", *EXACT_RUN, "train.epochs=1",
                 f"model.pretrained={previous}", *ewc_args(previous, 10)])
    assert "ewc: not protected (absent from, or shaped unlike, the previous model): fc.weight, fc.bias" in out.stderr
    fisher = final_state(tmp_path / "run")["ewc"]["fisher"]
    assert "fc.weight" not in fisher and "stage1.0.weight" in fisher and len(fisher) == 18


def one_error_line(out) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-2000:]
    return errors[0]


def test_bad_ewc_settings_are_one_line_errors(tasks, previous, tmp_path):
    too_many = task_b(tasks, previous, tmp_path / "many", f"ewc.previous={previous}", "ewc.fisher_samples=100000",
                      check=False)
    assert f"ewc.fisher_samples=100000: {tasks[0]} split 'train' has 1400 samples" in one_error_line(too_many)
    missing = tmp_path / "nowhere.pt"
    absent = task_b(tasks, previous, tmp_path / "absent", f"ewc.previous={missing}", check=False)
    assert f"ewc.previous: no checkpoint at {missing}" in one_error_line(absent)
