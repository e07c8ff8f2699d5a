"""The pessimistic ensemble reference: p~ <= every member, h in [0, 1], KL(q||p~) >= KL(q||p_k)."""

import torch

from cory.drift.ensemble import pessimistic
from cory.drift.exact import kl_exact


def test_pessimistic_is_below_every_member_and_help_mass_is_a_probability():
    torch.manual_seed(0)
    members = torch.log_softmax(torch.randn(4, 8, 30) * 2, -1)
    log_min, h = pessimistic(members)
    assert torch.all(log_min.exp()[None] <= members.exp() + 1e-7)
    assert torch.all((h >= 0) & (h <= 1))
    assert torch.allclose(log_min.exp().sum(-1) + h, torch.ones(8), atol=1e-6)
    # Identical members: nothing is missing.
    same = torch.log_softmax(torch.randn(1, 5, 30), -1).expand(3, -1, -1)
    assert torch.allclose(pessimistic(same)[1], torch.zeros(5), atol=1e-6)


def test_kl_against_pessimistic_reference_is_never_below_any_member():
    torch.manual_seed(1)
    for _ in range(20):
        members = torch.log_softmax(torch.randn(3, 6, 12) * 1.5, -1)
        logq = torch.log_softmax(torch.randn(6, 12) * 2, -1)
        log_min, _ = pessimistic(members)
        semi = kl_exact(logq, log_min)
        for k in range(3):
            assert torch.all(semi >= kl_exact(logq[None], members[k][None])[0] - 1e-6)


def test_hand_example():
    p1 = torch.tensor([0.5, 0.5]).log()
    p2 = torch.tensor([0.9, 0.1]).log()
    log_min, h = pessimistic(torch.stack([p1, p2]))
    assert torch.allclose(log_min.exp(), torch.tensor([0.5, 0.1]))
    assert abs(h.item() - 0.4) < 1e-6
    q = torch.tensor([0.2, 0.8]).log()
    expected = 0.2 * torch.log(torch.tensor(0.2 / 0.5)) + 0.8 * torch.log(torch.tensor(0.8 / 0.1))
    assert torch.allclose(kl_exact(q, log_min), expected)
