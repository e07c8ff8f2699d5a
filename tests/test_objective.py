"""The Learner's objective against hand computations, on a real (micro) model in float64.

Each test builds a Learner, feeds it a synthetic off-policy rollout (responses of different lengths,
behaviour log-probs perturbed so that ratios differ from 1 and clipping binds), records the gradient
at the optimizer step, and compares it with the gradient of the objective written out by hand, or
with the gradient of another configuration.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from cory.algorithms import ALGORITHMS, make_algorithm
from cory.config import load_config
from cory.errors import UsageError
from cory.learner import Learner
from cory.policy import Policy
from cory.scoring import sequence_logprobs
from cory.rollout import Rollout

LENGTHS = [6, 1, 3, 5, 2, 6, 4, 1]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]
FINISHED = [True, False, True, True, False, True, True, True]


def make_learner(path, overrides: list[str]):
    """(learner, grads): grads collects the flat gradient at every optimizer step (no step is taken)."""
    cfg = load_config(None, ["algo.max_grad_norm=0", *overrides])
    algorithm = make_algorithm(cfg)
    policy = Policy.from_pretrained(path, value_head=algorithm.needs_values)
    policy.module.double()
    if algorithm.needs_values:  # a non-zero head, so that the value loss reaches the trunk
        torch.manual_seed(0)
        torch.nn.init.normal_(policy.module.value_head.weight, std=0.1)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval().requires_grad_(False)
    with torch.no_grad():  # the reference differs from the policy, so the KL is not ~0
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    teacher = None
    if cfg.distill.teacher:  # another perturbation of the same model: the teacher's KL is not ~0 either
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval().requires_grad_(False)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    on_cpu = os.environ.get("CORY_TEST_DEVICE", "cpu") == "cpu"
    learner = Learner(policy, reference, algorithm, cfg, Accelerator(cpu=on_cpu), teacher=teacher)
    params = [p for p in learner.module.parameters() if p.requires_grad]
    grads: list[torch.Tensor] = []

    def record(*args, **kwargs):
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))

    learner.optimizer.step = record
    return learner, grads


def synthetic_rollout(learner, seed: int = 0, scores=None) -> Rollout:
    """8 single-turn rows in 2 groups of 4, responses of 1-6 tokens, off-policy behaviour log-probs."""
    g = torch.Generator().manual_seed(seed)
    vocab = learner.policy.model.config.vocab_size
    b, lq, lr = len(LENGTHS), 4, max(LENGTHS)
    query_ids = torch.randint(5, vocab, (b, lq), generator=g)
    query_mask = torch.ones(b, lq, dtype=torch.long)
    response_mask = (torch.arange(lr)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    response_ids = torch.randint(5, vocab, (b, lr), generator=g) * response_mask
    with torch.no_grad():
        lp = sequence_logprobs(learner.module, query_ids, query_mask, response_ids, response_mask).logprobs.cpu()
    logprobs = (lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)) * response_mask
    if scores is None:
        scores = torch.randn(b, generator=g, dtype=torch.float64)
    return Rollout(
        query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
        logprobs=logprobs, scores=torch.as_tensor(scores, dtype=torch.float64), finished=torch.tensor(FINISHED),
        episode_ids=torch.arange(b), turn_index=torch.zeros(b, dtype=torch.long), done=torch.ones(b, dtype=torch.bool),
        group_ids=torch.tensor(GROUPS), prompts=[""] * b, responses=[""] * b, infos=[{}] * b,
    )


def learner_gradient(path, overrides, rollout_seed=0, scores=None, **rollout_kw) -> torch.Tensor:
    learner, grads = make_learner(path, overrides)
    learner.step(synthetic_rollout(learner, rollout_seed, scores), **rollout_kw)
    assert len(grads) == 1
    return grads[0]


def hand_gradient(path, overrides, loss_fn, rollout_seed=0, scores=None) -> torch.Tensor:
    """The gradient of loss_fn(out, rollout, ref_logprobs) on the same model and rollout."""
    learner, _ = make_learner(path, overrides)
    r = synthetic_rollout(learner, rollout_seed, scores).to(learner.accelerator.device)
    with torch.no_grad():
        ref = sequence_logprobs(learner.reference, r.query_ids, r.query_mask, r.response_ids, r.response_mask).logprobs
    ref = ref.float().double()  # the learner stores reference log-probs in float32
    learner.module.zero_grad()
    out = sequence_logprobs(learner.module, r.query_ids, r.query_mask, r.response_ids, r.response_mask, with_entropy=True)
    loss_fn(out, r, ref).backward()
    params = [p for p in learner.module.parameters() if p.requires_grad]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


HAND_TOL = 1e-6
"""Against a hand computation: the Learner keeps rollout-level tensors (scores, rewards, reference
log-probs) in float32, so advantages carry float32 rounding; a wrong term moves the gradient by >1e-3."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grpo_advantages(returns: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """Written out per group with Python loops (independent of cory.advantages)."""
    adv = torch.zeros_like(returns)
    for g in set(GROUPS):
        rows = [i for i, x in enumerate(GROUPS) if x == g]
        x = returns[rows]
        adv[rows] = (x - x.mean()) / ((x.std() + 1e-6) if scale else 1.0)
    return adv


def clipped(out, r, adv, eps_low=0.2, eps_high=0.2):
    ratio = torch.exp(out.logprobs - r.logprobs)
    a = adv[:, None]
    return torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high))


def seq_mean(x, mask):
    return ((x * mask).sum(-1) / mask.sum(-1)).mean()


def token_mean(x, mask):
    return (x * mask).sum() / mask.sum()


# -- micro-batching and aggregation ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _full_batch(path, algo, aggregation):
    """(learner, grads, rollout) after one step without micro-batching (reused across micro sizes)."""
    # distill: the exact teacher KL, whose loss term is aggregated like every other term.
    teacher = [f"distill.teacher={path}", "distill.estimator=full", "distill.task_coef=0.5"] if algo == "distill" else []
    learner, grads = make_learner(path, [f"algo.name={algo}", f"algo.loss_aggregation={aggregation}",
                                         "algo.ent_coef=0.01", "kl.beta=0.1", *teacher])
    rollout = synthetic_rollout(learner)
    learner.step(rollout)
    return learner, grads, rollout


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean", "constant"])
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batch_size_leaves_the_gradient_unchanged(micro_lm, algo, aggregation, micro):
    learner, grads, rollout = _full_batch(str(micro_lm), algo, aggregation)
    learner.cfg.algo.micro_batch_size = micro
    try:
        learner.step(rollout)
    finally:
        learner.cfg.algo.micro_batch_size = 0
    full, split = grads[0], grads[-1]
    assert len(grads) >= 2 and full.norm() > 0
    assert rel(split, full) < 1e-10


def test_token_mean_weighs_every_token_of_the_minibatch_the_same(micro_lm):
    # REINFORCE (no baseline, gamma 1, no KL): A_t = score, loss = sum_t -A log pi / (all tokens).
    overrides = ["algo.name=reinforce", "algo.baseline=none", "kl.beta=0", "algo.micro_batch_size=1"]

    def loss(out, r, ref):
        return token_mean(-r.scores[:, None] * out.logprobs, r.response_mask)

    assert rel(learner_gradient(micro_lm, overrides), hand_gradient(micro_lm, overrides, loss)) < HAND_TOL


# -- GRPO with the KL penalty in the reward -----------------------------------------------------------
def test_grpo_kl_penalty_in_reward_enters_the_advantages(micro_lm):
    base = ["algo.name=grpo", "kl.penalty=reward", "kl.estimator=k1"]
    g0 = learner_gradient(micro_lm, base + ["kl.beta=0"])
    g10 = learner_gradient(micro_lm, base + ["kl.beta=10"])
    assert rel(g10, g0) > 1e-3

    def loss(out, r, ref):
        kl = ((r.logprobs - ref) * r.response_mask).sum(-1)  # k1 on the behaviour policy's samples
        adv = grpo_advantages(r.scores - 10 * kl.float().double())
        return token_mean(clipped(out, r, adv), r.response_mask)

    assert rel(g10, hand_gradient(micro_lm, base + ["kl.beta=10"], loss)) < HAND_TOL


# -- GRPO and the shaping keys --------------------------------------------------------------------------
def test_grpo_applies_the_missing_eos_penalty(micro_lm):
    base = ["algo.name=grpo", "kl.beta=0"]
    plain = learner_gradient(micro_lm, base)
    penalised = learner_gradient(micro_lm, base + ["algo.missing_eos_penalty=-1"])
    assert rel(penalised, plain) > 1e-3

    def loss(out, r, ref):
        adv = grpo_advantages(r.scores - 1.0 * (~r.finished).double())
        return token_mean(clipped(out, r, adv), r.response_mask)

    assert rel(penalised, hand_gradient(micro_lm, base, loss)) < HAND_TOL


def test_grpo_applies_reward_normalisation(micro_lm):
    base = ["algo.name=grpo", "kl.beta=0", "algo.scale_rewards=false"]
    assert rel(learner_gradient(micro_lm, base + ["algo.normalize_rewards=true"]), learner_gradient(micro_lm, base)) > 1e-3


# -- REINFORCE's leave-one-out baseline ----------------------------------------------------------------
def test_reinforce_loo_samples_groups_and_refuses_groups_of_one():
    cfg = load_config(None, ["algo.name=reinforce", "algo.baseline=loo", "algo.group_size=4"])
    assert make_algorithm(cfg).group_size == 4
    assert make_algorithm(load_config(None, ["algo.name=reinforce", "algo.baseline=mean"])).group_size == 1
    with pytest.raises(UsageError, match="group_size"):
        load_config(None, ["algo.name=reinforce", "algo.baseline=loo", "algo.group_size=1"])


# -- keys with no effect, aggregation of every term, the KL estimator ------------------------------------
@pytest.mark.parametrize("algo,key", [("grpo", "gamma=0.9"), ("rloo", "turn_gamma=0.5"), ("grpo", "lam=0.5"),
                                      ("reinforce", "clip_range=0.1"), ("ppo", "scale_rewards=false"),
                                      ("rloo", "vf_coef=0.5"), ("reinforce", "dynamic_sampling=true")])
def test_a_key_with_no_effect_is_refused_with_one_line(algo, key):
    with pytest.raises(UsageError) as err:
        load_config(None, [f"algo.name={algo}", f"algo.{key}"])
    msg = str(err.value)
    assert "\n" not in msg and f"algo.{key.split('=')[0]}" in msg and "used by" in msg


@pytest.mark.parametrize("algo,setting", [("ppo", ["algo.gamma=0.5"]), ("a2c", ["algo.lam=0.3"]), ("ppo", ["algo.dual_clip=1.1"]),
                                          ("dapo", ["algo.overlong_buffer=8", "generation.max_new_tokens=8"]),
                                          ("dapo", ["algo.overlong_filter=true"])])
def test_keys_that_an_algorithm_reads_are_accepted_and_change_its_gradient(micro_lm, algo, setting):
    base = [f"algo.name={algo}", "kl.beta=0.1"]
    changed = learner_gradient(micro_lm, base + setting)
    plain = learner_gradient(micro_lm, base + [s for s in setting if s.startswith("generation")])
    assert rel(changed, plain) > 1e-3


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_seq_mean_objective_matches_the_paper_term_by_term(micro_lm, estimator):
    # GRPO (Shao et al.): 1/G sum_i 1/|o_i| sum_t [surrogate - beta KL + ent H], every term seq-mean.
    beta, ent = 0.5, 0.05
    overrides = ["algo.name=grpo", "algo.loss_aggregation=seq-mean", f"kl.beta={beta}", f"algo.ent_coef={ent}",
                 f"kl.estimator={estimator}", "algo.micro_batch_size=3"]

    def loss(out, r, ref):
        log_r = ref - out.logprobs
        kl = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.expm1(log_r) - log_r}[estimator]
        per_token = clipped(out, r, grpo_advantages(r.scores)) + beta * kl - ent * out.entropy
        return seq_mean(per_token, r.response_mask)

    assert rel(learner_gradient(micro_lm, overrides), hand_gradient(micro_lm, overrides, loss)) < HAND_TOL


# -- the loss variants, end to end --------------------------------------------------------------------------
def test_dr_grpo_objective_by_hand(micro_lm):
    overrides = ["algo.name=dr_grpo", "kl.beta=0", "generation.max_new_tokens=10"]

    def loss(out, r, ref):  # no std scaling; sum over tokens / (10 * 8 sequences)
        return (clipped(out, r, grpo_advantages(r.scores, scale=False)) * r.response_mask).sum() / (10 * 8)

    assert rel(learner_gradient(micro_lm, overrides), hand_gradient(micro_lm, overrides, loss)) < HAND_TOL


def test_dapo_objective_by_hand_drops_groups_with_equal_scores(micro_lm):
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # group 1: all equal
    overrides = ["algo.name=dapo", "kl.beta=0"]

    def loss(out, r, ref):
        keep = r.response_mask * torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], device=r.scores.device)[:, None]
        return token_mean(clipped(out, r, grpo_advantages(r.scores), 0.2, 0.28), keep)

    got = learner_gradient(micro_lm, overrides, scores=scores)
    assert rel(got, hand_gradient(micro_lm, overrides, loss, scores=scores)) < HAND_TOL


def test_gspo_objective_by_hand(micro_lm):
    overrides = ["algo.name=gspo", "kl.beta=0", "algo.clip_range=0.05", "algo.clip_range_high=0.1"]

    def loss(out, r, ref):
        m = r.response_mask
        s = torch.exp(((out.logprobs - r.logprobs) * m).sum(-1) / m.sum(-1))  # the sequence ratio
        a = grpo_advantages(r.scores)
        return torch.maximum(-a * s, -a * s.clamp(0.95, 1.1)).mean()

    assert rel(learner_gradient(micro_lm, overrides), hand_gradient(micro_lm, overrides, loss)) < HAND_TOL


def test_cispo_objective_by_hand(micro_lm):
    overrides = ["algo.name=cispo", "kl.beta=0", "algo.clip_range_high=0.1"]

    def loss(out, r, ref):
        w = torch.exp(out.logprobs - r.logprobs).detach().clamp(0.0, 1.1)
        return token_mean(-w * grpo_advantages(r.scores)[:, None] * out.logprobs, r.response_mask)

    assert rel(learner_gradient(micro_lm, overrides), hand_gradient(micro_lm, overrides, loss)) < HAND_TOL


# -- truncated importance sampling --------------------------------------------------------------------------
def tis_rollouts(learner, noise: float):
    """(rollout with the trainer's own log-probs, the same with engine log-probs perturbed by `noise`)."""
    r = synthetic_rollout(learner)
    with torch.no_grad():
        r.logprobs = sequence_logprobs(learner.module, r.query_ids, r.query_mask, r.response_ids, r.response_mask).logprobs.cpu()
    g = torch.Generator().manual_seed(3)
    engine = (r.logprobs + noise * torch.randn(r.logprobs.shape, generator=g, dtype=r.logprobs.dtype)) * r.response_mask
    from dataclasses import replace

    return r, replace(r, logprobs=engine.clone(), engine_logprobs=engine)


def test_truncated_importance_sampling_is_a_no_op_when_the_engines_agree(micro_lm):
    learner, grads = make_learner(micro_lm, ["algo.name=grpo", "kl.beta=0.1", "generation.backend=vllm"])
    own, _ = tis_rollouts(learner, 0.0)
    from dataclasses import replace

    learner.step(own)
    _, metrics = learner.step(replace(own, engine_logprobs=own.logprobs.clone(), logprobs=own.logprobs.clone()))
    assert rel(grads[1], grads[0]) < 1e-12
    assert metrics["is/log_ratio_abs_max"] < 1e-6 and metrics["is/truncated_tokens"] == 0


def test_truncated_importance_sampling_weights_and_logs_a_perturbed_engine(micro_lm):
    cap = 1.5
    learner, grads = make_learner(micro_lm, ["algo.name=grpo", "kl.beta=0", f"algo.is_cap={cap}", "generation.backend=vllm"])
    own, perturbed = tis_rollouts(learner, 0.5)
    _, metrics = learner.step(perturbed)
    m = own.response_mask.double()
    log_ratio = (own.logprobs - perturbed.engine_logprobs) * m
    assert metrics["is/log_ratio_abs_mean"] == pytest.approx(float((log_ratio.abs() * m).sum() / m.sum()), rel=1e-5)
    assert metrics["is/log_ratio_abs_max"] == pytest.approx(float(log_ratio.abs().max()), rel=1e-5)
    share = float(((log_ratio.exp() > cap).double() * m).sum() / m.sum())
    assert 0 < share < 1 and metrics["is/truncated_tokens"] == pytest.approx(share)

    def loss(out, r, ref):  # old = the trainer's own log-probs; each token weighted by min(old / engine, cap)
        old, engine = own.logprobs.to(out.logprobs.device), perturbed.engine_logprobs.to(out.logprobs.device)
        w = torch.exp(old - engine).clamp(max=cap)
        ratio = torch.exp(out.logprobs - old)
        a = grpo_advantages(r.scores)[:, None]
        return token_mean(w * torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)), r.response_mask)

    assert rel(grads[0], hand_gradient(micro_lm, ["algo.name=grpo", "kl.beta=0"], loss)) < HAND_TOL


