"""Distributed init from the torchrun env or the SLURM env: one code path for both.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per
GPU, no torchrun inside) we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, take the master
from the first host of the node list and derive the port from the job id, so every task of
a job agrees without talking first. Plain `python` is a single process with no group, unless
`always_init` asks for one (the GPU check runs the NCCL+gloo collectives at world size 1).

On CUDA the group serves both devices, `cpu:gloo,cuda:nccl` (as torchtitan does): CUDA tensors
go through NCCL, CPU tensors (step flags, object gathers, evaluation totals) through gloo.
Every collective of the library goes through the helpers at the end of this module.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cuda", "cpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used (e.g. run.device=cuda where CUDA is not usable)."""


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
        """Several processes: DDP and no_sync are needed."""
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return dist.get_backend() if dist.is_initialized() else "none"


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


def job_port(job_id: str | int) -> int:
    """The rendezvous port every task of a job derives from its id, without talking first:
    in 20000-31999, below Linux's ephemeral ports (32768-60999), which any outgoing
    connection on the node may hold (one did in CI: EADDRINUSE, and the other rank waited)."""
    return 20000 + int(str(job_id).split("_")[0]) % 12000


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's env, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def resolve_device(setting: str, local_rank: int = 0, key: str = "run.device=") -> torch.device:
    """`run.device` (or a tool's `--device `, as `key` names it): auto takes this rank's GPU
    when CUDA is usable, else the CPU; cuda insists (a one-line error rather than a silent CPU run)."""
    if setting not in DEVICES:
        raise DeviceError(f"{key}{setting!r}: expected one of {', '.join(DEVICES)}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{key}cuda, but CUDA is not usable here (torch.cuda.is_available() is False: "
                          f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}; "
                          f"check the driver and the wheel, or use {key}auto|cpu)")
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          "start one process per GPU")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """One group for both devices on CUDA (NCCL has no CPU tensors); gloo alone on CPU, where
    the NCCL part cannot be created."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", timeout_minutes: float = 10, always_init: bool = False,
                     device_key: str = "run.device=") -> DistInfo:
    """Pick the device and join the process group (when there are several processes, or
    `always_init`). `timeout_minutes` bounds every collective: a rank that never arrives
    fails the job instead of hanging it."""
    rank, world_size, local_rank = env_ranks()
    info = DistInfo(rank, world_size, local_rank, resolve_device(device, local_rank, device_key))
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if (world_size > 1 or always_init) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            if "SLURM_JOB_ID" in os.environ:  # srun without torchrun
                os.environ["MASTER_ADDR"] = slurm_master_addr()
                os.environ["MASTER_PORT"] = str(job_port(os.environ["SLURM_JOB_ID"]))
            else:  # a lone process that asked for a group
                os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        dist.init_process_group(
            backend=backend_for(info.device), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=info.device if info.device.type == "cuda" else None)
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Call only after the DDP model is deleted: destroying the group under a live DDP
    reducer aborts short runs at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- the collectives: every one the library makes goes through these ---------------------
def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks; a no-op without a group. The tensor may live on the CPU (gloo)
    or the GPU (NCCL): the group picks the backend by the tensor's device."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
