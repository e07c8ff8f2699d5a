"""Drift control inside runs: episode KL accounting, the hard budget over multi-turn episodes,
training on the distribution actually sampled, and the pessimistic ensemble as a run's reference."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import micro_overrides
from cory.drift.budget import EpisodeBudget
from cory.cli import main
from cory.config import load_config
from cory.metrics.training import episode_kl_metrics
from cory.rollout import Rollout, TokenScores


def hand_rollout(kl_rows: list[list[float]], episode_ids: list[int]) -> Rollout:
    """Turns with given per-token exact KLs (a shorter row is padded and masked)."""
    width = max(len(r) for r in kl_rows)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in kl_rows])
    exact = torch.tensor([r + [99.0] * (width - len(r)) for r in kl_rows])  # padding must not count
    n = len(kl_rows)
    rollout = Rollout(
        query_ids=torch.ones(n, 1, dtype=torch.long), query_mask=torch.ones(n, 1, dtype=torch.long),
        response_ids=torch.ones(n, width, dtype=torch.long), response_mask=mask,
        logprobs=torch.full((n, width), -1.0) * mask, scores=torch.zeros(n), finished=torch.ones(n, dtype=torch.bool),
        episode_ids=torch.tensor(episode_ids), turn_index=torch.zeros(n, dtype=torch.long),
        done=torch.ones(n, dtype=torch.bool), group_ids=torch.arange(n),
        scored=TokenScores(ref_logprobs=torch.full((n, width), -1.5) * mask, kl=torch.zeros(n, width), kl_exact=exact),
    )
    return rollout


def test_episode_kl_is_the_sum_of_exact_per_token_kls_over_all_turns():
    # Episode 0: two turns (0.1 + 0.2 + 0.3, then 0.4); episode 1: one turn of 1.0 + 0.5.
    rollout = hand_rollout([[0.1, 0.2, 0.3], [0.4], [1.0, 0.5]], episode_ids=[0, 0, 1])
    m = episode_kl_metrics(rollout)
    assert m["episode_kl/exact_mean"] == pytest.approx((1.0 + 1.5) / 2)
    assert m["episode_kl/exact_max"] == pytest.approx(1.5)
    assert m["episode_kl/exact_p50"] == pytest.approx(1.25)  # linear interpolation between 1.0 and 1.5
    # Sampled estimators on the same tokens: log q - log p = 0.5 per token, 6 tokens in all.
    assert m["episode_kl/k1_mean"] == pytest.approx((4 * 0.5 + 2 * 0.5) / 2)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert m["episode_kl/k3_max"] == pytest.approx(4 * k3)


def test_exact_per_token_kl_matches_a_direct_computation(tmp_path, micro_lm):
    """Learner.score's exact KL is KL(q || p) of the full next-token distributions, per token."""
    from cory.algorithms import make_algorithm
    from cory.learner import Learner
    from cory.generation.sampling import SamplingParams
    from cory.policy import Policy
    from cory.scoring import sequence_logprobs
    from cory.build import make_accelerator

    cfg = load_config(None, micro_overrides(tmp_path))
    policy = Policy.from_pretrained(str(micro_lm))
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval().requires_grad_(False)
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path))
    gen = policy.generate(["The film", "A quiet drama is"], SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(0))
    from cory.rollout import rollout_from_generation

    scored, _ = learner.score(rollout_from_generation(gen, ["The film", "A quiet drama is"], [0.0, 0.0]))
    args = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
    q = sequence_logprobs(policy.module, *args, with_full_logprobs=True).full_logprobs
    p = sequence_logprobs(reference, *args, with_full_logprobs=True).full_logprobs
    by_hand = (q.exp() * (q - p)).sum(-1) * gen.response_mask
    assert torch.allclose(scored.scored.kl_exact, by_hand, atol=1e-5)
    assert (scored.scored.kl_exact[gen.response_mask.bool()] > 0).all()


