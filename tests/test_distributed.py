"""The device and the process group: what init_distributed asks for on CUDA (checked with CUDA
patched in, since this machine has none), the one-line error for run.device=cuda without CUDA
(real torchrun processes), and that every collective goes through imgcls.distributed."""
from __future__ import annotations

import ast
import datetime

import pytest
import torch
import torch.distributed as dist

from imgcls import distributed
from tests.conftest import BASE_RUN, REPO, launch


def test_cuda_gets_one_group_for_both_devices_and_cpu_gets_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    info = distributed.init_distributed("auto", timeout_minutes=2.5)
    assert info.device == torch.device("cuda", 3)
    (kw,) = calls
    assert kw["backend"] == "cpu:gloo,cuda:nccl"
    assert kw["device_id"] == torch.device("cuda", 3)
    assert kw["timeout"] == datetime.timedelta(minutes=2.5) and (kw["rank"], kw["world_size"]) == (3, 4)

    calls.clear()
    info = distributed.init_distributed("cpu")
    assert info.device == torch.device("cpu") and calls[0]["backend"] == "gloo" and calls[0]["device_id"] is None


def test_a_lone_process_joins_a_real_group_when_asked(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed("cpu", always_init=True)
    try:
        assert dist.is_initialized() and info.backend == "gloo" and not info.enabled
        flags = distributed.all_reduce(torch.tensor([1.0, 5.0]), "max")
        assert flags.tolist() == [1.0, 5.0] and distributed.all_gather_object("x") == ["x"]
    finally:
        distributed.shutdown()


def test_unknown_device_is_refused():
    with pytest.raises(distributed.DeviceError, match="run.device='tpu'"):
        distributed.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is not usable")
def test_asking_for_cuda_without_cuda_is_one_line_from_rank_0(bands_dataset, tmp_path):
    out = launch([f"data.url={bands_dataset}", f"run.dir={tmp_path / 'run'}", *BASE_RUN, "run.device=cuda"],
                 check=False)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: run.device=cuda, but CUDA is not usable here (torch.cuda.is_available() is False: "
                      f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}; check the driver "
                      "and the wheel, or use run.device=auto|cpu)"]
    assert "imgcls/distributed.py" not in out.stderr  # torchrun's own summary follows, but no trace of ours
    assert "traceback : error: run.device=cuda, but CUDA is not usable" in out.stderr  # the summary names it


def test_every_collective_goes_through_imgcls_distributed():
    """Only distributed.py touches torch.distributed: with one helper for every collective, a
    CPU tensor goes to gloo and a CUDA tensor to NCCL through the same call."""
    offenders = []
    for path in sorted((REPO / "imgcls").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py")):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("torch.distributed")
                          and not n.startswith("torch.distributed.elastic")]
    assert offenders == []
    trainer = (REPO / "imgcls" / "trainer.py").read_text()
    assert "distributed.all_reduce(" in trainer and "all_reduce_sum" not in trainer


def test_gpu_check_runs_its_checks_on_cpu(tmp_path):
    """bench/gpu_check.py --device cpu: the script that will run on a GPU machine, so it never rots."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--output",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {row["check"]: row for row in report["checks"]}
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert {"train bf16 python", "train fp16 torchrun", "stop + resume bitwise", "evaluate",
            "export onnx"} <= set(checks)
    assert "backend gloo" in checks["train bf16 torchrun"]["startup"]  # a group at world size 1
    assert checks["stop + resume bitwise"]["differing_tensors"] == []
    # the input path a user meets: source JPEGs, RandomResizedCrop in the workers, against in-memory images
    (jpeg,) = [row for name, row in checks.items() if name.startswith("input: 32px from source JPEGs")]
    assert jpeg["jpeg_images_per_s"][0] > 0 and jpeg["jpeg_vs_in_memory"] > 0 and jpeg["num_workers"] >= 1
    speed = next(row for name, row in checks.items() if name.startswith("speed"))
    assert speed["bare_images_per_s"][0] > 0 and speed["trainer_images_per_s"][0] > 0


def test_gpu_check_fits_its_time_budget_and_carries_what_the_device_lacks():
    """The GPU machine is lent for ~15 minutes: the check's docstring gives its budget, and the
    prepare script names the wheels (the device venv lacks tenacity and simplejpeg)."""
    doc = (REPO / "bench" / "gpu_check.py").read_text()
    prepare = (REPO / "bench" / "gpu_check_prepare.sh").read_text()
    assert "Time budget" in doc and "8 minutes on one H100" in doc
    assert "tenacity==" in prepare and "simplejpeg==" in prepare and "--python-version 3.12" in prepare
    command = next(line for line in prepare.splitlines() if "--no-index" in line)
    assert ".gpu-wheels/*.whl" in command and "bench/gpu_check.py" in command
    assert "/.gpu-wheels/" in (REPO / ".gitignore").read_text().splitlines()


def test_the_gpu_docs_show_no_gpu_number_they_did_not_measure():
    readme = (REPO / "docs" / "gpus.md").read_text()
    startup = [line for line in readme.splitlines() if line.startswith("device cuda")]
    assert startup and all("GPU NAME" in line for line in startup)  # a format with placeholders
    assert "What ran on a GPU: nothing yet." in readme
