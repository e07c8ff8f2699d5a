"""Grouped-query attention without copied heads: the same numbers as transformers' sdpa, forward
and backward, padded and cached; a saved model loads with the default attention."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cory.attention import GROUPED, grouped_sdpa
from cory.generation.native import KVStepper
from cory.policy import PolicyModel


def grouped_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    return ids, mask


@pytest.mark.parametrize("padded", [True, False])
def test_grouped_attention_equals_sdpa_forward_and_backward(padded):
    """Padded rows (a mask reaches the kernel) and unpadded ones (none may: the causal flag)."""
    ids, mask = padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    results = []
    for impl in ("sdpa", GROUPED):
        lm = grouped_model()
        lm.set_attn_implementation(impl)
        logits = lm(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()].square().mean()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in lm.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-6, rtol=1e-5)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6, rtol=1e-5), name


def test_grouped_attention_decodes_as_sdpa():
    """Token by token from a KV cache (the sampling loop's shapes), padded rows included."""
    ids, mask = padded_batch()
    steps = []
    for impl in ("sdpa", GROUPED):
        lm = grouped_model().eval()
        lm.set_attn_implementation(impl)
        with torch.no_grad():
            stepper = KVStepper(lm, capacity=4)
            logits = [stepper.prefill(ids, mask)]
            for _ in range(6):
                logits.append(stepper.advance(logits[-1].argmax(-1)))
        steps.append(torch.stack(logits))
    assert torch.equal(steps[0].argmax(-1), steps[1].argmax(-1))
    assert torch.allclose(steps[0], steps[1], atol=1e-5, rtol=1e-5)


def test_a_policy_model_uses_it_and_a_saved_model_loads_without_it(tmp_path):
    lm = grouped_model()
    PolicyModel(lm)
    assert lm.config._attn_implementation == GROUPED
    lm.save_pretrained(tmp_path)
    assert GROUPED not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_grouped_attention_is_not_a_copy_of_the_heads():
    """The function hands the kernel the grouped key/value heads as they are: the kernel sees
    fewer key heads than query heads (a mutation that repeats them first fails this)."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa")))
        return original(query, key, value, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        q, k = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8)
        module = torch.nn.Module()
        grouped_sdpa(module, q, k, k.clone(), torch.ones(2, 1, 3, 5, dtype=torch.bool))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert seen == [(6, 2, True)]

