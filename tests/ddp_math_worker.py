"""Run under torchrun: N optimizer steps of the trainer's forward_backward on fixed global
batches, split as (ranks x micro-batches) given on the command line; rank 0 saves the weights."""
import contextlib
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from imgcls import distributed
from imgcls.config import Config, ModelConfig
from imgcls.models import build_model
from imgcls.optim import make_optimizer
from imgcls.trainer import MicroBatch, forward_backward

GLOBAL_BATCH = 32


def main(accum: int, steps: int, out: str) -> None:
    dist = distributed.init_distributed()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="simple_cnn", width=8, norm="none"), num_classes=4, in_channels=1)
    ddp = DDP(model) if dist.enabled else model
    cfg = Config()
    cfg.optim.weight_decay = 1e-4
    optimizer = make_optimizer(cfg, model, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = torch.Generator().manual_seed(1)
    per_rank = GLOBAL_BATCH // dist.world_size
    for _ in range(steps):
        images = torch.randn(GLOBAL_BATCH, 1, 12, 12, generator=data)
        labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=data)
        mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        chunks = zip(images[mine].chunk(accum), labels[mine].chunk(accum))
        micro_batches = [MicroBatch(x, y) for x, y in chunks]
        forward_backward(ddp, micro_batches, scaler, contextlib.nullcontext, distributed_enabled=dist.enabled)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if dist.is_main:
        torch.save(model.state_dict(), out)
    del ddp
    distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
