"""The drift package's two formulas (exact KL, mixture log-probs) and the typed control output,
against hand computations."""

import math

import torch

from cory.drift.control import ControlOutput
from cory.drift.exact import kl_exact, mixture_logprobs


def test_exact_kl_by_hand_row_wise_with_zero_mass_terms():
    q = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1]])
    p = torch.tensor([[0.25, 0.25, 0.5], [0.4, 0.4, 0.2]])
    expected = [0.5 * math.log(2) * 2, 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.5) + 0.1 * math.log(0.5)]
    got = kl_exact(q.log(), p.log())
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    # q = 0 where p = 0 too: the term is 0, not NaN.
    assert kl_exact(torch.tensor([1.0, 0.0]).log(), torch.tensor([1.0, 0.0]).log()).item() == 0.0


def test_exact_kl_against_a_semi_distribution_exceeds_the_one_against_any_distribution_above_it():
    q = torch.tensor([0.2, 0.8]).log()
    semi = torch.tensor([0.5, 0.1]).log()  # mass 0.6
    expected = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.1)
    assert abs(kl_exact(q, semi).item() - expected) < 1e-6
    assert kl_exact(q, semi) > kl_exact(q, torch.tensor([0.5, 0.5]).log())


def test_mixture_of_whole_distributions_and_of_sampled_tokens_by_hand():
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p = torch.tensor([[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    w = torch.tensor([0.25, 1.0])  # one weight per row broadcasts over the vocabulary
    got = mixture_logprobs(q.log(), p.log(), w).exp()
    assert torch.allclose(got, w[:, None] * q + (1 - w[:, None]) * p, atol=1e-7)
    # Per sampled token: [B, L] log q(x), log f(x), w; the same formula element-wise.
    logq, logf, wt = torch.tensor([[0.7, 0.2]]).log(), torch.tensor([[0.1, 0.5]]).log(), torch.tensor([[0.25, 0.0]])
    assert torch.allclose(mixture_logprobs(logq, logf, wt).exp(), torch.tensor([[0.25 * 0.7 + 0.75 * 0.1, 0.5]]))
    # Where the fallback wrote (w = 0) the policy gets no gradient; where w mixed, its share w q / m.
    logq = logq.clone().requires_grad_(True)
    mixture_logprobs(logq, logf, wt).sum().backward()
    assert abs(logq.grad[0, 0].item() - 0.25 * 0.7 / (0.25 * 0.7 + 0.75 * 0.1)) < 1e-6 and logq.grad[0, 1] == 0
    # float64 policy log-probs keep their dtype whatever the recorded tensors' dtype.
    assert mixture_logprobs(logq.double(), logf, wt).dtype == torch.float64


def test_control_output_concatenates_turns_by_their_masks_and_selects_rows():
    a = ControlOutput(mix_weight=torch.tensor([[1.0, 0.5, 9.0], [0.0, 9.0, 9.0]]), fallback_logprobs=torch.tensor([[-1.0, -2.0, 9.0], [-3.0, 9.0, 9.0]]))
    b = ControlOutput(mix_weight=torch.tensor([[0.25]]), fallback_logprobs=torch.tensor([[-4.0]]))
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1]])]
    joined = ControlOutput.concat([a, b], masks)
    assert torch.equal(joined.mix_weight, torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.25, 0.0]]))
    assert torch.equal(joined.fallback_logprobs, torch.tensor([[-1.0, -2.0], [-3.0, 0.0], [-4.0, 0.0]]))
    assert joined.help is None and joined.fallback_is_reference
    picked = joined.select(torch.tensor([2, 0]))
    assert torch.equal(picked.mix_weight, torch.tensor([[0.25, 0.0], [1.0, 0.5]]))
    helped = ControlOutput(mix_weight=torch.zeros(1, 1), fallback_logprobs=torch.zeros(1, 1), help=torch.ones(1, 1))
    assert not helped.fallback_is_reference and torch.equal(helped.select(torch.tensor([0])).help, torch.ones(1, 1))
