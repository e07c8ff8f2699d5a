"""The hard episode KL budget: mixture search, and that no episode overspends, however greedy."""

import torch

from cory.drift.budget import HardBudgetHook, mixture_weight
from cory.drift.exact import kl_exact, mixture_logprobs


def test_mixture_weight_hits_the_target_kl():
    torch.manual_seed(0)
    logq = torch.log_softmax(torch.randn(16, 50) * 3, -1)
    logp = torch.log_softmax(torch.randn(16, 50), -1)
    full = kl_exact(logq, logp)
    target = full * torch.rand(16) * 0.9
    w = mixture_weight(logq, logp, target)
    got = kl_exact(mixture_logprobs(logq, logp, w), logp)
    assert torch.all((got - target).abs() < 1e-6), (got - target).abs().max()
    assert torch.all((w > 0) & (w < 1))


def test_mixture_weight_is_one_when_affordable_and_zero_when_broke():
    logq = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    logp = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0]]), -1)
    assert mixture_weight(logq, logp, kl_exact(logq, logp) + 0.1).item() == 1.0
    w0 = mixture_weight(logq, logp, torch.tensor([0.0]))
    assert w0.item() < 1e-6
    assert torch.allclose(mixture_logprobs(logq, logp, w0).exp(), logp.exp(), atol=1e-6)


def test_episode_kl_never_exceeds_budget_even_for_an_agent_that_tries_to_overspend(micro_lm):
    from cory.generation.sampling import SamplingParams
    from cory.policy import Policy
    from transformers import AutoModelForCausalLM

    policy = Policy.from_pretrained(str(micro_lm))
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval()
    prompts = ["The film", "A quiet drama", "It is", "Every scene"] * 8
    budget = 3.0

    class Overspender:
        """Pushes all mass onto one token at every step: a huge KL wherever the hook allows it."""

        def __init__(self, inner):
            self.inner = inner

        def start(self, *a):
            self.inner.start(*a)

        def observe(self, *a):
            self.inner.observe(*a)

        def __call__(self, step, logprobs):
            greedy = torch.full_like(logprobs, -30.0)
            greedy[:, 7] = 0.0
            return self.inner(step, torch.log_softmax(greedy, -1))

    for trial, make in enumerate([lambda h: h, Overspender]):
        hook = HardBudgetHook(reference, torch.full((len(prompts),), budget))
        gen = policy.generate(prompts, SamplingParams(max_new_tokens=24), generator=torch.Generator().manual_seed(trial),
                              logits_hook=make(hook))
        w, spent = hook.results(gen.response_ids.shape[1])
        episode_kl = (spent * gen.response_mask).sum(-1)
        assert torch.all(episode_kl <= budget + 1e-5), episode_kl.max()
        if trial == 1:
            assert torch.all(episode_kl > budget - 1e-3), "the overspender uses its whole budget"
            assert (w[:, -1] < 1e-6).all() or (gen.response_mask[:, -1] == 0).any(), "the reference writes once it is spent"
