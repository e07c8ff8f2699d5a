"""Training only the top layers of a decoder, and running its frozen trunk once per sequence.

With `model.trainable_layers=K` only the top K decoder layers of an L-layer model train (fully or
through LoRA); the embeddings, the bottom L - K layers (the trunk), the final norm and the LM head
stay frozen. The trunk then computes the same hidden states for the policy and for its reference,
before and after every update: its output (the input of layer L - K) is computed once per sequence
(kept from sampling, or one no-grad pass per batch) and every later pass of an iteration (reference
scoring, recomputed old log-probs, values, exact KL, each update's forward and backward) runs only
the top K layers, the norm and the head on it.

- `trunk_depth(lm)` and `run_layers`/`top_forward`: the decoder's own pieces (rotary embeddings,
  the causal mask, the layers, the norm, the head), called on a given slice of the layers, for the
  decoder families whose forward passes its embeddings through unchanged (`FAMILIES`).
- `FrozenTop`: the reference of a full fine-tuning of the top layers: the policy's own frozen trunk,
  norm and head, and a frozen copy of the top K layers (the only extra memory).
- `TrunkRecorder`: keeps the trunk's output while the sampling loop runs.

Hidden states are [B, T, H]; the trunk's output of a sequence [query | response] is aligned with
its columns ([B, Lq + Lr, H]); the last response column's is never needed (its logit predicts past
the response) and is left 0.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder families whose forward takes the embeddings as they are (no scaling) and whose layers
all attend fully: the top layers can start from the trunk's output."""


def causal_lm(lm: nn.Module) -> nn.Module:
    """The HF causal LM inside a PEFT wrapper (or the LM itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def decoder(lm: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, rotary embeddings, norm) of a causal LM."""
    return causal_lm(lm).get_decoder()


def num_layers(lm: nn.Module) -> int:
    return len(decoder(lm).layers)


def trunk_problem(config, trainable: int) -> str | None:
    """Why the top `trainable` layers of a model with this HF config cannot train alone on a shared
    trunk, or None."""
    if config.model_type not in FAMILIES:
        return f"model.trainable_layers needs a decoder of the families {', '.join(FAMILIES)}; this model is {config.model_type}"
    layers = config.num_hidden_layers
    if not 0 < trainable <= layers:
        return f"model.trainable_layers={trainable} must be between 1 and the model's {layers} decoder layers"
    return None


def freeze_below(lm: nn.Module, start: int) -> None:
    """Only decoder layers start.. train: the embeddings, the trunk, the final norm and the head
    are frozen (the LM head shares its weights with the embeddings in tied models)."""
    top = {id(p) for layer in decoder(lm).layers[start:] for p in layer.parameters()}
    for p in causal_lm(lm).parameters():
        if id(p) not in top:
            p.requires_grad_(False)


def run_layers(lm: nn.Module, layers, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache=None) -> torch.Tensor:
    """`hidden` [B, T, H] through `layers` (consecutive decoder layers of `lm`), as the decoder's own
    forward runs them: the causal mask of `attention_mask` ([B, past + T]) and the rotary embeddings
    of `position_ids` ([B, T]); `cache` holds the keys and values of the columns before."""
    stack = decoder(lm)
    mask = create_causal_mask(config=stack.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=cache, position_ids=position_ids, layer_idx=layers[0].self_attn.layer_idx)
    rotary = stack.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                       past_key_values=cache, use_cache=cache is not None)
    return hidden


