"""The agent corpus (transcripts of the text environments), the test-size agent model, `cory eval` for
classical agents and models, the probes on a model, and `cory report` for environment runs."""

import collections
import json
import math

import numpy as np
import pytest
import torch

from cory import zoo
from cory.cli import main
from cory.envs.bandit import render_bandit_prompt
from cory.envs.parsing import parse_action
from cory.envs.prompts import PromptOptions
from cory.envs.bandit import greedy_actions, most_frequent_actions
from cory.envs import transcripts

MICRO_AGENT = "cory:micro-agent"
SHORT_BANDIT = "{n_arms: 10, horizon: 5, cot: false, history: 10}"


@pytest.fixture(scope="session")
def micro_agent(zoo_cache):
    """The micro agent model's folder, built once per session into the session cache."""
    return zoo.build(MICRO_AGENT, progress=False)


@pytest.fixture(scope="module")
def decisions():
    return transcripts.transcripts(3000, seed=11)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


# --- corpus ----------------------------------------------------------------------------------


def test_transcripts_are_deterministic_and_a_prefix_of_longer_draws():
    assert transcripts.transcripts(60, seed=3) == transcripts.transcripts(60, seed=3)
    assert transcripts.transcripts(25, seed=3) == transcripts.transcripts(60, seed=3)[:25]
    assert [t.text for t in transcripts.transcripts(60, seed=3)] != [t.text for t in transcripts.transcripts(60, seed=4)]
    assert transcripts.pretraining_texts(30) == [t.text for t in transcripts.transcripts(30, transcripts.PRETRAIN_SEED)]


def test_every_answer_parses_to_its_legal_action(decisions):
    for d in decisions:
        assert d.response == f"\nACTION={d.labels[d.action]}"
        assert parse_action(d.response, d.labels) == d.action and d.action in d.legal
        assert d.prompt.endswith("?") and "Output ONLY your final answer in the format ACTION=X." in d.prompt


def test_bandit_prompts_are_the_environment_rendering(decisions):
    bandits = [d for d in decisions if d.env_id == "cory/Bandit-v0"]
    for d in bandits[:300]:
        options = PromptOptions(cot=False, **transcripts.BANDIT_KWARGS[len(d.labels)])
        assert render_bandit_prompt(d.labels, "button", transcripts.HORIZON, d.history, options) == d.prompt


def test_behaviours_are_mixed_and_act_on_what_the_prompt_shows(decisions):
    bandits = [d for d in decisions if d.env_id == "cory/Bandit-v0"]
    shares = collections.Counter(d.behaviour for d in bandits)
    for name, share in transcripts.BEHAVIOURS.items():
        assert shares[name] / len(bandits) == pytest.approx(share, abs=0.06)
    arms = collections.Counter(len(d.labels) for d in bandits)
    assert set(arms) == {5, 10, 20} and arms[10] > arms[5] + arms[20]
    games = [d for d in decisions if d.env_id == "cory/TicTacToe-v0"]
    assert 0.05 < len(games) / len(decisions) < 0.4 and {d.behaviour for d in games} == {"random", "minimax"}
    checked = collections.Counter()
    for d in bandits:
        kwargs = transcripts.BANDIT_KWARGS[len(d.labels)]
        shown = list(d.history) if kwargs["summary"] else list(d.history[-kwargs["history"]:])
        if not shown:
            continue
        if d.behaviour == "frequent":
            assert d.action in most_frequent_actions(shown, len(d.labels))
        elif d.behaviour == "greedy":
            assert d.action in greedy_actions(shown, len(d.labels))
        checked[d.behaviour] += 1
    assert checked["frequent"] > 100 and checked["greedy"] > 100


def test_heldout_decisions_are_not_pretraining_texts():
    seen = set(transcripts.pretraining_texts(transcripts.PRETRAIN_SIZE))
    held = transcripts.heldout_transcripts(200)
    assert len(held) == 200 and not seen & {d.text for d in held}
    assert transcripts.heldout_texts(50) == [d.text for d in held[:50]]


def test_decisions_fit_the_models_positions(micro_agent):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_agent)
    texts = [d.text for d in transcripts.transcripts(1500, seed=5)]
    lengths = [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]  # + <eos>
    assert max(lengths) <= zoo.registry.AGENT_ROW


def test_micro_agent_build_records_its_decision_eval(micro_agent):
    info = json.loads((micro_agent / "zoo_info.json").read_text())
    sampled = info["eval"]["sampled"]
    assert {"valid_rate", "valid_rate_bandit", "valid_rate_tictactoe", "F_f", "F_g", "F_o", "untried"} <= set(sampled)
    assert info["eval"]["corpus"]["valid_rate"] == 1.0
    assert sampled["valid_rate_bandit"] > 0.5  # it answers in the format, if not yet well


# --- cory eval ---------------------------------------------------------------------------------


