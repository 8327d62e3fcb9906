"""The entry points as a user meets them: --help for each, and a user's mistake as one line
(`error: ...`, exit code 2) with no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, read_line, without_aws

JOBS = ["train", "submit", "evaluate", "export", "quantize", "predict", "prune", "sweep", "status", "serve"]


def job(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", JOBS)
def test_every_job_has_help(name):
    out = job(name, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]


@pytest.mark.parametrize("name, args, line", [
    ("train", ["optim.lrr=3"], "error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("train", ["train.epochs=many"], "error: train.epochs: expected int, got 'many'"),
    ("evaluate", ["/nonexistent/best.pt"], "error: /nonexistent/best.pt: no such file or directory"),
    ("export", ["/nonexistent/best.pt"], "error: /nonexistent/best.pt: no such file or directory"),
    ("train", ["data.url=/nonexistent/ds"], "error: no shard manifest at /nonexistent/ds/manifest.json"),
    ("train", [], "error: data.url is empty: set data.url=PATH_OR_URL"),
    # enumerated keys are checked when the config is read, not at first use on a queued job's ranks
    ("train", ["--print-config", "optim.name=adam"],
     "error: optim.name=adam: expected one of sgd, adamw; did you mean adamw?"),
    ("train", ["--print-config", "train.precision=fp8"],
     "error: train.precision=fp8: expected one of auto, bf16, fp16, fp32"),
    ("train", ["--print-config", "run.device=gpu"], "error: run.device=gpu: expected one of auto, cuda, cpu"),
    ("submit", ["--cluster", "debug", "data.url=/nonexistent/ds", "schedule.name=linear", "data.augment.crop=none"],
     "error: schedule.name=linear: expected one of cosine, step, constant"),
    ("submit", ["--cluster", "debug", "data.url=/nonexistent/ds", "data.augment.crop=random"],
     "error: data.augment.crop=random: expected one of auto, resized, pad, none"),
])
def test_a_users_mistake_is_one_line(name, args, line):
    out = job(name, *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error where CUDA is not usable")
@pytest.mark.parametrize("name, args", [("predict", ["best.pt", "cat.png"]), ("evaluate", ["best.pt"]),
                                        ("serve", ["best.pt", "--port", "1"])])
def test_inference_on_cuda_without_cuda_is_one_line(name, args):
    """--device cuda insists, as training's run.device=cuda does, before any file is read."""
    out = job(name, *args, "--device", "cuda")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: --device cuda, but CUDA is not usable here (torch.cuda.is_available() is False"), out.stderr


def test_a_split_that_does_not_exist_is_one_line(bands_checkpoint):
    out = job("evaluate", bands_checkpoint, "--split", "tset")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "split 'tset' not in manifest (has ['test', 'train', 'val'])" in out.stderr.strip().splitlines()[-1]


def test_print_config_round_trips_and_overrides_go_anywhere(tmp_path):
    out = job("train", "train.epochs=3", "--print-config", "optim.lr=0.2", "data.url=data/mine")
    assert out.returncode == 0, out.stderr[-2000:]
    (tmp_path / "printed.yaml").write_text(out.stdout)
    again = job("train", "--config", str(tmp_path / "printed.yaml"), "--print-config")
    assert again.returncode == 0 and again.stdout == out.stdout
    import yaml

    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["epochs"] == 3 and printed["optim"]["lr"] == 0.2
    assert printed["data"]["url"] == str(REPO / "data" / "mine")  # relative paths are stored absolute


def test_a_shards_folder_in_the_working_directory_does_not_shadow_the_cli(tmp_path):
    (tmp_path / "shards" / "train").mkdir(parents=True)  # a user's output folder, the natural name
    out = subprocess.run([sys.executable, "-m", "shards", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "build" in out.stdout and out.stdout.startswith("usage: python -m shards "), \
        out.stderr[-2000:]


@pytest.mark.parametrize("name", ["evaluate", "export", "quantize", "predict"])
def test_the_output_option_is_called_output_everywhere(name):
    from tests.conftest import job as run_in_process

    stdout, _, code = run_in_process(name, "--help")
    assert code in (0, None) and "--output OUTPUT" in stdout  # torch's @record turns exit 0 into None
    assert "--out " not in stdout and "--out\n" not in stdout


def test_the_old_output_name_still_works():
    from tests.conftest import job as run_in_process

    _, stderr, code = run_in_process("export", "/nonexistent/best.pt", "--out", "/tmp/x.onnx")
    assert code == 2 and stderr.strip() == "error: /nonexistent/best.pt: no such file or directory"


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("5:30", 6), ("0:30", 1), ("02:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("2-00:00:01", 2881),
])
def test_slurm_time_takes_what_sbatch_takes(text, minutes):
    from jobs.slurm_args import parse_slurm_time

    assert parse_slurm_time(text) == minutes  # seconds round up to a minute, as SLURM's do


@pytest.mark.parametrize("text", ["1h", "", "-5", "1-2-3", "1:2:3:4", "0", "0-0:00", "1-", "a-1", "1:x"])
def test_a_bad_slurm_time_is_one_line(text):
    from tests.conftest import job as run_in_process

    for name in ("submit", "sweep"):
        _, stderr, code = run_in_process(name, "--time", text, "--cluster", "debug")
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("error: argument --time: ") and "D-HH:MM:SS" in stderr, stderr


def all_parsers():
    """(name, parser) for every tool in jobs/ and every shards subcommand."""
    import argparse
    import importlib

    import shards.cli

    found = [(name, importlib.import_module(f"jobs.{name}").build_parser()) for name in JOBS]
    found.append(("shards", shards.cli.parser()))
    for name, parser in list(found):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


def test_every_option_has_help_that_shows_its_default():
    import argparse

    missing = []
    for name, parser in all_parsers():
        parser.format_help()  # every %(default)s and %(choices)s must expand
        for action in parser._actions:
            if (isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
                    or action.help == argparse.SUPPRESS):
                continue
            flag = action.nargs == 0  # store_true/false/const: present or not
            valued = action.default not in (None, [], argparse.SUPPRESS) and not flag
            if not action.help:
                missing.append(f"{name} {action.dest}: no help")
            elif valued and "default" not in action.help:
                missing.append(f"{name} {action.dest}: default {action.default!r} not shown")
    assert missing == []


def test_an_unknown_model_is_one_line_with_a_did_you_mean(bands_dataset, tmp_path):
    from tests.conftest import BASE_RUN, launch

    out = launch(["--config", "", f"data.url={bands_dataset}", f"run.dir={tmp_path / 'run'}", *BASE_RUN,
                  "model.name=resnt18"], nproc=2, check=False)
    assert out.returncode != 0 and "imgcls/models/" not in out.stderr, out.stderr[-3000:]  # torchrun's own follows
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr  # rank 0 only
    assert lines[0].startswith("error: model.name: unknown model 'resnt18'; did you mean resnet18, ")
    assert "traceback : error: model.name: unknown model" in out.stderr  # torchrun's summary names it


def test_object_store_mistakes_are_one_line_with_a_hint(tmp_path):
    """s3:// with no credentials fails at once; with credentials but a closed endpoint, or no
    endpoint at all (AWS's own, unreachable here), it fails after the storage retry budget
    (60 s), not later. Each is one line naming the URL, with what to set. The three run at once."""
    import time

    base = without_aws(tmp_path)
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    checkpoint = "s3://no-such-bucket/run/checkpoints/best.pt"
    cases = {
        "no credentials": (["evaluate", checkpoint], base,
                           f"error: {checkpoint}.sha256: no credentials for the object store: set AWS_ACCESS_KEY_ID "
                           "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"),
        "closed endpoint": (["train", "--config", "", "data.url=s3://no-such-bucket/data",
                             f"run.dir={tmp_path / 'run'}", "track.wandb=disabled"],
                            {**base, **keys, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
                            "error: s3://no-such-bucket/data/manifest.json: storage unreachable for "),
        "no endpoint": (["evaluate", checkpoint], {**base, **keys},
                        f"error: {checkpoint}.sha256: storage unreachable for "),
    }
    hints = {"closed endpoint": "is the store running there? Check AWS_ENDPOINT_URL",
             "no endpoint": "that is AWS's own endpoint: for another S3 store (MinIO, Ceph, ...) set AWS_ENDPOINT_URL"}
    start = time.monotonic()
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "jobs" / f"{args[0]}.py"), *args[1:]], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, env, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=150)
        errors = [line for line in stderr.splitlines() if not line.startswith(tuple("0123456789"))]  # not log lines
        assert proc.returncode == 2 and len(errors) == 1, (name, stderr[-3000:])
        assert errors[0].startswith(cases[name][2]) and hints.get(name, "") in errors[0], (name, errors[0])
        if name == "no credentials":
            assert time.monotonic() - start < 30, "no credentials must fail at once, not after retries"
    assert time.monotonic() - start < 120  # the retry budget, then the end: no hang


