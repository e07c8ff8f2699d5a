"""cory's own sampling loop on a HF causal LM: prefill, then one cached forward per new token.

- `KVStepper` is the one KV-cache stepping helper: it runs a prompt (optionally continuing the
  cache of a shared prefix), then appends one token per row at a time into a preallocated attention
  mask. The sampling loop steps the policy with it; `cory.drift.lockstep` steps a frozen reference
  (or each member of an ensemble) alongside.
- Shared prompt prefixes: the token prefix that every prompt of a batch shares runs once (batch 1)
  and its cache is repeated for every row (`shared_prefix_length`, `lay_out_prefix`,
  `prefix_cache`); `PrefixStore` keeps the last prefix's cache across calls while the weights do not
  change. Scoring (`cory.scoring`) uses the same three functions.
- Repeated prompts (a group's answers to one prompt): each distinct prompt is prefilled once and its
  cache, logits and trunk states are given to each of its rows (`distinct_rows`).
- Stop strings end a row once its decoded tail contains one (`stop_window`, `hits_stop_string`).

Padding convention (see `cory.policy`): queries left-padded, responses right-padded, positions
`cumsum(mask) - 1`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cory.generation.sampling import SamplingParams, sample_tokens
from cory.trunk import TrunkRecorder

LogitsHook = Callable[[int, torch.Tensor], torch.Tensor]
"""`hook(step, logprobs [B, V]) -> logits [B, V]`: changes the distribution sampled at `step`.

