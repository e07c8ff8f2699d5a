"""PPO's surrogate: plain policy gradient at ratio 1; zero gradient where clipping binds."""

import math

import pytest
import torch

from cory.losses import (aggregate_weights, clipped_policy_loss, clipped_surrogate, clipped_value_loss, clipped_weight_loss,
                         loss_counts, sequence_ratio_loss)


def test_gradient_equals_policy_gradient_at_ratio_one():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([0.7, -1.3, 2.0])
    loss, _ = clipped_surrogate(logp, logp.detach(), adv, 0.2)
    loss.sum().backward()
    pg = logp.clone().detach().requires_grad_(True)
    (-(adv * pg)).sum().backward()
    assert torch.allclose(logp.grad, pg.grad)


def test_zero_gradient_for_tokens_clipped_on_the_side_the_advantage_pushes():
    old = torch.zeros(4)
    # ratios: 1.5 (A>0, pushed up past 1.2: clipped), 0.5 (A<0, pushed down past 0.8: clipped),
    #         1.5 (A<0: not clipped, must still get gradient), 0.5 (A>0: not clipped)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2)
    loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    assert torch.allclose(logp.grad[2:], torch.tensor([1.5, -0.5]))  # d(-A * r)/dlogp = -A * r
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_value_clipping_is_pessimistic():
    old = torch.tensor([0.0])
    ret = torch.tensor([1.0])
    v = torch.tensor([0.5])
    # the clipped prediction is 0.2, further from the target: its error is used
    assert torch.allclose(clipped_value_loss(v, old, ret, 0.2), torch.tensor([0.5 * 0.8**2]))
    assert torch.allclose(clipped_value_loss(v, old, ret, 0.0), torch.tensor([0.5 * 0.5**2]))


def _clip(clip_range=0.2, clip_range_high=0.0, **kw):
    """A loss's keyword settings (the algo.* keys it reads)."""
    return {"clip_range": clip_range, "clip_range_high": clip_range_high, **kw}


def test_decoupled_clip_dapo_by_hand():
    old = torch.zeros(3)
    # ratio 1.25 with A > 0: inside [0.8, 1.28] (clipped under a symmetric 0.2); 1.4: clipped at 1.28;
    # 0.7 with A < 0: clipped at 0.8.
    logp = torch.log(torch.tensor([1.25, 1.4, 0.7])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, torch.ones(3), **_clip(0.2, 0.28, dual_clip=0.0))
    assert torch.allclose(loss, torch.tensor([-1.25, -1.28, 0.8]))
    assert clipped.tolist() == [0.0, 1.0, 1.0]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-1.25, 0.0, 0.0]))


def test_dual_clip_caps_negative_advantage_losses_by_hand():
    logp = torch.log(torch.tensor([5.0, 2.0, 5.0]))
    adv = torch.tensor([-1.0, -1.0, 1.0])
    loss, _ = clipped_policy_loss(logp, torch.zeros(3), adv, torch.ones(3), **_clip(0.2, dual_clip=3.0))
    # A < 0, ratio 5: max(5, 1.2) = 5, capped at 3; ratio 2: 2 < 3 stays; A > 0 untouched: max(-5, -1.2) = -1.2
    assert torch.allclose(loss, torch.tensor([3.0, 2.0, -1.2]))


def test_gspo_sequence_ratio_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.3, 9.0], [-0.2, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    loss, _ = sequence_ratio_loss(logp, old, adv, mask, **_clip(0.5, 0.5))
    s0, s1 = math.exp(0.2), math.exp(-0.2 / 3)  # exp(mean log-ratio over each sequence's own tokens)
    assert torch.allclose(loss * mask, torch.tensor([[-s0, -s0, 0.0], [-2 * s1] * 3]) * mask)
    ((loss * mask).sum(-1) / mask.sum(-1)).sum().backward()  # seq-mean: d/dlogp_t = -A s / |y|
    assert torch.allclose(logp.grad, torch.tensor([[-s0 / 2, -s0 / 2, 0.0], [-2 * s1 / 3] * 3]))


def test_cispo_keeps_gradient_on_clipped_tokens_by_hand():
    logp = torch.log(torch.tensor([3.0, 1.1])).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    loss, clipped = clipped_weight_loss(logp, torch.zeros(2), adv, torch.ones(2), **_clip(1.0, 1.0))
    # weights sg(clip(r, 0, 2)) = [2, 1.1]; loss = -w A log pi; gradient -w A even where clipped
    assert torch.allclose(loss, torch.tensor([-2.0 * math.log(3.0), 2.2 * math.log(1.1)]))
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-2.0, 2.2]))
    assert clipped.tolist() == [1.0, 0.0]


def test_aggregations_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    counts = loss_counts(mask)
    assert counts.tolist() == [4.0, 2.0]
    agg = {how: float((x * aggregate_weights(mask, how, counts, 5.0)).sum()) for how in ("token-mean", "seq-mean", "constant")}
    assert agg["token-mean"] == pytest.approx(10 / 4)
    assert agg["seq-mean"] == pytest.approx((2.0 + 4.0) / 2)
    assert agg["constant"] == pytest.approx(10 / (5 * 2))
