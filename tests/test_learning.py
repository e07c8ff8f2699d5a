"""Learning, measured: every algorithm raises the mean reward on a fixed evaluation set, and PPO and
GRPO raise accuracy on the arithmetic task.

Tiny settings (test-size models, short responses, a few thousand samples) so the whole file stays
within the suite's time; the benchmarks run the same algorithms at full size.
"""

import json

import pytest

from conftest import micro_overrides
from cory.cli import main

SENTIMENT = {
    "train.iterations": 60,
    "train.batch_size": 16,
    "algo.lr": 2e-3,
    "kl.beta": 0.05,
    "task.num_eval_prompts": 32,
    "eval.samples_per_prompt": 4,
}
PER_ALGO = {
    "reinforce": {},
    "a2c": {},
    "ppo": {"algo.epochs": 2, "algo.minibatch_size": 8},
    "grpo": {"train.batch_size": 4, "algo.group_size": 4},
    # lr 1e-3 for RLOO: at 2e-3 seed 0 collapses its entropy and ends below the start (seeds 1-2 rise
    # +0.6); at 1e-3 seeds 0-2 rise by +0.39, +0.43, +0.50.
    "rloo": {"train.batch_size": 4, "algo.group_size": 4, "algo.lr": 1e-3},
    "dr_grpo": {"train.batch_size": 4, "algo.group_size": 4},
    "dapo": {"train.batch_size": 4, "algo.group_size": 4},
    "gspo": {"train.batch_size": 4, "algo.group_size": 4},
    "cispo": {"train.batch_size": 4, "algo.group_size": 4},
}
SEED = int(__import__("os").environ.get("CORY_LEARNING_SEED", "0"))
"""Seed of the learning runs (set CORY_LEARNING_SEED to check that the margin holds for others)."""
MARGIN = 0.25
"""Required rise of the mean positive logit; the evaluation's standard error is about 0.1."""


def evals(out):
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", list(PER_ALGO))
def test_every_algorithm_raises_sentiment_reward(tmp_path, micro_lm, micro_rm, algo):
    out = tmp_path / "run"
    settings = {**SENTIMENT, **PER_ALGO[algo], "algo.name": algo, "train.seed": SEED}
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **settings)) == 0
    first, last = evals(out)[0], evals(out)[-1]
    assert first["iteration"] == 0 and last["iteration"] == settings["train.iterations"]
    assert last["reward_mean"] > first["reward_mean"] + MARGIN, (first["reward_mean"], last["reward_mean"])



ARITHMETIC = {
    "model.name": "cory:micro-arith",
    "task.name": "arithmetic",
    "task.num_train_prompts": 2048,
    "task.num_eval_prompts": 128,
    "eval.samples_per_prompt": 4,
    "eval.temperature": 1.0,
    "generation.max_new_tokens": 24,
    "train.iterations": 120,
    "train.eval_every": 120,
}
ARITH_PER_ALGO = {
    "ppo": {"algo.lr": 5e-4, "train.batch_size": 64, "algo.epochs": 2, "algo.minibatch_size": 32, "kl.beta": 0.02},
    "grpo": {"algo.lr": 1e-3, "train.batch_size": 32, "algo.group_size": 4, "kl.beta": 0.01},
}
ARITH_MARGIN = 0.025
"""Required rise of held-out accuracy (512 samples at T=1, the same sampling seed before and after).
The model starts at 0.30; seeds 0-2 measured rises of +0.035 to +0.064. Almost all of it is the
easy tier (small numbers) growing surer of facts it half knew; the two-digit tier stays near 0."""


@pytest.mark.parametrize("algo", list(ARITH_PER_ALGO))
def test_ppo_and_grpo_raise_arithmetic_accuracy(tmp_path, micro_arith, algo):
    out = tmp_path / "run"
    settings = {**ARITHMETIC, **ARITH_PER_ALGO[algo], "algo.name": algo, "train.seed": SEED}
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **settings)) == 0
    first, last = evals(out)[0], evals(out)[-1]
    assert first["iteration"] == 0 and last["iteration"] == settings["train.iterations"]
    assert last["reward_mean"] > first["reward_mean"] + ARITH_MARGIN, (first["reward_mean"], last["reward_mean"])
