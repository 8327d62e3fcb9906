"""jobs/status.py --runs: every run dir under a path or URL, however it was started, with its
state from what training left there (lease, metrics, config)."""
from __future__ import annotations

import json

from tests.conftest import BASE_RUN, job, read_line, start_lease_holder, train_in_process


def rows_by_name(root: str) -> dict[str, dict]:
    stdout, stderr, rows = job("status", "--runs", root, "--json")
    assert json.loads(stdout) == rows, stderr
    return {row["name"]: row for row in rows}


def test_status_lists_runs_started_without_submit(bands_dataset, tmp_path, s3_bucket):
    runs = tmp_path / "runs"
    # plain `python jobs/train.py` runs, in this process: one finished, one stopped by max_steps in its second epoch
    for name, extra in (("finished", []), ("stopped", ["train.epochs=2", "train.max_steps=50"])):
        train_in_process(runs / name, bands_dataset, *BASE_RUN, f"run.name={name}", *extra)
    holder = start_lease_holder(str(runs / "live"), "4242", timeout_s=30)  # a job that has just started
    try:
        assert read_line(holder) == "acquired"
        rows = rows_by_name(str(runs))
    finally:
        holder.kill()
        holder.wait()
    assert set(rows) == {"finished", "stopped", "live"}
    assert rows["live"]["state"] == "running"
    finished, stopped = rows["finished"], rows["stopped"]
    assert (finished["state"], finished["epoch"], finished["epochs"]) == ("finished", 1, 1)
    assert 0.25 < finished["best_val_acc"] <= 1 and finished["step"] > 0
    assert (stopped["state"], stopped["epoch"], stopped["epochs"], stopped["step"]) == ("stopped", 1, 2, 50)
    assert rows_by_name(str(runs))["live"]["state"] == "ended"  # its holder was killed: no live lease

    stdout, _, _ = job("status", "--runs", str(runs))  # the table
    assert any(line.split()[:2] == ["finished", "finished"] for line in stdout.splitlines()), stdout

    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).put(str(runs / "finished"), f"{s3_bucket}/runs/finished",
                                                    recursive=True)
    on_s3 = rows_by_name(f"{s3_bucket}/runs")["finished"]
    assert on_s3 == {**finished, "run_dir": f"{s3_bucket}/runs/finished"}


def test_status_of_a_missing_dir_is_one_line(tmp_path):
    _, stderr, code = job("status", "--runs", str(tmp_path / "none"))
    assert code == 2 and stderr == f"error: {tmp_path / 'none'}: no such file or directory\n"
