"""On-policy distillation (distill.teacher, algo.name=distill): the teacher's per-token rewards
against a hand computation, a student that moves towards its teacher, the combinations (task
rewards, CORY, environments) and the refusal of a teacher with another tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import micro_overrides
from cory.algorithms import make_algorithm
from cory.build import eval_params, load_reference, make_accelerator
from cory.cli import main
from cory.config import load_config
from cory.evaluate import evaluate
from cory.generation.sampling import SamplingParams
from cory.learner import Learner
from cory.policy import Policy
from cory.rollout import rollout_from_generation
from cory.scoring import Scorer
from cory.tasks import make_task

TEACHER = "cory:micro-reviews@seed1"
"""The review writer's recipe from another seed: the same tokenizer, other weights."""


@pytest.fixture(scope="module")
def teacher(zoo_cache):
    from cory import zoo

    return zoo.build(TEACHER, progress=False)


def perturbed(model, scale: float, seed: int):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def log_softmax_by_hand(model, ids: list[int], temperature: float) -> torch.Tensor:
    """[len(ids), V] the model's tempered next-token log-distributions over one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("estimator", ["k1", "full"])
def test_teacher_rewards_and_advantages_match_a_hand_computation(tmp_path, micro_lm, estimator):
    """r_t = -coef KL_t(policy || teacher) + task_coef x score at the last token, with KL_t the
    sampled token's log-ratio (k1) or sum_v q(v) log(q(v) / p(v)) (full), both at the sampling
    temperature; distill's advantage is the reward-to-go. By hand: each row's real tokens alone
    (no padding), through plain forward passes of both models."""
    coef, task_coef, temperature = 0.5, 2.0, 0.8
    cfg = load_config(None, micro_overrides(tmp_path, **{
        "algo.name": "distill", "distill.teacher": TEACHER, "distill.estimator": estimator, "distill.coef": coef,
        "distill.task_coef": task_coef, "generation.temperature": temperature}))
    policy = Policy.from_pretrained(str(micro_lm))
    perturbed(policy.model, 0.05, 1)
    teacher = perturbed(AutoModelForCausalLM.from_pretrained(micro_lm), 0.05, 2).eval().requires_grad_(False)
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval().requires_grad_(False)
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path), teacher=teacher)
    prompts, scores = ["The film", "A quiet drama is", "It"], [0.7, -0.3, 1.5]
    gen = policy.generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature), generator=torch.Generator().manual_seed(0))
    rollout, _ = learner.score(rollout_from_generation(gen, prompts, scores))
    targets = learner.targets(rollout)
    for i in range(len(prompts)):
        query = gen.query_ids[i][gen.query_mask[i].bool()].tolist()
        response = gen.response_ids[i][gen.response_mask[i].bool()].tolist()
        n = len(response)
        q = log_softmax_by_hand(policy.model, query + response, temperature)[len(query) - 1 : len(query) - 1 + n]
        p = log_softmax_by_hand(teacher, query + response, temperature)[len(query) - 1 : len(query) - 1 + n]
        x = torch.tensor(response)
        if estimator == "k1":
            kl = q[torch.arange(n), x] - p[torch.arange(n), x]
        else:
            kl = (q.exp() * (q - p)).sum(-1)
        rewards = -coef * kl
        rewards[-1] += task_coef * scores[i]
        assert torch.allclose(rollout.scored.teacher_kl[i, :n].double(), kl, atol=1e-5)
        assert torch.allclose(targets.rewards[i, :n].double(), rewards, atol=1e-5)
        assert torch.allclose(targets.advantages[i, :n].double(), rewards.flip(0).cumsum(0).flip(0), atol=1e-5)
        assert (targets.rewards[i, n:] == 0).all()
    if estimator == "full":
        assert (rollout.scored.teacher_kl[gen.response_mask.bool()] > 0).all()


def exact_kl_to(teacher_path, model, cfg) -> float:
    """Mean exact KL(model || teacher) of whole answers to the task's fixed evaluation prompts
    (4 samples each, fixed seed)."""
    teacher = load_reference(str(teacher_path), torch.float32)
    res = evaluate(Policy.from_pretrained(str(model)), make_task(cfg.task).eval_prompts, lambda p, r: [0.0] * len(r),
                   eval_params(cfg), 4, 7, reference=Scorer(teacher), exact_kl=True)
    return res["kl_exact_mean"]


@pytest.mark.parametrize("estimator", ["k1", "full"])
def test_a_distilled_student_moves_its_exact_kl_to_the_teacher_down(tmp_path, micro_lm, micro_rm, teacher, estimator):
    """20 iterations of algo.name=distill from cory:micro-reviews to another seed of its recipe.
    On 5 training seeds the exact KL on the fixed prompts fell from 10.8 nats to 5.6-6.6 (k1) and
    4.9-6.9 (full), at most 0.64 of where it started; the bound of 0.8 leaves room for that spread."""
    extra = {"algo.name": "distill", "distill.teacher": TEACHER, "distill.estimator": estimator, "algo.lr": 1e-3,
             "train.iterations": 20, "train.batch_size": 16}
    cfg = load_config(None, micro_overrides(tmp_path, **extra))
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *micro_overrides(tmp_path, **extra)]) == 0
    before, after = exact_kl_to(teacher, micro_lm, cfg), exact_kl_to(teacher, out / "final", cfg)
    assert after < 0.8 * before, (before, after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_kl_mean"] == r["teacher_kl_mean"] for r in rows)


def test_a_teacher_reward_combines_with_task_rewards_cory_and_environments(tmp_path, micro_lm, micro_rm, teacher):
    """The teacher's reward beside a task reward (ppo), in CORY (each agent graded by the teacher)
    and in a multi-turn bandit (every turn's tokens graded): each trains and logs its teacher KL."""
    runs = {
        "ppo": {"algo.name": "ppo", "distill.teacher": TEACHER, "distill.coef": 0.1},
        "cory": {"cory.enabled": True, "distill.teacher": TEACHER, "distill.estimator": "full"},
        "bandit": {"env.id": "cory/Bandit-v0", "env.kwargs": "{n_arms: 3, horizon: 2, history: 1, cot: false}",
                   "env.eval_episodes": 2, "algo.name": "distill", "distill.teacher": TEACHER, "distill.task_coef": 1.0},
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["train", "--output-dir", str(out), *micro_overrides(tmp_path, **{"train.batch_size": 4, **extra})]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        keys = [k for k in rows[-1] if k.endswith("teacher_kl_mean")]
        assert keys and all(rows[-1][k] > 0 for k in keys), (name, rows[-1])


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path, capsys, micro_lm, micro_rm, micro_arith):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *micro_overrides(tmp_path, **{"algo.name": "distill",
                                                                                  "distill.teacher": "cory:micro-arith"})]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer differs" in err and not out.exists(), err


def test_distillation_keys_without_a_teacher_are_refused(tmp_path, capsys):
    for overrides in (["algo.name=distill"], ["distill.coef=2"], ["distill.estimator=full"]):
        assert main(["train", "--output-dir", str(tmp_path / "run"), *overrides]) == 2
        assert "set distill.teacher" in capsys.readouterr().err
