"""Progress of long work outside training (evaluation, export checks, calibration): plain log
lines off a terminal, a tqdm bar on one."""
from __future__ import annotations

import logging

from imgcls.progress import ProgressReport, TaskProgress
from tests.conftest import job


def test_task_progress_writes_plain_lines_off_a_terminal(caplog, capsys):
    caplog.set_level(logging.INFO, logger="imgcls.progress")
    with TaskProgress("evaluate test", 10, every_s=0, terminal=False) as progress:
        for _ in range(5):
            progress.update(2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and lines[0].startswith("evaluate test: 2/10 images, ") and "ETA " in lines[0]
    assert lines[-1].startswith("evaluate test: 10 images in 0m0")
    assert "\r" not in capsys.readouterr().err


def test_training_progress_writes_no_line_before_the_first_loss(caplog):
    """A first step slower than every_s used to log `loss nan`: nothing is known yet, so no line."""
    caplog.set_level(logging.INFO, logger="imgcls.progress")
    report = ProgressReport(total=10, initial=0, epochs=1, every_s=0, terminal=False)
    report.update(1)
    report.update(2)
    assert caplog.records == []
    report.metrics(0.6931, 512.0)
    report.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("step 3/10 (epoch 1/1), loss 0.6931, 512 img/s, ETA "), lines


def test_task_progress_draws_a_bar_on_a_terminal(caplog, capsys):
    caplog.set_level(logging.INFO, logger="imgcls.progress")
    with TaskProgress("ONNX calibration", 4, terminal=True) as progress:
        progress.update(4)
    err = capsys.readouterr().err
    assert "ONNX calibration" in err and "4/4" in err and "\r" in err
    assert caplog.records == []  # the bar instead of log lines


def test_evaluate_export_and_quantize_report_their_progress(bands_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imgcls.progress")
    _, stderr, result = job("evaluate", bands_checkpoint, "--output", str(tmp_path / "eval"))
    assert isinstance(result, dict), stderr[-3000:]
    _, stderr, code = job("export", bands_checkpoint, "--output", str(tmp_path / "m.onnx"), "--check-samples", "0")
    assert code == 0, stderr[-3000:]
    _, stderr, result = job("quantize", str(tmp_path / "m.onnx"), "--calibration-samples", "64", "--reps", "1")
    assert isinstance(result, dict), stderr[-3000:]
    ends = [r.getMessage().split(" in ")[0] for r in caplog.records if r.name == "imgcls.progress"]
    assert ends == ["evaluate test: 200 images",  # the bands test split
                    "read val samples: 400 images",  # export's reference behaviour on val
                    "read test samples: 200 images", "check onnx against pytorch: 200 images",  # export's check
                    "read train samples: 64 images", "ONNX calibration: 64 images",  # quantize
                    "read test samples: 200 images", "fp32 accuracy: 200 images", "int8 accuracy: 200 images"]
