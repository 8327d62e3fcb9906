"""What a flags sync costs: the all-reduce and host read the trainer makes every
`train.sync_every` steps, against the step it is amortised over.

    .venv/bin/torchrun --standalone --nproc-per-node 2 bench/sync_cost.py   # CPU, gloo

Each rank times N syncs (`distributed.all_reduce(flags, "max").tolist()` on a 2-float
tensor, as Trainer.sync_flags does) and N training steps of the default recipe's model
(fast_cnn 16-64-128, batch 128, bf16, channels_last, DDP), interleaved in blocks; rank 0
prints mean ± std and the share of a step that sync_every = 1, 10 and 50 cost.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls import distributed  # noqa: E402
from imgcls.config import load_config  # noqa: E402
from imgcls.models import build_model  # noqa: E402

BLOCKS, SYNCS_PER_BLOCK, STEPS_PER_BLOCK = 5, 200, 10


def main() -> None:
    info = distributed.init_distributed("cpu", always_init=True)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/fashion_mnist.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (128,))
    flags = torch.zeros(2, dtype=torch.float64)

    def step(ddp=ddp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ddp(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync_ms, step_ms = [], []
    for _ in range(BLOCKS):
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(SYNCS_PER_BLOCK):
            distributed.all_reduce(flags.clone(), "max").tolist()
        sync_ms.append((time.perf_counter() - start) / SYNCS_PER_BLOCK * 1e3)
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(STEPS_PER_BLOCK):
            step()
        step_ms.append((time.perf_counter() - start) / STEPS_PER_BLOCK * 1e3)
    if info.is_main:
        s, t = statistics.fmean(sync_ms), statistics.fmean(step_ms)
        print(f"{info.world_size} ranks, backend {info.backend}, torch {torch.__version__}, {BLOCKS} blocks of "
              f"{SYNCS_PER_BLOCK} syncs and {STEPS_PER_BLOCK} steps")
        print(f"sync (all-reduce of 2 floats + host read): {s:.3f} ± {statistics.stdev(sync_ms):.3f} ms")
        print(f"step (fast_cnn 16-64-128, batch 128/rank, bf16): {t:.1f} ± {statistics.stdev(step_ms):.1f} ms")
        for every in (1, 10, 50):
            print(f"sync_every={every}: {100 * s / every / t:.3f}% of step time")
    del step, ddp
    distributed.shutdown()


if __name__ == "__main__":
    main()