def test_overlong_penalty_and_filter_by_hand(micro_lm):
    from cory.shaping import overlong_penalty

    # max 16 tokens, buffer 4: no penalty up to 12, then linear down to -1 at 16
    assert torch.allclose(overlong_penalty(torch.tensor([10, 12, 13, 16]), 16, 4, 1.0), torch.tensor([0.0, 0.0, -0.25, -1.0]))
    overrides = ["algo.name=dapo", "kl.beta=0", "algo.dynamic_sampling=false", "algo.overlong_filter=true"]

    def loss(out, r, ref):  # truncated responses (finished = False) leave the loss and its normaliser
        keep = r.response_mask * r.finished[:, None]
        return token_mean(clipped(out, r, grpo_advantages(r.scores), 0.2, 0.28), keep)

    assert rel(learner_gradient(micro_lm, overrides), hand_gradient(micro_lm, overrides, loss)) < HAND_TOL


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_micro_batch_size_leaves_the_float32_gradient_unchanged(micro_lm, algo):
    def gradient(micro):
        learner, grads = make_learner(micro_lm, [f"algo.name={algo}", "kl.beta=0.1", f"algo.micro_batch_size={micro}"])
        learner.module.float()
        learner.step(synthetic_rollout(learner))
        return grads[0]

    assert rel(gradient(1), gradient(0)) < 1e-5
