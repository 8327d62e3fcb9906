"""At the same global batch, 2 ranks x accumulation 1 and 1 rank x accumulation 2 take the
same optimizer steps (real torchrun processes, gloo). The model has no BatchNorm: with it,
each rank normalises with its own micro-batch statistics and the running stats follow rank 0,
so the two layouts would legitimately differ (see docs/training.md, "Batch size and learning rate")."""
import torch

from tests.conftest import REPO, launch


def run(nproc: int, accum: int, out, steps: int = 5) -> dict:
    launch([str(accum), str(steps), str(out)], nproc, script=REPO / "tests" / "ddp_math_worker.py")
    return torch.load(out, weights_only=True)


def test_two_ranks_equal_one_rank_with_two_micro_batches(tmp_path):
    two_ranks = run(2, 1, tmp_path / "ddp.pt")
    accumulated = run(1, 2, tmp_path / "accum.pt")
    initial = run(1, 1, tmp_path / "initial.pt", steps=0)
    for name, value in two_ranks.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)
    # the comparison means something only if the steps moved the weights
    assert all(not torch.allclose(initial[n], two_ranks[n], atol=1e-4) for n in two_ranks)
