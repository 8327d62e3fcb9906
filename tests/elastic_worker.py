"""Run under torchrun: read epoch 1 of a shard dataset's train split on this world size, from
a saved reader state (a JSON file) or from the start, up to a stop position (-1: the end).
Every rank checks its batch positions; rank 0 gathers every rank's keys over the group and
writes them with its reader state, as a checkpoint would, to OUT (JSON).

    elastic_worker.py URL WORKERS BATCH_SIZE STOP STATE|- OUT
"""
import json
import sys

from imgcls import distributed
from imgcls.config import DataConfig
from imgcls.data import ShardReader

SEED, EPOCH = 11, 1


def main(url: str, workers: int, batch_size: int, stop: int, state: str, out: str) -> None:
    dist = distributed.init_distributed(device="cpu")
    reader = ShardReader(DataConfig(url=url, batch_size=batch_size, num_workers=workers), "train",
                         rank=dist.rank, world_size=dist.world_size, seed=SEED)
    if state == "-":
        reader.set_epoch(EPOCH)
    else:
        with open(state) as f:
            reader.load_state_dict(json.load(f))
    stop = reader.batches_per_epoch() if stop < 0 else stop
    keys = []
    for batch in reader.loader():
        if reader.position == stop:
            break
        if batch["position"] != reader.position:
            raise RuntimeError(f"rank {dist.rank}: got batch {batch['position']}, expected {reader.position}")
        keys.append(batch["key"])
        reader.position += 1
    ranks = distributed.all_gather_object(keys)
    if dist.is_main:
        with open(out, "w") as f:
            json.dump({"keys": ranks, "state": reader.state_dict(), "batches": reader.batches_per_epoch()}, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