def top_forward(lm: nn.Module, layers, trunk_hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                keep: int, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `layers`, the final norm and the head on the trunk's output [B, T, H]: (logits of
    the last `keep` positions [B, keep, V], their final (normed) hidden states [B, keep, H])."""
    hidden = run_layers(lm, layers, trunk_hidden, attention_mask, position_ids, cache)
    final = decoder(lm).norm(hidden[:, -keep:])
    return causal_lm(lm).lm_head(final), final


def prefix_top_cache(lm: nn.Module, layers, trunk_hidden: torch.Tensor, rows: int):
    """The top layers' keys and values of a shared prefix (its trunk output [1, P, H]), repeated for
    `rows` rows: where the rows' own columns continue from."""
    cache = DynamicCache(config=decoder(lm).config)
    length = trunk_hidden.shape[1]
    positions = torch.arange(length, device=trunk_hidden.device)[None]
    run_layers(lm, layers, trunk_hidden, torch.ones((1, length), dtype=torch.long, device=trunk_hidden.device), positions, cache)
    cache.batch_repeat_interleave(rows)
    return cache


@torch.no_grad()
def trunk_states(lm: nn.Module, depth: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, H] the trunk's output (the input of layer `depth`) of whole sequences: one no-grad pass
    of the embeddings and the bottom `depth` layers."""
    stack = decoder(lm)
    return run_layers(lm, stack.layers[:depth], stack.embed_tokens(input_ids), attention_mask, position_ids)


@contextlib.contextmanager
def layers_swapped(lm: nn.Module, layers):
    """`lm`'s decoder runs `layers` in place of its own inside the block (the same trunk, other top)."""
    stack = decoder(lm)
    own = stack.layers
    stack.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        stack.layers = own


class FrozenTop(nn.Module):
    """The reference of a run that fully fine-tunes the top layers: the policy LM's frozen trunk,
    norm and head (shared, not copied) and a frozen copy of its top layers as they were at the
    start. Called like an HF causal LM (the whole initial model), or from the trunk's output
    (`trunk_hidden=`) like every policy and reference of a run with `trunk_depth`."""

    takes_cache = True

    def __init__(self, lm: nn.Module, depth: int):
        super().__init__()
        self.top = nn.ModuleList(copy.deepcopy(layer) for layer in decoder(lm).layers[depth:]).requires_grad_(False)
        self.start = depth
        """Where its own layers start (the copies replace the policy's from here)."""
        self.trunk_depth = depth
        """As on every scorer's model: score from the trunk's output when given it (0: at full depth)."""
        object.__setattr__(self, "lm", lm)  # not a submodule: the policy owns it (its mode, its device)

    @property
    def config(self):
        return self.lm.config

    def layers(self) -> list[nn.Module]:
        return list(decoder(self.lm).layers[: self.start]) + list(self.top)

    def forward(self, trunk_hidden=None, attention_mask=None, position_ids=None, logits_to_keep: int = 0, past_key_values=None,
                **kwargs):
        if trunk_hidden is not None:
            if kwargs.get("prefix_hidden") is not None:
                past_key_values = prefix_top_cache(self.lm, self.top, kwargs["prefix_hidden"], trunk_hidden.shape[0])
            logits, _ = top_forward(self.lm, self.top, trunk_hidden, attention_mask, position_ids,
                                    logits_to_keep or trunk_hidden.shape[1], past_key_values)
            return TopOutput(logits)
        with layers_swapped(self.lm, self.layers()):
            return self.lm(attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep,
                           past_key_values=past_key_values, **kwargs)


class TopOutput:
    """The logits of a top-layers pass, shaped like an HF model's output."""

    def __init__(self, logits):
        self.logits = logits


class TrunkRecorder:
    """Keeps the input of decoder layer `depth` of `lm` (the trunk's output) of the forwards run
    inside `recording()` blocks, in order, while the recorder is entered: the sampling loop's
    prefill and steps (not a lockstep reference's forwards through the same layers)."""

    def __init__(self, lm: nn.Module, depth: int):
        self.layer = decoder(lm).layers[depth]
        self.states: list[torch.Tensor] = []
        self.active = False

    def __enter__(self) -> "TrunkRecorder":
        self.handle = self.layer.register_forward_pre_hook(self._keep, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    @contextlib.contextmanager
    def recording(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _keep(self, module, args, kwargs):
        if self.active:
            self.states.append((args[0] if args else kwargs["hidden_states"]).detach())
