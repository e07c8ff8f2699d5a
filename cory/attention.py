"""Grouped-query attention on the CPU without copying the key and value heads.

A model whose attention heads share key/value heads (SmolLM2: 9 query heads, 3 key/value heads)
runs transformers' `sdpa` attention by first repeating every key and value head for each query
head it serves whenever an attention mask is given, which cory's padded batches always give. In a
decoding step that copy is the whole KV cache, at every layer and every step: it took longer than
the attention itself. torch's own kernel takes the grouped heads as they are (`enable_gqa`) on the
CPU, masked or not, and gives the same numbers. `use_grouped_attention(lm)` switches a model to it;
elsewhere (CUDA, where a masked grouped call leaves the fast kernels) it runs transformers' `sdpa`.

The choice is the model's `attn_implementation`, which `save_pretrained` does not write: a saved
model loads anywhere as before.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GROUPED = "cory_grouped_sdpa"
"""The name the attention function is registered under (with sdpa's masks)."""


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, with grouped key/value heads passed to the kernel as they
    are on the CPU. query [B, heads, Lq, D], key and value [B, kv heads, Lk, D]; returns the
    output [B, Lq, heads, D]."""
    if query.device.type != "cpu" or key.shape[1] == query.shape[1] or kwargs.get("position_bias") is not None \
            or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_length = query.shape[2]
    causal = q_length > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and key.shape[2] > q_length:  # as sdpa: only an empty static cache's prefill gets here
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED, sdpa_mask)


def use_grouped_attention(lm: nn.Module) -> None:
    """Switch a transformers model that runs `sdpa` attention to `grouped_sdpa` (same numbers, no
    copy of the grouped heads on the CPU); any other attention implementation is left alone."""
    config = getattr(lm, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(GROUPED)
