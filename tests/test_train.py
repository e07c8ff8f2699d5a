"""End-to-end training on the micro models: outputs, learning, exact resume, loading the result."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import micro_overrides
from cory.cli import main


def train_cli(out, tmp_path, *extra, resume=False):
    argv = ["train", "--output-dir", str(out)] + (["--resume"] if resume else []) + micro_overrides(tmp_path, **dict(e.split("=", 1) for e in extra))
    assert main(argv) == 0


def test_run_directory_has_everything(tmp_path, micro_lm, micro_rm):
    out = tmp_path / "run"
    train_cli(out, tmp_path, "train.iterations=3", "train.log_with=[tensorboard]")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"iteration", "reward_mean", "kl_mean", "entropy", "response_length", "beta"} <= set(r)
        assert r["logprob_gap"] < 1e-4  # behaviour log-probs agree with the trainer's recomputation
    assert list(out.glob("cory/**/events.out.tfevents*")), "TensorBoard events written through accelerate"
    assert (out / "final" / "config.json").exists() and (out / "summary.json").exists()
    assert main(["report", str(out)]) == 0
    assert (out / "plots" / "reward.png").stat().st_size > 1000 and (out / "plots" / "kl.png").exists()


def test_final_folder_loads_with_plain_transformers(tmp_path, micro_lm, micro_rm):
    out = tmp_path / "run"
    train_cli(out, tmp_path, "train.iterations=1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("the film was", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_resume_continues_exactly(tmp_path, micro_lm, micro_rm):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_cli(straight, tmp_path, "train.iterations=4", "train.checkpoint_every=2")
    train_cli(stopped, tmp_path, "train.iterations=2", "train.checkpoint_every=2")
    train_cli(stopped, tmp_path, "train.iterations=4", "train.checkpoint_every=2", resume=True)
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(stopped / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = (straight / "metrics.jsonl").read_text().splitlines()
    rows_b = (stopped / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]
    assert strip(rows_a) == strip(rows_b)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys, micro_lm, micro_rm):
    argv = ["train", "--output-dir", str(tmp_path / "empty"), "--resume"] + micro_overrides(tmp_path)
    assert main(argv) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_multi_turn_bandit_training_runs_whole_episodes(tmp_path, micro_lm, algo):
    """A review writer never answers ACTION=..., so every step is invalid: episodes still run to the
    horizon, each step executes a random arm and carries the -5 shaping penalty."""
    out = tmp_path / "run"
    extra = {"env.id": "cory/Bandit-v0", "env.kwargs": "{n_arms: 5, horizon: 4, history: 2, cot: false}",
             "env.eval_episodes": 3, "algo.name": algo, "train.batch_size": 3}
    train_cli(out, tmp_path, *[f"{k}={v}" for k, v in extra.items()])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["turns_per_episode"] == 4 for r in rows)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for e in evals:
        assert e["episode_length"] == 4 and e["valid_rate"] == 0.0
        assert abs(e["reward_mean"] - (e["env_return_mean"] - 5 * 4)) < 1e-6
        assert 0 < e["coverage_final"] <= 1 and e["regret_mean"] >= 0


def test_eval_and_zoo_list_commands(tmp_path, capsys, micro_lm, micro_rm):
    out = tmp_path / "run"
    train_cli(out, tmp_path, "train.iterations=1")
    capsys.readouterr()
    argv = ["eval", str(out / "final"), "--reference", "cory:micro-reviews", "--json"] + micro_overrides(tmp_path)
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 16 and {"reward_mean", "kl_mean", "eos_rate", "samples"} <= set(result)
    assert main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "cory:micro-reviews" in listing and "built" in listing and "cory:tiny-reviews" in listing