def test_eval_classical_agents_from_the_cli(capsys):
    bandit = ["env.id=cory/Bandit-v0", "env.kwargs={n_arms: 10, sigma: 0.1}", "env.eval_episodes=64", "--json"]
    results = {}
    for name in ("ucb1", "random"):
        code, out, _ = run_cli(capsys, "eval", name, *bandit)
        assert code == 0
        results[name] = json.loads(out)
    assert results["ucb1"]["n"] == 64 and results["ucb1"]["episode_length"] == 50
    assert results["ucb1"]["regret_mean"] < 0.5 * results["random"]["regret_mean"]
    assert results["ucb1"]["coverage_final"] == 1.0 and results["random"]["valid_rate"] == 1.0
    code, out, _ = run_cli(capsys, "eval", "minimax", "env.id=cory/TicTacToe-v0", "env.eval_episodes=50")
    assert code == 0 and "loss_rate        0.0000" in out and "win_rate" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["minimax", "env.id=cory/Bandit-v0"], "agent 'minimax' plays cory/TicTacToe-v0, not cory/Bandit-v0"),
        (["ucb1", "env.id=cory/Bandit-v0", "env.kwargs={n_arms: 1}"], "bad env.kwargs for cory/Bandit-v0: n_arms must be"),
        (["ucb1", "env.id=cory/Bandit-v0", "env.kwargs={arms: 3}"], "bad env.kwargs for cory/Bandit-v0"),
        (["ucb1", "env.id=cory/Bandit-v0", "--probe", "frequency"], "'ucb1' is a classical agent"),
        (["ucb1"], "'ucb1' is a classical agent: give it an environment"),
        (["random", "env.id=cory/Nope-v0"], "bad value for config key 'env.id'"),
        (["cory:nope", "env.id=cory/Bandit-v0"], "unknown model 'cory:nope'"),
        (["random", "env.id=cory/TicTacToe-v0", "--probe", "frequency"], "classical agent"),
    ],
)
def test_eval_bad_input_is_one_clear_line(capsys, argv, expected):
    code, _, err = run_cli(capsys, "eval", *argv)
    assert code == 2 and expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_eval_a_model_in_an_environment_with_a_probe(capsys, micro_agent):
    code, out, _ = run_cli(capsys, "eval", str(micro_agent), "env.id=cory/Bandit-v0", f"env.kwargs={SHORT_BANDIT}",
                           "env.eval_episodes=4", "generation.max_new_tokens=6", "--probe", "frequency", "--probes", "6",
                           "--json")
    assert code == 0
    result = json.loads(out)
    assert result["n"] == 4 and result["episode_length"] == 5 and 0 <= result["valid_rate"] <= 1
    assert 0 <= result["regret_mean"] and 0.1 <= result["coverage_final"] <= 0.5  # 5 pulls of 10 arms
    probe = result["frequency_probe"]
    assert probe["probes"] == 6 and probe["F_f"] + probe["F_g"] + probe["F_o"] == pytest.approx(1.0)
    assert 0 <= probe["entropy"] <= math.log(10) and sum(r["probes"] for r in probe["by_repeats"]) == 6


# --- probes on a model -------------------------------------------------------------------------


def test_action_scores_are_the_models_log_likelihoods(micro_agent):
    from cory.metrics.model_probes import action_scorer
    from cory.policy import Policy

    policy = Policy.from_pretrained(str(micro_agent))
    prompt = transcripts.heldout_transcripts(1)[0].prompt
    texts = ["\nACTION=blue", "\nACTION=green", "\nACTION=not-an-arm"]
    scores = action_scorer(policy, batch_size=2)(prompt, texts)
    tok = policy.tokenizer
    for text, score in zip(texts, scores):
        prompt_ids, text_ids = tok(prompt)["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + text_ids])
        with torch.no_grad():
            logp = torch.log_softmax(policy.model(input_ids=ids).logits[0, :-1].float(), -1)
        want = sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(text_ids))
        assert score == pytest.approx(want, abs=1e-4)


def test_probes_on_a_model_return_sensible_shapes(micro_agent):
    from cory.metrics.model_probes import frequency_bias_probe, knowing_doing_probe
    from cory.policy import Policy

    policy = Policy.from_pretrained(str(micro_agent))
    kwargs = transcripts.env_kwargs(10)
    summary, results = frequency_bias_probe(policy, 8, seed=0, env_kwargs=kwargs)
    assert len(results) == 8 and summary["probes"] == 8
    for r in results:
        assert len(r.probs) == 10 and sum(r.probs) == pytest.approx(1.0) and r.chosen == int(np.argmax(r.probs))
    again, _ = frequency_bias_probe(policy, 8, seed=0, env_kwargs=kwargs)
    assert again == summary  # seeded
    rates, kd = knowing_doing_probe(policy, 4, seed=0, env_kwargs=kwargs, max_new_tokens=8)
    assert rates["probes"] == 4 and len(kd) == 4
    assert rates["optimal"] + rates["greedy"] + rates["other"] + rates["invalid"] == pytest.approx(1.0)


# --- cory report for an environment run --------------------------------------------------------


def test_report_plots_regret_and_coverage_against_baselines(tmp_path, capsys, micro_agent):
    out = tmp_path / "run"
    train = ["train", "--output-dir", str(out), f"model.name={MICRO_AGENT}", "env.id=cory/Bandit-v0",
             f"env.kwargs={SHORT_BANDIT}", "env.eval_episodes=2", "train.batch_size=2", "train.iterations=1",
             "generation.max_new_tokens=6", "train.log_with=[]", "train.progress=false"]
    assert main(train) == 0
    capsys.readouterr()
    code, printed, _ = run_cli(capsys, "report", str(out), "--episodes", "6")
    assert code == 0
    for name in ("regret.png", "coverage.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "env_report.json").read_text())
    agents = report["agents"]
    assert set(agents) == {f"initial ({MICRO_AGENT})", "trained (final/)", "ucb1", "random"}
    assert all(a["n"] == 6 and a["episode_length"] == 5 for a in agents.values())
    assert agents["ucb1"]["coverage_final"] == 0.5  # UCB1 tries a new arm at each of its 5 steps
    assert "ucb1" in printed and "regret" in printed
