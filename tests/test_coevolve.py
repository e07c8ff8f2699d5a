"""CORY's schedule: observer prompts, summed rewards, role exchange, optimizer state, algorithms."""

import filecmp

import pytest
import torch

from conftest import micro_overrides
from cory.coevolve import CoryRun
from cory.tasks.pioneer_observer import collective_rewards, observer_prompts, qa_prompt
from cory.config import load_config


def make_run(tmp_path, **extra):
    overrides = micro_overrides(tmp_path, **{"cory.enabled": True, "train.batch_size": 4, "generation.max_new_tokens": 6, **extra})
    return CoryRun(load_config(None, overrides), tmp_path / "run")


def test_templates_hold_the_pioneer_response():
    cont = observer_prompts(["The film"], [" was fine."], "continuation")[0]
    assert cont == 'I can make this sentence "The film was fine." more positive: The film'
    assert qa_prompt("Question: 2+2?\nAnswer:", " 4") == "Question: 2+2?\nReference: 4\nAnswer:"
    custom = observer_prompts(["P"], ["R"], "<{prompt}|{reference}>")[0]
    assert custom == "<P|R>"
    assert observer_prompts(["P"], ["R"], "continuation", observe=False) == ["P"]
    assert collective_rewards([1.0, 2.0], [10.0, 20.0], 1.0) == [11.0, 22.0]
    assert collective_rewards([1.0], [10.0], -0.5) == [-4.0]


def record_steps(run):
    """Wraps each agent's learner.step to record (agent, rollout prompts, responses, scores)."""
    calls = []
    for name, agent in run.agents.items():
        original = agent.learner.step

        def step(rollout, iteration, generator, _name=name, _orig=original):
            calls.append({"agent": _name, "iteration": iteration, "prompts": list(rollout.prompts),
                          "responses": list(rollout.responses), "scores": rollout.scores.tolist()})
            return _orig(rollout, iteration, generator)

        agent.learner.step = step
    return calls


def test_observer_sees_pioneer_and_both_get_the_sum(tmp_path, micro_lm, monkeypatch):
    run = make_run(tmp_path, **{"task.reward": "rewards_for_tests:letter_count"})
    calls = record_steps(run)
    run._start(resume=False)
    run.iterate()
    pioneer, observer = calls
    assert (pioneer["agent"], observer["agent"]) == ("a", "b")
    for p_resp, o_prompt in zip(pioneer["responses"], observer["prompts"]):
        assert p_resp in o_prompt and o_prompt.startswith("I can make this sentence")
    for i in range(len(pioneer["scores"])):
        r_p = pioneer["responses"][i].count("e")
        r_o = observer["responses"][i].count("e")
        assert pioneer["scores"][i] == observer["scores"][i] == float(r_p + r_o)


def adam_steps(agent) -> int:
    states = [s for s in agent.learner.optimizer.state.values() if "step" in s]
    return int(states[0]["step"])


def test_roles_swap_every_T_and_optimizer_state_carries_on(tmp_path, micro_lm, micro_rm):
    run = make_run(tmp_path, **{"cory.swap_every": 2})
    calls = record_steps(run)
    run._start(resume=False)
    for _ in range(5):
        run.iterate()
    pioneers = [c["agent"] for c in calls[::2]]
    assert pioneers == ["a", "a", "b", "b", "a"]
    observers = [c["agent"] for c in calls[1::2]]
    assert observers == ["b", "b", "a", "a", "b"]
    # Each agent stepped its own optimizer once per iteration, with no reset at the swaps.
    assert adam_steps(run.agents["a"]) == 5 and adam_steps(run.agents["b"]) == 5
    assert run.agents["a"].learner.optimizer is not run.agents["b"].learner.optimizer


def test_without_exchange_roles_stay(tmp_path, micro_lm, micro_rm):
    run = make_run(tmp_path, **{"cory.swap_every": 1, "cory.exchange": False})
    assert [run.roles(i)[0].name for i in range(4)] == ["a"] * 4


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "grpo", "rloo"])
def test_cory_runs_every_algorithm(tmp_path, micro_lm, micro_rm, algo):
    from cory.cli import main

    out = tmp_path / "run"
    extra = {"cory.enabled": True, "algo.name": algo, "train.batch_size": 4, "train.iterations": 2}
    if algo in ("grpo", "rloo"):  # the other algorithms refuse a group size (it would have no effect)
        extra["algo.group_size"] = 2
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **extra)) == 0
    assert (out / "agents" / "a" / "model.safetensors").exists() and (out / "agents" / "b" / "model.safetensors").exists()
    best = (out / "final" / "CORY_AGENT").read_text().strip()
    assert best in {"a", "b"}
    assert filecmp.cmp(out / "final" / "model.safetensors", out / "agents" / best / "model.safetensors", shallow=False)


def test_shared_base_adapters_train_separately_and_reference_stays(tmp_path, micro_lm, micro_rm):
    run = make_run(tmp_path, **{"model.lora.r": 4})
    peft_model = run.agents["a"].policy.model
    assert run.agents["b"].policy.model is peft_model, "one base model for both agents"
    base_before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" not in k}
    lora_b_before = {k: v.clone() for k, v in peft_model.state_dict().items() if "agent_b" in k}
    run._start(resume=False)
    run.agents["b"].learner.step = lambda rollout, it, gen: (rollout, {"reward_mean": 0.0, "kl_mean": 0.0})
    run.iterate()  # only agent a updates
    after = peft_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items()), "the frozen base never changes"
    assert all(torch.equal(after[k], v) for k, v in lora_b_before.items()), "agent a's step leaves b's adapter alone"
    lora_a = [k for k in after if "agent_a" in k and "lora_B" in k]
    assert any(after[k].abs().sum() > 0 for k in lora_a), "agent a's LoRA B matrices moved off zero"