def test_the_shards_cli_gives_the_same_object_store_hints(tmp_path):
    """python -m shards words storage errors as the jobs do (shardio.errors): no credentials
    fails at once; a closed endpoint, which build does not retry, fails after botocore's own
    retries. One line naming the URL and what to set, exit code 2, no traceback."""
    import numpy as np

    np.savez(tmp_path / "tiny.npz", x=np.zeros((12, 4, 4), np.uint8), y=np.arange(12) % 3)
    base = without_aws(tmp_path)
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    url = "s3://no-such-bucket/data"
    no_credentials = f"error: {url}: no credentials for the object store: set AWS_ACCESS_KEY_ID and " \
                     "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    cases = {
        "build, no credentials": (["build", "tiny.npz", url, "--no-progress"], base, no_credentials),
        "verify, no credentials": (["verify", url, "--no-progress"], base, no_credentials),
        "inspect, no credentials": (["inspect", url], base, no_credentials),
        "build, closed endpoint": (["build", "tiny.npz", url, "--no-progress"],
                                   {**base, **keys, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
                                   f"error: {url}: Could not connect to the endpoint URL: \"http://127.0.0.1:1/"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "shards", *args],
                                    cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, env, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, (name, stderr[-3000:])
        assert stderr.startswith(cases[name][2]), (name, stderr)
        if "closed endpoint" in name:
            assert stderr.rstrip().endswith("; is the store running there? Check AWS_ENDPOINT_URL "
                                            "(or the endpoint in fsspec config)"), stderr


def test_unreachable_storage_says_so_at_once_instead_of_looking_like_a_hang(tmp_path):
    """verify retries the manifest read for 60 s; the first failed attempt already says what
    is wrong and for how long it will retry."""
    import time

    env = {**without_aws(tmp_path), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "shards", "verify", "s3://no-such-bucket/data"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc, timeout=30, stream=proc.stderr)
    finally:
        proc.kill()
        proc.communicate()
    assert time.monotonic() - start < 30
    assert line.startswith("WARNING: s3://no-such-bucket/data/manifest.json: storage unreachable "
                           "(EndpointConnectionError: Could not connect to the endpoint URL: ") and \
        line.endswith("; retrying for up to 60 s (the storage retry budget)"), line
