"""`cory rm train`: a Bradley-Terry reward model from sentiment pairs, then used as a task reward."""

import json

from conftest import micro_overrides
from cory.cli import main


def test_reward_model_learns_pairs_and_drives_training(tmp_path, capsys, micro_lm, micro_rm):
    pairs = tmp_path / "pairs.jsonl"
    assert main(["rm", "pairs", "--n", "800", "--out", str(pairs)]) == 0
    rm_dir = tmp_path / "rm"
    assert main(["rm", "train", "--data", str(pairs), "--output-dir", str(rm_dir), "--base", "cory:micro-reviews",
                 "--epochs", "3", "--lr", "3e-3"]) == 0
    info = json.loads((rm_dir / "reward_model.json").read_text())
    assert info["eval_pairs"] == 80
    assert info["eval_accuracy"] >= 0.9, info
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"task.reward": str(rm_dir)})) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["reward_mean"], float) for r in rows)


def test_bad_pair_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    assert main(["rm", "train", "--data", str(bad), "--output-dir", str(tmp_path / "x")]) == 2
    assert "missing key(s) rejected" in capsys.readouterr().err
