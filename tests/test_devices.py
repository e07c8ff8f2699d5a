"""Every pure function of the objective creates its tensors on its inputs' device.

The `meta` device exists on any machine and refuses to mix with CPU tensors, so running the
estimators, losses and shaping on it catches a tensor created without `device=`. With
CORY_TEST_DEVICE=cuda the same functions also run on the GPU and must agree with the CPU.
"""

import pytest
import torch

from cory import advantages as adv
from cory import losses
from cory.algorithms import ALGORITHMS
from cory.config import AlgoConfig
from cory.drift.exact import kl_exact, mixture_logprobs
from cory.kl import ESTIMATORS as KL_ESTIMATORS
from cory.shaping import adjust_scores, loss_mask, overlong_penalty, shaped_rewards


def inputs(device) -> dict:
    """Two groups; episodes 0 and 2 have two turns; responses of different lengths."""
    g = torch.Generator().manual_seed(0)
    b, l = 6, 5
    lengths = torch.tensor([5, 2, 3, 1, 4, 5])
    mask = (torch.arange(l)[None, :] < lengths[:, None]).float()
    t = {
        "rewards": torch.randn(b, l, generator=g, dtype=torch.float64) * mask,
        "values": torch.randn(b, l, generator=g, dtype=torch.float64) * mask,
        "logprobs": -torch.rand(b, l, generator=g, dtype=torch.float64) * mask,
        "old": -torch.rand(b, l, generator=g, dtype=torch.float64) * mask,
        "ref": -torch.rand(b, l, generator=g, dtype=torch.float64) * mask,
        "entropy": torch.rand(b, l, generator=g, dtype=torch.float64),
        "scores": torch.randn(b, generator=g, dtype=torch.float64),
        "finished": torch.tensor([True, False, True, True, False, True]),
        "mask": mask,
        "episode_ids": torch.tensor([0, 0, 1, 2, 2, 3]),
        "turn_index": torch.tensor([0, 1, 0, 0, 1, 0]),
        "group_ids": torch.tensor([0, 0, 0, 1, 1, 1]),
    }
    return {k: v.to(device) for k, v in t.items()}


def compute(device) -> dict:
    x = inputs(device)
    m, r, v = x["mask"], x["rewards"], x["values"]
    ep, ti, gid = x["episode_ids"], x["turn_index"], x["group_ids"]
    out = {
        "rtg": adv.rewards_to_go(r, m, 0.9),
        "rtg_turns": adv.rewards_to_go(r, m, 0.9, ep, ti, 0.5),
        "gae": adv.gae(r, v, m, 0.9, 0.8)[0],
        "gae_turns": adv.gae(r, v, m, 0.9, 0.8, ep, ti, 0.5)[0],
        "group": adv.group_normalized(x["scores"], gid),
        "mc": adv.mc_baseline(x["scores"], ti),
        "loo": adv.loo_baseline(x["scores"], gid, ti),
        "whiten": adv.whiten(r, m),
        "shaped": shaped_rewards(x["scores"], r.abs(), m, 0.1),
        "overlong": overlong_penalty(m.sum(-1), 5, 2, 1.0),
        "adjusted": adjust_scores(x["scores"], x["finished"], m.sum(-1), missing_eos_penalty=-1.0, overlong_buffer=2,
                                  overlong_penalty_at_max=1.0, max_new_tokens=5),
        "loss_mask": loss_mask(m, x["finished"], x["scores"], ep, ti, gid, overlong_filter=True, dynamic_sampling=True),
        "tis": losses.importance_weights(x["old"], x["logprobs"], m, "token-tis", 1.5).weight,
        "weights": losses.aggregate_weights(m, "seq-mean", losses.loss_counts(m), 5.0),
    }
    a = AlgoConfig(baseline="loo", dual_clip=3.0)
    for name, est in adv.ESTIMATORS.items():
        settings = {k: getattr(a, k) for k in est.keys if k != "group_size"}
        out[f"est_{name}"] = est.fn(r, m, v, ep, ti, gid, **settings)[0]
    for name, loss in losses.POLICY_LOSSES.items():
        settings = {k: getattr(a, k) for k in loss.keys}
        out[f"loss_{name}"] = loss.fn(x["logprobs"], x["old"], out["est_group"], m, **settings)[0]
    for name, kl in KL_ESTIMATORS.items():
        out[f"kl_{name}"] = kl(x["logprobs"], x["ref"])
    full_q = torch.log_softmax(torch.stack([r, v, x["ref"]], -1), -1)  # [B, L, 3] distributions
    full_p = torch.log_softmax(torch.stack([v, r, x["old"]], -1), -1)
    out["kl_exact"] = kl_exact(full_q, full_p)
    out["mixture_full"] = mixture_logprobs(full_q, full_p, m * 0.5)
    out["mixture_tokens"] = mixture_logprobs(x["logprobs"], x["ref"], m * 0.5)
    terms = ALGORITHMS["ppo"].objective_terms(AlgoConfig(ent_coef=0.01), "loss", "k3")
    out["objective"] = losses.objective(terms, x["logprobs"], x["entropy"], v, old_logprobs=x["old"], ref_logprobs=x["ref"],
                                        old_values=v, advantages=out["est_gae"], returns=r, is_weight=out["tis"], mask=m,
                                        weights=out["weights"], beta=0.1)[0]
    return out


def test_pure_functions_run_on_the_meta_device():
    for name, value in compute(torch.device("meta")).items():
        assert value.device.type == "meta", name


def test_pure_functions_agree_with_the_cpu_on_the_test_device(device):
    expected = compute(torch.device("cpu"))
    got = compute(device)
    for name, value in got.items():
        assert value.device.type == device.type, name
        assert torch.allclose(value.cpu(), expected[name], atol=1e-10), name


def test_multi_turn_estimators_against_a_loop_over_turns():
    # rewards-to-go across turns, written out: G(turn 0, token t) adds 0.9^(n-t) * 0.5 * G(turn 1, token 0).
    x = inputs("cpu")
    got = adv.rewards_to_go(x["rewards"], x["mask"], 0.9, x["episode_ids"], x["turn_index"], 0.5)
    r, m = x["rewards"], x["mask"]
    for first, second in ((0, 1), (3, 4)):
        g1 = adv.rewards_to_go(r[second : second + 1], m[second : second + 1], 0.9)[0, 0]
        n = int(m[first].sum())
        for t in range(n):
            own = sum(0.9 ** (s - t) * float(r[first, s]) for s in range(t, n))
            assert got[first, t] == pytest.approx(own + 0.9 ** (n - t) * 0.5 * float(g1), abs=1e-12)


@pytest.mark.parametrize("kernels", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_warns(tmp_path, capsys, monkeypatch, kernels):
    from accelerate.state import AcceleratorState

    from cory import build
    from cory.config import load_config

    monkeypatch.setattr(build, "cpu_has_bf16_kernels", lambda: kernels)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    AcceleratorState._reset_state(reset_partial_state=True)
    build.make_accelerator(load_config(None, ["train.mixed_precision=bf16", "train.log_with=[]"]), tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    err = capsys.readouterr().err
    assert ("without bf16 matmul kernels" in err) is (not kernels)
