import math

import torch

from cory.kl import AdaptiveKL, kl_k1, kl_k2, kl_k3


def test_estimators_on_one_token_by_hand():
    logq, logp = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    r = 0.25 / 0.5
    assert torch.allclose(kl_k1(logq, logp), torch.tensor([[-math.log(r)]]))
    assert torch.allclose(kl_k2(logq, logp), torch.tensor([[0.5 * math.log(r) ** 2]]))
    assert torch.allclose(kl_k3(logq, logp), torch.tensor([[(r - 1) - math.log(r)]]))


def test_adaptive_controller_moves_beta_toward_target():
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    c.update(sequence_kl=12.0, n_samples=10)  # too far: beta grows by 1 + 0.2 * 0.1
    assert abs(c.beta - 0.1 * 1.02) < 1e-12
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    c.update(sequence_kl=3.0, n_samples=10)  # too close: error -0.5 clipped to -0.2
    assert abs(c.beta - 0.1 * 0.98) < 1e-12


def test_k1_and_k3_sample_means_converge_to_exact_kl():
    torch.manual_seed(0)
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((q * (q / p).log()).sum())
    x = torch.multinomial(q, 200_000, replacement=True)
    logq, logp = q.log()[x], p.log()[x]
    assert abs(kl_k1(logq, logp).mean().item() - exact) < 0.01
    assert abs(kl_k3(logq, logp).mean().item() - exact) < 0.01
    assert (kl_k3(logq, logp) >= 0).all()
    # k2 is biased (here above the exact value) but close for nearby distributions
    assert kl_k2(logq, logp).mean().item() > 0


def test_budget_controller_rises_while_over_and_falls_to_zero_under():
    from cory.kl import BudgetKL

    c = BudgetKL(beta=0.0, budget=5.0, lr=0.1)
    betas = []
    for _ in range(5):
        c.update(sequence_kl=8.0, n_samples=32)
        betas.append(c.beta)
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:])) and abs(betas[-1] - 1.5) < 1e-9
    for _ in range(20):
        c.update(sequence_kl=2.0, n_samples=32)
    assert c.beta == 0.0