It receives the tempered log-probs (`log_softmax(logits / T)`, float32) and returns unnormalised
logits; the result is renormalised, sampled from, and its log-probs are what `Generation.logprobs`
records. A hook object may also define `start(query_ids, query_mask)` (called once before the first
step) and `observe(step, token [B], alive [B])` (called after each sampled token), which is how a
hook runs a second model in lockstep (e.g. the reference, for a hard KL budget)."""


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, L] positions counting real tokens only (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_forward(lm: nn.Module, input_ids, attention_mask, position_ids, logits_to_keep: int = 0, with_hidden: bool = False, **kw):
    """One forward of a HF causal LM, asking it to compute only the logits we keep when it can."""
    if logits_to_keep and accepts_logits_to_keep(lm):
        kw["logits_to_keep"] = logits_to_keep
    if with_hidden:
        kw["output_hidden_states"] = True
    return lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)


def accepts_logits_to_keep(lm: nn.Module) -> bool:
    # PEFT wrappers forward **kwargs to the model they wrap, so ask the innermost model.
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return _forward_has_param(type(inner), "logits_to_keep")


def takes_cache(module: nn.Module) -> bool:
    """Whether `module`'s forward can continue from a KV cache: an HF causal LM, either behind a
    PEFT wrapper (or cory.lora's AdaptersDisabled, which holds one), or a module that says so."""
    if getattr(module, "takes_cache", False):
        return True
    inner = getattr(module, "peft_model", module)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _forward_has_param(type(inner), "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_has_param(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


# --------------------------------------------------------------------------------------------------
# Shared prompt prefixes
# --------------------------------------------------------------------------------------------------


class PrefixStore:
    """The KV cache (batch 1) of the last prompt prefix run, kept across calls by `Policy.frozen_prefix`."""

    def __init__(self):
        self.tokens: list[int] = []
        self.cache = None


def prefix_cache(lm: nn.Module, tokens: list[int], store: PrefixStore | None, device: torch.device):
    """The KV cache (batch 1) of `tokens` (None when empty). With a store, the longest part it shares
    with the store's last prefix is copied from there and only the rest is run; the store then holds
    `tokens`. The store must only live while the weights do not change."""
    if not tokens:
        return None
    have, cache = 0, None
    if store is not None and store.cache is not None:
        for a, b in zip(store.tokens, tokens):
            if a != b:
                break
            have += 1
        if have:
            cache = copy.deepcopy(store.cache)
            if have < len(store.tokens):
                cache.crop(have - len(store.tokens))  # a negative count removes that many trailing tokens
    if have < len(tokens):
        ids = torch.tensor([tokens[have:]], dtype=torch.long, device=device)
        attention = torch.ones((1, len(tokens)), dtype=torch.long, device=device)
        positions = torch.arange(have, len(tokens), device=device)[None]
        cache = lm_forward(lm, ids, attention, positions, logits_to_keep=1, use_cache=True, past_key_values=cache).past_key_values
    if store is not None:
        store.tokens, store.cache = list(tokens), copy.deepcopy(cache)
    return cache


def distinct_rows(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(first [U], inverse [B]): the first row of each distinct prompt and, for every row, which of
    those it equals (`rows[first][inverse]` is `rows`); (None, None) when no two rows are equal."""
    rows = torch.where(query_mask.bool(), query_ids, -1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return None, None
    order = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((distinct.shape[0],), rows.shape[0], dtype=torch.long, device=rows.device).scatter_reduce_(0, inverse, order, "amin")
    return first, inverse


def shared_prefix_length(query_ids: torch.Tensor, query_mask: torch.Tensor, minimum: int = 16) -> int:
    """How many leading real tokens every row of a left-padded batch shares, leaving each row at
    least one token of its own; 0 when that is under `minimum` or there is one row."""
    if query_ids.shape[0] < 2:
        return 0
    lengths = query_mask.sum(-1).tolist()
    rows = [ids[len(ids) - n:] for ids, n in zip(query_ids.tolist(), lengths)]
    limit = min(lengths) - 1
    first = rows[0]
    common = 0
    while common < limit and all(r[common] == first[common] for r in rows):
        common += 1
    return common if common >= minimum else 0


def prefix_columns(query_mask: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a left-padded batch whose rows share their first `prefix` real tokens: (own [B, Lq], 1
    where a row's own tokens lie, the same columns in both layouts; start [B], the column where a
    row's prefix begins in the left-padded layout)."""
    lq = query_mask.shape[1]
    start = lq - query_mask.long().sum(-1)
    columns = torch.arange(lq, device=query_mask.device)[None]
    return columns >= (start + prefix)[:, None], start


def lay_out_prefix(query_ids: torch.Tensor, query_mask: torch.Tensor, prefix: int,
                   pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch whose rows share their first `prefix` real tokens, re-laid as [shared
    prefix | left padding | own tokens] (same width, same real tokens at the same positions, so
    `position_ids_from_mask` gives every token its old position): (ids [B, Lq], mask [B, Lq],
    the shared tokens [prefix])."""
    own, start = prefix_columns(query_mask, prefix)
    shared = query_ids[0, int(start[0]):][:prefix]
    columns = torch.arange(query_ids.shape[1], device=query_ids.device)[None]
    mask = (own | (columns < prefix)).to(query_mask.dtype)
    ids = torch.where(own, query_ids, torch.full_like(query_ids, pad_id))
    ids[:, :prefix] = shared
    return ids, mask, shared


def lay_out_states(states: torch.Tensor, query_mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """Per-column states [B, Lq (+ more), H] of a left-padded batch, re-laid as `lay_out_prefix`
    re-lays its ids: [the shared prefix's | zeros | own]; columns after the queries unchanged."""
    own, start = prefix_columns(query_mask, prefix)
    lq = query_mask.shape[1]
    columns = (start[:, None] + torch.arange(prefix, device=start.device)[None]).unsqueeze(-1).expand(-1, -1, states.shape[-1])
    laid = torch.where(own.unsqueeze(-1), states[:, :lq], torch.zeros((), dtype=states.dtype, device=states.device))
    laid = torch.cat([states[:, :lq].gather(1, columns), laid[:, prefix:], states[:, lq:]], dim=1)
    return laid


def restore_states(laid: torch.Tensor, query_mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """The inverse of `lay_out_states` for the query columns: states in the left-padded layout
    (zeros where the rows are padded)."""
    own, start = prefix_columns(query_mask, prefix)
    lq = query_mask.shape[1]
    out = torch.where(own.unsqueeze(-1), laid[:, :lq], torch.zeros((), dtype=laid.dtype, device=laid.device))
    columns = (start[:, None] + torch.arange(prefix, device=start.device)[None]).unsqueeze(-1).expand(-1, -1, laid.shape[-1])
    out = out.scatter(1, columns, laid[:, :prefix])
    return torch.cat([out, laid[:, lq:]], dim=1)


# --------------------------------------------------------------------------------------------------
# Stepping a model through a batch with its KV cache
# --------------------------------------------------------------------------------------------------


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers allocated once, for `length` tokens:
    each update writes the new ones in place and hands attention views of the part filled so far,
    where a dynamic layer copies the whole cache into a new tensor at every step."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, _ = key_states.shape
            self.key_buffer = key_states.new_empty(batch, heads, self.length, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(batch, heads, self.length, value_states.shape[-1])
            self.filled = 0
        end = self.filled + key_states.shape[-2]
        if end > self.length:  # more tokens than planned: grow (a copy, as a dynamic layer would make)
            self.length = 2 * end
            self.key_buffer = torch.cat([self.key_buffer[:, :, : self.filled], self.key_buffer.new_empty(*self.key_buffer.shape[:2], self.length - self.filled, self.key_buffer.shape[-1])], dim=2)
            self.value_buffer = torch.cat([self.value_buffer[:, :, : self.filled], self.value_buffer.new_empty(*self.value_buffer.shape[:2], self.length - self.filled, self.value_buffer.shape[-1])], dim=2)
        self.key_buffer[:, :, self.filled : end] = key_states
        self.value_buffer[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Rows `indices` of the cache (repeats allowed: a prompt run once, its cache given to each of its rows)."""
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, : self.filled], self.value_buffer[:, :, : self.filled]


def preallocated_cache(lm: nn.Module, length: int, start=None):
    """A KV cache of `PreallocatedLayer`s for `length` tokens, holding `start`'s keys and values
    first (a shared prefix's cache, already repeated for every row); None for a model whose layers
    do not all attend fully (it keeps its own cache)."""
    config = lm.config.get_text_config(decoder=True)
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return start
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(length) for _ in cache.layers]
    if start is not None:
        for layer, own in zip(cache.layers, start.layers):
            layer.update(own.keys, own.values)
    return cache


class KVStepper:
    """A causal LM following a batch token by token with its own KV cache.

    `prefill(query_ids, query_mask)` runs the left-padded prompts (with `shared_prefix`, their
    shared prefix once, its cache repeated for every row: `prefix` tokens, 0 when none ran) and
    returns the last position's logits [B, V]; each `advance(token [B])` appends one token per row
    and returns the next logits. The attention mask and the KV cache (`PreallocatedLayer`) are
    allocated for `capacity` new tokens (they grow if more come)."""

    def __init__(self, lm: nn.Module, capacity: int = 64, recorder: TrunkRecorder | None = None):
        self.lm = lm
        self.capacity = capacity
        self.recorder = recorder
        self.recording = recorder.recording if recorder is not None else contextlib.nullcontext
        self.prefix = 0

    def prefill(self, query_ids: torch.Tensor, query_mask: torch.Tensor, shared_prefix: bool = False,
                store: PrefixStore | None = None, pad_id: int = 0) -> torch.Tensor:
        """A prompt that several rows share (a group's answers to one prompt) runs once; its cache,
        logits and trunk states are then given to each of its rows."""
        first, inverse = distinct_rows(query_ids, query_mask)
        if first is None:
            with self.recording():
                return self._prefill(query_ids, query_mask, shared_prefix, store, pad_id)
        recorded = len(self.recorder.states) if self.recorder is not None else 0
        with self.recording():
            logits = self._prefill(query_ids[first], query_mask[first], shared_prefix, store, pad_id)
        self.attention, self.next_position = self.attention[inverse], self.next_position[inverse]
        self.cache.batch_select_indices(inverse)
        if self.recorder is not None and len(self.recorder.states) > recorded:
            self.recorder.states[-1] = self.recorder.states[-1][inverse]
        return logits[inverse]

    def _prefill(self, query_ids, query_mask, shared_prefix, store, pad_id) -> torch.Tensor:
        batch, lq = query_ids.shape
        device = query_ids.device
        self.attention = torch.ones((batch, lq + self.capacity), dtype=torch.long, device=device)
        self.length = lq
        prefix = self.prefix = shared_prefix_length(query_ids, query_mask) if shared_prefix else 0
        if prefix:
            laid, laid_mask, shared = lay_out_prefix(query_ids, query_mask, prefix, pad_id)
            self.attention[:, :lq] = laid_mask
            positions = position_ids_from_mask(laid_mask)
            cache = prefix_cache(self.lm, shared.tolist(), store, device)
            cache.batch_repeat_interleave(batch)
            out = lm_forward(self.lm, laid[:, prefix:], self.attention[:, :lq], positions[:, prefix:], logits_to_keep=1,
                             use_cache=True, past_key_values=preallocated_cache(self.lm, lq + self.capacity, cache))
        else:
            self.attention[:, :lq] = query_mask
            positions = position_ids_from_mask(query_mask)
            out = lm_forward(self.lm, query_ids, query_mask, positions, logits_to_keep=1, use_cache=True,
                             past_key_values=preallocated_cache(self.lm, lq + self.capacity))
        self.cache = out.past_key_values
        self.next_position = positions[:, -1:] + 1  # [B, 1]; the last query column is real (left padding)
        return out.logits[:, -1]

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        if self.length == self.attention.shape[1]:
            self.attention = torch.cat([self.attention, torch.ones_like(self.attention)], dim=1)
        self.length += 1
        with self.recording():
            out = self.lm(input_ids=token[:, None].to(self.attention.device), attention_mask=self.attention[:, : self.length],
                          position_ids=self.next_position, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = self.next_position + 1
        return out.logits[:, -1]


# --------------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------------


def sample(
    lm: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    logits_hook: LogitsHook | None,
    stop_ids: torch.Tensor,
    pad_id: int,
    decode: Callable[[list[list[int]]], list[str]],
    prefix_store: PrefixStore | None = None,
    trunk_depth: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prefill, then one cached forward per new token; `stop_ids` [n] end a row (EOS, end of turn).

    Returns response ids [B, n], mask [B, n], logprobs [B, n], finished [B], where n <= max_new_tokens
    is the number of steps run (the loop stops once every row is done), and with `trunk_depth` the
    trunk's output (the input of decoder layer `trunk_depth`) of [query | response]'s columns
    [B, Lq + n, H], kept as the loop runs them (the last column, never fed back, is 0; None when a
    prefix store spared part of the prefix).
    """
    if not trunk_depth:
        return _sample(lm, query_ids, query_mask, params, generator, logits_hook, stop_ids, pad_id, decode, prefix_store)
    with TrunkRecorder(lm, trunk_depth) as recorder:
        return _sample(lm, query_ids, query_mask, params, generator, logits_hook, stop_ids, pad_id, decode, prefix_store, recorder)


def _trunk_columns(states: list[torch.Tensor], query_mask, prefix: int) -> torch.Tensor | None:
    """The trunk states recorded by the loop as [B, Lq + n, H] in the left-padded layout; `prefix`:
    the shared prefix the prefill ran once (`KVStepper.prefix`, not recomputed here: the prefill
    decides it on the distinct prompts, and a batch of one prompt repeated has none)."""
    if prefix:
        first = states.pop(0)
        if first.shape[:2] != (1, prefix):  # the store held part of the prefix: not all of it was run
            return None
        laid = torch.cat([first.expand(query_mask.shape[0], -1, -1), states.pop(0)], dim=1)
        query = restore_states(laid, query_mask, prefix)
    else:
        query = states.pop(0)
    last = torch.zeros_like(query[:, :1])  # the last sampled token is never fed back
    return torch.cat([query, *states, last], dim=1)


def _sample(lm, query_ids, query_mask, params, generator, logits_hook, stop_ids, pad_id, decode, prefix_store, recorder=None):
    batch = query_ids.shape[0]
    max_new = params.max_new_tokens
    device = query_ids.device
    temperature = params.temperature if params.temperature > 0 else 1.0

    # Preallocated outputs: each step writes one column, no concatenation.
    out_ids = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((batch, max_new), dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    stepper = KVStepper(lm, capacity=max_new, recorder=recorder)
    logits = stepper.prefill(query_ids, query_mask, params.shared_prefix, prefix_store, pad_id)
    window = stop_window(params.stop_strings)
    steps = 0
    if logits_hook is not None and hasattr(logits_hook, "start"):
        logits_hook.start(query_ids, query_mask)
    for step in range(max_new):
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        if logits_hook is not None:
            logprobs = torch.log_softmax(logits_hook(step, logprobs).float(), dim=-1)
        token = sample_tokens(logprobs, params, generator)
        alive = ~done
        # Finished rows keep sampling (so the generator stream, and thus every other row, is the
        # same whatever stops when) but their outputs are overwritten with pad / 0.
        out_ids[:, step] = torch.where(alive, token, pad_id)
        out_mask[:, step] = alive.long()
        out_logprobs[:, step] = torch.where(alive, logprobs.gather(-1, token[:, None])[:, 0], 0.0)
        steps = step + 1
        if logits_hook is not None and hasattr(logits_hook, "observe"):
            logits_hook.observe(step, token, alive)

        done = done | torch.isin(token, stop_ids)
        if window:
            done = done | hits_stop_string(out_ids, done, steps, window, params.stop_strings, decode)
        if step == max_new - 1 or bool(done.all()):
            break
        logits = stepper.advance(token)

    trunk = _trunk_columns(recorder.states, query_mask, stepper.prefix) if recorder is not None else None
    return out_ids[:, :steps], out_mask[:, :steps], out_logprobs[:, :steps], done, trunk


def stop_window(stop_strings: tuple[str, ...]) -> int:
    """How many trailing tokens to decode to see a stop string completed by the newest token.

    A string of n characters spans at most n tokens when each token decodes to >= 1 character;
    byte-fallback tokenizers may need up to 4 tokens per character, hence 4n, plus slack for
    tokenizers whose decoding of a slice differs at its left edge. 0 = no stop strings.
    """
    if not stop_strings:
        return 0
    return 4 * max(len(s) for s in stop_strings) + 8


def hits_stop_string(
    out_ids: torch.Tensor,
    done: torch.Tensor,
    steps: int,
    window: int,
    stop_strings: tuple[str, ...],
    decode: Callable[[list[list[int]]], list[str]],
) -> torch.Tensor:
    """[B] bool: rows not yet done whose response tail now contains a stop string.

    Decoding only the tail keeps the check O(window) per row per step instead of O(length).
    """
    hits = torch.zeros_like(done)
    rows = (~done).nonzero().flatten().tolist()
    if not rows:
        return hits
    tails = out_ids[rows, max(0, steps - window):steps].tolist()
    for row, text in zip(rows, decode(tails)):
        if any(s in text for s in stop_strings):
            hits[row] = True
    return hits


def kept_token_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's masked-in tokens ([B, L] right-padded ids and mask) as a list."""
    lengths = mask.sum(-1).tolist()
    return [row[:n] for row, n in zip(ids.tolist(), lengths)]
