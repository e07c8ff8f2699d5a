"""Scoring given responses: per-token log-probs, entropy, values and whole distributions.

Shapes: B = batch, Lq = query length, Lr = response length, V = vocabulary. The sequence is
[query | response] ([B, Lq + Lr], queries left-padded, responses right-padded, positions
`cumsum(mask) - 1`: the padding convention of `cory.policy`). Response token t is predicted by the
output at column Lq - 1 + t.

`Scorer` is the one way a run scores: a model with the scoring settings of the run (temperature,
shared prompt prefix). Training (reference, old policy, values, exact KL, every update pass) and
evaluation (KL to the reference) hold scorers; `sequence_logprobs` is the pass they run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from cory.generation.native import (lay_out_prefix, lay_out_states, lm_forward, position_ids_from_mask, prefix_cache,
                                   shared_prefix_length, takes_cache)
from cory.policy import PolicyModel, unwrap


@dataclass
class LogprobOutput:
    """Per-response-token quantities from `sequence_logprobs`; masked positions are 0."""

    logprobs: torch.Tensor
    """[B, Lr] log pi(response token | prefix) at the given temperature (float32)."""
    entropy: torch.Tensor | None = None
    """[B, Lr] entropy of the tempered next-token distribution."""
    values: torch.Tensor | None = None
    """[B, Lr] value of the state before each response token (float32)."""
    full_logprobs: torch.Tensor | None = None
    """[B, Lr, V] the whole tempered log-softmax, for exact KL."""


def sequence_layout(query_ids, query_mask, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [B, L], attention mask [B, L], position ids [B, L]) of [query | response]."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    return input_ids, attention_mask, position_ids_from_mask(attention_mask)


def sequence_logprobs(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_values: bool = False,
    with_full_logprobs: bool = False,
    shared_prefix: bool = False,
    trunk_hidden: torch.Tensor | None = None,
) -> LogprobOutput:
    """Per-token log-probs of responses given queries, in one forward pass.

    model: a `PolicyModel` (possibly wrapped by DDP/accelerate) or a bare HF causal LM (e.g. the
    frozen reference). query_ids/query_mask: [B, Lq] left-padded; response_ids/response_mask:
    [B, Lr] right-padded. Gradients flow unless the caller disables them.

    Logits, entropy and values are read from columns Lq-1 .. Lq+Lr-2: `values[:, t]` is the value of
    the state BEFORE response token t. temperature 0 (greedy sampling) is scored at T=1, as
    generation records it. `shared_prefix`: the leading query tokens that every row shares (a chat
    template's system and example turns; at least 16) run once, batch 1, and their keys and values
    are repeated for every row, gradients included; equal to the full pass up to float rounding, it
    saves (B - 1) x prefix tokens of forward and backward. For a `PolicyModel` or an HF causal LM
    (with or without adapters); other modules run the full pass. `trunk_hidden` [B, Lq + Lr, H]: the
    frozen trunk's output of these columns (`cory.trunk`), for a model with a `trunk_depth`: only its
    top layers, norm and head run (on every column but the last, whose logit is not needed).
    Returns a `LogprobOutput`; every masked position is 0.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    inner = unwrap(model)
    is_policy = isinstance(inner, PolicyModel)
    if with_values and not (is_policy and inner.value_head is not None):
        raise ValueError("with_values=True needs a PolicyModel built with value_head=True")

    device = next(inner.parameters()).device
    query_ids, query_mask, response_ids, response_mask = (
        t.to(device) for t in (query_ids, query_mask, response_ids, response_mask)
    )
    lq, lr = query_ids.shape[1], response_ids.shape[1]
    top_only = trunk_hidden is not None and getattr(inner, "trunk_depth", 0) > 0
    prefix = shared_prefix_length(query_ids, query_mask) if shared_prefix and takes_cache(inner) else 0
    cache = None
    if prefix:
        laid_ids, laid_mask, shared = lay_out_prefix(query_ids, query_mask, prefix)
        if top_only:
            trunk_hidden = lay_out_states(trunk_hidden.to(device), query_mask, prefix)
        else:
            cache = prefix_cache(inner.lm if is_policy else model, shared.tolist(), None, device)
            cache.batch_repeat_interleave(query_ids.shape[0])
        query_ids, query_mask = laid_ids, laid_mask
    input_ids, attention_mask, position_ids = sequence_layout(query_ids, query_mask, response_ids, response_mask)

    if top_only:
        # The top layers on the trunk's output of every column but the last: the last Lr outputs
        # predict the Lr response tokens.
        hidden = trunk_hidden.to(device)
        end = lq + lr - 1
        kwargs = dict(trunk_hidden=hidden[:, prefix:end], attention_mask=attention_mask[:, :end],
                      position_ids=position_ids[:, prefix:end], logits_to_keep=lr)
        if prefix:
            kwargs["prefix_hidden"] = hidden[:1, :prefix]
        logits, values = model(**kwargs) if is_policy else (model(**kwargs).logits, None)
    else:
        input_ids, position_ids = input_ids[:, prefix:], position_ids[:, prefix:]  # the prefix is in the cache
        # Keep Lr+1 trailing positions: the last one predicts past the response and is dropped.
        keep = lr + 1
        if is_policy:
            logits, values = model(input_ids, attention_mask, position_ids, logits_to_keep=keep, past_key_values=cache)
        else:
            out = lm_forward(model, input_ids, attention_mask, position_ids, keep, use_cache=cache is not None,
                             past_key_values=cache)
            logits, values = out.logits[:, -keep:], None
        logits = logits[:, :-1]  # [B, Lr, V]
        values = values[:, -keep:-1] if values is not None else None

    keep_mask = response_mask.bool()
    t = temperature if temperature > 0 else 1.0
    # float32 before the softmax: bf16 log-probs are too coarse for importance ratios. Each of
    # these [B, Lr, V] passes costs as much memory traffic as a layer at 49k vocabulary entries, so
    # none is made that is not needed: no copy of float32 logits, no division at T = 1.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 models stay float64
    if t != 1.0:
        logits = logits / t
    logp_all = torch.log_softmax(logits, dim=-1)
    del logits
    logprobs = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    result = LogprobOutput(logprobs=zero_where_masked(logprobs, keep_mask))
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        result.entropy = zero_where_masked(entropy, keep_mask)
    if with_values:
        result.values = zero_where_masked(values, keep_mask)
    if with_full_logprobs:
        if logp_all.requires_grad:
            result.full_logprobs = zero_where_masked(logp_all, keep_mask.unsqueeze(-1))
        else:  # nothing else holds it: mask in place instead of a second [B, Lr, V] tensor
            result.full_logprobs = logp_all.masked_fill_(~keep_mask.unsqueeze(-1), 0.0)
    return result


def zero_where_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # where() rather than multiply: garbage at padded positions may be inf/NaN, and NaN * 0 = NaN.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


@dataclass(frozen=True)
class Scorer:
    """One model with the run's scoring settings; `scorer(batch, with_...)` scores a batch (anything
    with query_ids, query_mask, response_ids, response_mask: a Generation, a Rollout, a minibatch).

    temperature: that of sampling (0, greedy, is scored at 1). shared_prefix: run the rows' shared
    prompt prefix once (see `sequence_logprobs`)."""

    model: nn.Module
    temperature: float = 1.0
    shared_prefix: bool = False

    def __call__(self, batch, rows: torch.Tensor | None = None, **outputs: bool) -> LogprobOutput:
        """outputs: with_entropy, with_values, with_full_logprobs. rows: score only these rows. A
        batch that carries its trunk's output (`trunk_hidden`) is scored from it by a model that
        trains only its top layers."""
        trunk = getattr(batch, "trunk_hidden", None)
        tensors = (batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask, trunk)
        if rows is not None:
            tensors = tuple(t[rows.to(t.device)] if t is not None else None for t in tensors)
        return sequence_logprobs(self.model, *tensors[:4], temperature=self.temperature, shared_prefix=self.shared_prefix,
                                 trunk_hidden=tensors[4], **outputs)

    def of(self, model: nn.Module) -> "Scorer":
        """The same settings for another model (the policy next to its reference)."""
        return replace(self, model=model)

    @property
    def device(self) -> torch.device:
        return next(unwrap(self.model).parameters()).device
