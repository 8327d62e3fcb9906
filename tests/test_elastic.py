"""Elastic resume under real torchrun processes (gloo) with real DataLoader workers: an epoch
stopped on 2 ranks and resumed on 1 or 3 ranks, with other worker counts, reads every
training sample exactly once, less the documented remainder (docs/design.md, "Reader order")."""
from __future__ import annotations

import json

import pytest

from imgcls.data import read_manifest
from tests.conftest import REPO, launch

STOP = 9        # batches per rank read before the stop
BATCH = 16


def read(url, nproc: int, workers: int, out, stop: int = -1, state=None, batch_size: int = BATCH) -> dict:
    """Run tests/elastic_worker.py on `nproc` ranks; what rank 0 wrote."""
    if state is not None:
        (out.parent / f"{out.stem}.state.json").write_text(json.dumps(state))
        state = out.parent / f"{out.stem}.state.json"
    launch([url, str(workers), str(batch_size), str(stop), str(state or "-"), str(out)], nproc,
           script=REPO / "tests" / "elastic_worker.py")
    return json.loads(out.read_text())


def keys(run: dict) -> list[str]:
    return [k for rank in run["keys"] for batch in rank for k in batch]


@pytest.fixture(scope="module")
def stopped(bands_dataset, tmp_path_factory):
    """Epoch 1 on 2 ranks x 2 workers, stopped after STOP batches per rank."""
    return read(bands_dataset, 2, 2, tmp_path_factory.mktemp("stopped") / "run.json", stop=STOP)


@pytest.mark.parametrize("nproc,workers,batch_size", [(1, 3, BATCH), (3, 1, 8)])
def test_stopped_on_two_ranks_resumed_on_another_count_reads_every_sample_once(
        bands_dataset, stopped, tmp_path, nproc, workers, batch_size):
    assert stopped["state"]["position"] == STOP and stopped["state"]["samples"] == 2 * STOP * BATCH
    resumed = read(bands_dataset, nproc, workers, tmp_path / "resumed.json", state=stopped["state"],
                   batch_size=batch_size)
    assert resumed["state"]["consumed"] == [{"world_size": 2, "workers": 2, "batch_size": BATCH, "batches": STOP}]
    assert {len(rank) for rank in resumed["keys"]} == {resumed["batches"]}  # equal batches per rank
    seen = keys(stopped) + keys(resumed)
    assert len(seen) == len(set(seen)), "a sample was read twice in the epoch"
    total = read_manifest(bands_dataset)["splits"]["train"]["count"]
    left = total - 2 * STOP * BATCH
    assert len(seen) == total - left % (nproc * batch_size)  # only the documented remainder is missing
    assert resumed["state"]["samples"] == len(seen)


def test_same_layout_resume_reads_exactly_the_uninterrupted_tail(bands_dataset, stopped, tmp_path):
    whole = read(bands_dataset, 2, 2, tmp_path / "whole.json")
    resumed = read(bands_dataset, 2, 2, tmp_path / "resumed.json", state=stopped["state"])
    assert resumed["state"]["consumed"] == []
    for rank in range(2):
        assert stopped["keys"][rank] + resumed["keys"][rank] == whole["keys"][rank]