def test_evaluation_exact_kl_is_the_training_accounting_on_the_same_answers(tmp_path, micro_lm):
    """evaluate(exact_kl=True) sums the same per-token exact KL as Learner.score, over the answers
    it samples with its fixed seed; the initial model against itself is exactly 0."""
    from cory.algorithms import make_algorithm
    from cory.evaluate import evaluate
    from cory.scoring import Scorer
    from cory.learner import Learner
    from cory.generation.sampling import SamplingParams
    from cory.policy import Policy
    from cory.rollout import rollout_from_generation
    from cory.build import make_accelerator

    cfg = load_config(None, micro_overrides(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval().requires_grad_(False)
    prompts, params = ["The film", "A quiet drama is", "It is"], SamplingParams(max_new_tokens=6)

    def zero(ps, rs):
        return [0.0] * len(ps)

    initial = evaluate(Policy.from_pretrained(str(micro_lm)), prompts, zero, params, 1, 7, reference=Scorer(reference), exact_kl=True)
    assert initial["kl_exact_mean"] == pytest.approx(0.0, abs=1e-7)
    policy = Policy.from_pretrained(str(micro_lm))
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    res = evaluate(policy, prompts, zero, params, 1, 7, reference=Scorer(reference), exact_kl=True)
    gen = policy.generate(prompts, params, generator=torch.Generator().manual_seed(7))
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path))
    scored, _ = learner.score(rollout_from_generation(gen, prompts, [0.0] * len(prompts)))
    per_episode = scored.scored.kl_exact.sum(-1).tolist()
    by_training = sum(per_episode) / len(per_episode)
    assert by_training > 0
    assert res["kl_exact_mean"] == pytest.approx(by_training, rel=1e-5)
    by_hand = math.sqrt(sum((x - by_training) ** 2 for x in per_episode) / (len(per_episode) - 1))  # sample std
    assert by_hand > 0 and res["kl_exact_std"] == pytest.approx(by_hand, rel=1e-4)
    # The per-answer values behind the means, in prompt order, for comparisons prompt by prompt.
    assert res["answers"]["kl_exact"] == pytest.approx(per_episode, rel=1e-5)
    assert res["answers"]["length"] == gen.response_mask.sum(-1).tolist()
    assert res["answers"]["reward"] == [0.0] * len(prompts)
    assert sum(res["answers"]["kl"]) / len(prompts) == pytest.approx(res["kl_mean"])


def test_hard_budget_holds_over_multi_turn_episodes_and_training_uses_the_sampled_mixture(tmp_path, micro_lm):
    """A policy far from its reference plays 3-turn bandit episodes under a 1.5-nat episode budget:
    the exact episode KL recomputed by the learner never exceeds it, the budget runs out (the agent
    wants to overspend), the agent is told what is left, and the first update's recomputed
    log-probs match the sampled ones."""
    import cory.envs  # noqa: F401
    from cory.algorithms import make_algorithm
    from cory.envs.batch import GymTextEnvBatch
    from cory.learner import Learner
    from cory.generation.sampling import SamplingParams
    from cory.policy import Policy
    from cory.rollout import Sampler
    from cory.build import make_accelerator

    budget = 1.5
    cfg = load_config(None, micro_overrides(tmp_path, **{"algo.name": "ppo", "kl.hard_budget": budget}))
    policy = Policy.from_pretrained(str(micro_lm), value_head=True)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval().requires_grad_(False)
    env = GymTextEnvBatch("cory/Bandit-v0", None, pool_seed=0, n_arms=5, horizon=3, history=2, cot=False)
    control = EpisodeBudget(reference, budget, note=True)
    sampler = Sampler(policy, env, SamplingParams(max_new_tokens=8), control=control)
    rollout = sampler.collect(12, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert (rollout.turn_index == 2).sum() == 12
    assert any("[KL budget left: 1.50 of 1.5 nats]" in p for p in rollout.prompts)
    assert any("[KL budget left: 0.00 of 1.5 nats]" in p for p in rollout.prompts), "some episode spends it all"

    learner = Learner(policy, reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path))
    scored, metrics = learner.step(rollout)
    per_episode = torch.zeros(12).index_add_(0, scored.episode_ids, scored.scored.kl_exact.sum(-1))
    assert per_episode.max() <= budget + 1e-4, per_episode
    assert per_episode.max() > budget - 0.05
    assert metrics["episode_kl/exact_max"] <= budget + 1e-4
    assert metrics["budget/mixed_token_rate"] > 0 and metrics["budget/reference_token_rate"] > 0
    assert metrics["logprob_gap"] < 1e-4


def test_cory_runs_under_a_hard_budget(tmp_path, micro_lm, micro_rm):
    out = tmp_path / "run"
    extra = {"cory.enabled": True, "algo.name": "reinforce", "kl.hard_budget": 0.5, "algo.lr": 1e-2, "train.iterations": 3}
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for role in ("pioneer", "observer"):
            assert row[f"{role}/episode_kl/exact_max"] <= 0.5 + 1e-4


