"""Every bad input named by the CLI contract fails before any work: one line, exit 2, no traceback."""

import subprocess
import sys

import pytest

from cory.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.iteratons=3"], "unknown config key 'train.iteratons'; valid keys in 'train': iterations"),
        (["train.iterations=lots"], "bad value for config key 'train.iterations'"),
        (["algo.name=ppo9"], "bad value for config key 'algo.name'"),
        (["model.name=cory:nope"], "unknown model 'cory:nope'; the zoo has: cory:"),
        (["model.name=./no/such/folder"], "model folder not found: ./no/such/folder"),
        (["task.prompt_file=/no/such/prompts.jsonl"], "prompt file not found: /no/such/prompts.jsonl"),
        (["task.reward=cory:not-a-model"], "unknown model 'cory:not-a-model'"),
        (["task.reward=no_such_module_xyz:score"], "cannot import module 'no_such_module_xyz'"),
        (["oops"], "override 'oops' is not of the form section.key=value"),
    ],
)
def test_train_bad_input_is_one_clear_line(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--output-dir", str(out), *overrides)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "no work may start on bad input"


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "r"))
    assert code == 2 and "config file not found" in err and len(err.splitlines()) == 1


def test_unknown_zoo_name(capsys):
    code, err = run_cli(capsys, "zoo", "build", "cory:nope")
    assert code == 2 and "unknown model 'cory:nope'" in err


def test_report_on_missing_dir(tmp_path, capsys):
    code, err = run_cli(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "run directory not found" in err


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cory", "train", "--output-dir", str(tmp_path / "r"), "train.batchsize=4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]
    ] and "unknown config key 'train.batchsize'" in proc.stderr
    assert "Traceback" not in proc.stderr
