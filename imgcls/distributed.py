"""Distributed init from the torchrun env or the SLURM env: one code path for both.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per
GPU, no torchrun inside) we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, take the master
from the first host of the node list and derive the port from the job id, so every task of
a job agrees without talking first. Plain `python` is a single process with no group.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def expand_hostlist(nodelist: str) -> list[str]:
    """'n[1-3,7],gpu-a[01-02]' -> ['n1','n2','n3','n7','gpu-a01','gpu-a02'] (SLURM hostlist syntax)."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    try:  # scontrol knows every hostlist form; fall back to our parser off-cluster
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_hostlist(nodelist)[0]


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's env, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(timeout_minutes: float = 10) -> DistInfo:
    rank, world_size, local_rank = env_ranks()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank, world_size, local_rank, device)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # srun without torchrun
            os.environ["MASTER_ADDR"] = slurm_master_addr()
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None)
    return info


def shutdown() -> None:
    """Call only after the DDP model is deleted: destroying the group under a live DDP
    reducer aborts short runs at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