@pytest.fixture(scope="module")
def second_member(zoo_cache):
    from cory import zoo

    return zoo.build("cory:micro-reviews@seed1", progress=False)


def test_ensemble_reference_run_logs_both_kls_and_asks_for_help(tmp_path, micro_lm, micro_rm, second_member):
    out = tmp_path / "run"
    extra = {"model.reference_ensemble": "[cory:micro-reviews,cory:micro-reviews@seed1]", "kl.help_threshold": 0.3,
             "algo.lr": 1e-2, "train.iterations": 3}
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        # Against the unnormalised p~ the KL is the renormalised one plus -log(1 - h) >= 0 per token.
        assert row["episode_kl/semi_mean"] >= row["episode_kl/exact_mean"] - 1e-6
        assert 0 <= row["help_mass_mean"] <= 1 and 0 <= row["help_rate"] <= 1
    assert any(row["help_rate"] > 0 for row in rows), "two seeds disagree somewhere above the threshold"
    assert (out / "final" / "config.json").exists()


@pytest.mark.parametrize("algo", ["reinforce", "a2c", "ppo", "grpo", "rloo"])
def test_every_algorithm_trains_under_a_hard_budget(tmp_path, micro_lm, micro_rm, algo):
    out = tmp_path / "run"
    extra = {"algo.name": algo, "kl.hard_budget": 0.3, "algo.lr": 2e-2, "train.iterations": 3, "train.batch_size": 4}
    if algo in ("grpo", "rloo"):  # the other algorithms refuse a group size (it would have no effect)
        extra["algo.group_size"] = 2
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["episode_kl/exact_max"] <= 0.3 + 1e-4 for row in rows)
    assert all(row["logprob_gap"] < 1e-4 for row in rows)


def test_budget_controller_holds_the_episode_kl_not_the_turn_kl(tmp_path, micro_lm):
    """In multi-turn runs the Lagrangian multiplier moves with the mean KL of whole episodes."""
    import cory.envs  # noqa: F401
    from cory.algorithms import make_algorithm
    from cory.envs.batch import GymTextEnvBatch
    from cory.learner import Learner
    from cory.generation.sampling import SamplingParams
    from cory.policy import Policy
    from cory.rollout import Sampler
    from cory.build import make_accelerator

    cfg = load_config(None, micro_overrides(tmp_path, **{"kl.controller": "budget", "kl.budget": 0.0, "kl.beta": 0.0,
                                                         "kl.budget_lr": 0.1, "kl.estimator": "k3"}))
    policy = Policy.from_pretrained(str(micro_lm))
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval().requires_grad_(False)
    env = GymTextEnvBatch("cory/Bandit-v0", None, pool_seed=0, n_arms=5, horizon=3, history=2, cot=False)
    rollout = Sampler(policy, env, SamplingParams(max_new_tokens=6)).collect(4, np.random.default_rng(0), torch.Generator().manual_seed(0))
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path))
    scored, metrics = learner.step(rollout)
    assert metrics["turns_per_episode"] == 3
    per_turn = float(scored.scored.kl.sum(-1).mean())
    assert metrics["kl_mean"] == pytest.approx(3 * per_turn, rel=1e-5)  # every episode has 3 turns
    assert learner.controller.beta == pytest.approx(0.1 * metrics["kl_mean"], rel=1e-5)


@pytest.mark.parametrize("cory", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_evaluations_account_the_exact_kl_where_kl_exact_accounting_asks(tmp_path, micro_lm, micro_rm, exact, cory):
    """kl.exact_accounting reaches the evaluations on the fixed prompts (each CORY agent's too): with it
    they report the exact episode KL and keep it per answer, 0 for the initial model and above 0 once
    the policy moved; without it they report neither."""
    out = tmp_path / "run"
    extra = {"kl.exact_accounting": str(exact).lower(), "train.iterations": 1, "algo.lr": 1e-2,
             **({"cory.enabled": "true"} if cory else {})}
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **extra)) == 0
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    prefixes = ["a/", "b/"] if cory else [""]
    for p in prefixes:
        assert all((f"{p}kl_exact_mean" in r) == exact and ("kl_exact" in r[f"{p}answers"]) == exact for r in rows)
        assert all(len(r[f"{p}answers"]["reward"]) == r[f"{p}n"] for r in rows)
        if exact:
            assert rows[0][f"{p}kl_exact_mean"] == pytest.approx(0.0, abs=1e-6) and rows[-1][f"{p}kl_exact_mean"] > 0
