"""The importance corrections (`algo.is_correction`) against hand computations, and their config."""

import math

import pytest
import torch

from cory.config import load_config
from cory.errors import UsageError
from cory.losses import importance_weights

# Per row: probabilities of the trainer's old policy and of the policy that sampled, and the mask.
# Token ratios r: row 0 [3, 0.5, 1] (R = 1.5); row 1 [1.2, (4: padding), (1: padding)] (R = 1.2);
# row 2 [2.5, 1, 0.3] (R = 0.75).
OLD = [[0.6, 0.2, 0.5], [0.6, 0.8, 0.5], [0.5, 0.4, 0.03]]
BEHAVIOUR = [[0.2, 0.4, 0.5], [0.5, 0.2, 0.5], [0.2, 0.4, 0.1]]
MASK = [[1, 1, 1], [1, 0, 0], [1, 1, 1]]

HAND = {
    # (correction, cap, floor): (weights, logged metric, share)
    ("token-tis", 2.0, 0.5): ([[2, 0.5, 1], [1.2, 0, 0], [2, 1, 0.3]], "is/truncated_tokens", 2 / 7),
    ("token-mis", 2.0, 0.5): ([[0, 0.5, 1], [1.2, 0, 0], [0, 1, 0.3]], "is/masked_tokens", 2 / 7),
    ("seq-tis", 1.3, 0.5): ([[1.3, 1.3, 1.3], [1.2, 0, 0], [0.75, 0.75, 0.75]], "is/truncated_sequences", 1 / 3),
    ("seq-mis", 1.3, 0.5): ([[0, 0, 0], [1.2, 0, 0], [0.75, 0.75, 0.75]], "is/masked_sequences", 1 / 3),
    ("icepop", 2.0, 0.4): ([[0, 0.5, 1], [1.2, 0, 0], [0, 1, 0]], "is/masked_tokens", 3 / 7),
    ("none", 2.0, 0.5): ([[1, 1, 1], [1, 0, 0], [1, 1, 1]], "is/truncated_tokens", 0.0),
}


@pytest.mark.parametrize("correction,cap,floor", list(HAND))
def test_each_correction_matches_the_hand_computation(correction, cap, floor):
    old, behaviour = torch.tensor(OLD, dtype=torch.float64).log(), torch.tensor(BEHAVIOUR, dtype=torch.float64).log()
    mask = torch.tensor(MASK, dtype=torch.float64)
    out = importance_weights(old, behaviour, mask, correction, cap, floor)
    weights, metric, share = HAND[(correction, cap, floor)]
    assert torch.allclose(out.weight, torch.tensor(weights, dtype=torch.float64), atol=1e-12)
    assert out.metric == metric
    assert float(out.corrected_fraction) == pytest.approx(share, abs=1e-12)
    logs = [abs(math.log(r)) for r in (3, 0.5, 1, 1.2, 2.5, 1, 0.3)]  # the masked tokens' |log r|
    assert float(out.log_ratio_abs_mean) == pytest.approx(sum(logs) / 7, rel=1e-12)
    assert float(out.log_ratio_abs_max) == pytest.approx(-math.log(0.3), rel=1e-12)


def test_a_sequence_ratio_that_overflows_is_truncated_or_masked_not_nan():
    old = torch.zeros(1, 400, dtype=torch.float32)
    behaviour = torch.full((1, 400), -2.0)  # R = e^800: inf in float32
    mask = torch.ones(1, 400)
    assert torch.equal(importance_weights(old, behaviour, mask, "seq-tis", 2.0).weight, torch.full((1, 400), 2.0))
    assert torch.equal(importance_weights(old, behaviour, mask, "seq-mis", 2.0).weight, torch.zeros(1, 400))


def test_the_old_tis_cap_key_names_its_new_spelling():
    with pytest.raises(UsageError, match=r"algo.tis_cap' is gone: use algo.is_cap"):
        load_config(None, ["algo.tis_cap=2"])


@pytest.mark.parametrize("overrides,message", [
    (["algo.is_cap=0.5"], "must be >= 1"),
    (["algo.is_floor=0.3", "generation.backend=vllm"], "no effect unless algo.is_correction=icepop"),
    (["algo.is_floor=0", "algo.is_correction=icepop", "generation.backend=vllm"], "must be in"),
    (["algo.is_cap=3", "algo.is_correction=none", "generation.backend=vllm"], "no effect with algo.is_correction=none"),
    (["algo.is_correction=seq"], "choose one of"),
])
def test_bad_corrections_are_refused_in_one_line(overrides, message):
    with pytest.raises(UsageError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
