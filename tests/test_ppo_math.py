"""PPO's surrogate: plain policy gradient at ratio 1; zero gradient where clipping binds."""

import torch

from cory.algorithms.ppo import clipped_surrogate, clipped_value_loss


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
