"""Every algorithm and CORY on the real model (cory:smollm2-135m-instruct): one short iteration
each, chat prompts, the VADER reward. They check that the 135M model goes through the whole loop:
the trainer's recomputed log-probs match the sampler's, the weights move and stay finite."""

import json

import pytest
import torch
from safetensors import safe_open

from cory.cli import main

PROBE = "model.layers.0.self_attn.q_proj.weight"


def real_overrides(model, **extra) -> list[str]:
    base = {
        "model.name": str(model),
        "task.reward": "vader",
        "task.reward_on": "response",
        "task.chat_template": True,
        "task.num_train_prompts": 8,
        "task.num_eval_prompts": 1,
        "kl.exact_accounting": False,
        "generation.max_new_tokens": 8,
        "train.batch_size": 2,
        "train.iterations": 1,
        "train.log_with": "[]",
        "train.progress": False,
        "eval.samples_per_prompt": 1,
        "algo.lr": 1e-5,
    }
    if extra.get("algo.name") in ("grpo", "rloo"):  # only group algorithms take a group size
        base["algo.group_size"] = 2
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_arithmetic_chat_prompt_gets_a_worked_answer_the_parser_reads(smollm2):
    """The one-shot chat prompt makes the instruct model answer in the example's format, ending in a
    number, and stop at its end of turn."""
    from cory.config import load_config
    from cory.policy import Policy
    from cory.tasks import make_task
    from cory.build import eval_params
    from cory.corpora.arithmetic import last_number

    cfg = load_config(overrides=["task.name=arithmetic", "task.chat_template=true", "task.num_train_prompts=4",
                                 "task.num_eval_prompts=2", "generation.max_new_tokens=40", "eval.temperature=0"])
    task = make_task(cfg.task)
    policy = Policy.from_pretrained(str(smollm2))
    gen = policy.generate(task.eval_prompts, eval_params(cfg))
    assert gen.finished.all()
    assert all("The answer is" in t and last_number(t) is not None for t in gen.texts), gen.texts
    assert set(task.score(task.eval_prompts, gen.texts)) <= {0.0, 1.0}


def probe(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(PROBE)


@pytest.mark.parametrize("algo", ["reinforce", "a2c", "ppo", "grpo", "rloo"])
def test_every_algorithm_trains_the_real_model(tmp_path, smollm2, algo):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out)] + real_overrides(smollm2, **{"algo.name": algo})) == 0
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["logprob_gap"] < 1e-4
    assert all(v == v for v in row.values() if isinstance(v, float))
    before, after = probe(smollm2), probe(out / "final")
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize("shared", [False, True])
def test_cory_trains_two_real_agents(tmp_path, smollm2, shared):
    out = tmp_path / "run"
    extra = {"cory.enabled": True, "model.lora.r": 4 if shared else 0, "algo.name": "reinforce"}
    assert main(["train", "--output-dir", str(out)] + real_overrides(smollm2, **extra)) == 0
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["pioneer/logprob_gap"] < 1e-4 and row["observer/logprob_gap"] < 1e-4
    before = probe(smollm2)
    for agent in ("a", "b"):
        after = probe(out / "agents" / agent)
        assert torch.isfinite(after).all() and not torch.equal(before, after)
