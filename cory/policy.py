"""The policy: any HF causal LM + tokenizer, an optional value head, prompt rendering and sampling.

Shapes: B = batch, Lq = query (prompt) length, Lr = response length, V = vocabulary, L = Lq + Lr.

Padding convention, used everywhere in cory:
- queries are LEFT-padded (the last query column is always a real token, so the position that
  predicts the first response token is the same column for every row);
- responses are RIGHT-padded;
- position ids are `cumsum(mask) - 1` clamped at 0, so a row's positions do not depend on how much
  padding its batch needed. Generation and scoring (`cory.scoring`) use the same rule, which is what
  makes the logprobs recorded while sampling equal the ones recomputed for training.

Prompt rendering has one home, `Policy.encode_prompts(prompts, params)`: every backend (the native
loop here, vLLM) and every caller (tasks, environments with example turns, CORY's observer,
evaluation, `cory eval`, the probes) turns prompt texts into query ids through it, chat template
included, and stops responses at `Policy.stop_ids(params)` (EOS, and the end-of-turn token of a
chat rendering).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from cory import zoo
from cory.attention import use_grouped_attention
from cory.generation.native import LogitsHook, PrefixStore, kept_token_lists, lm_forward, sample
from cory.generation.sampling import Generation, SamplingParams, cut_at_stop
from cory.paths import is_dir
from cory.trunk import decoder, prefix_top_cache, top_forward

VALUE_HEAD_FILE = "value_head.safetensors"



def tokenizer_mismatch(tokenizer, other, vocab_size: int, other_vocab_size: int) -> str | None:
    """Why a model with `other` tokenizer (and `other_vocab_size` logits) cannot score this model's
    token ids (`tokenizer`, `vocab_size`), or None: their vocabularies must map every token to the
    same id. The other model may have more logits than this one where the extra rows are padding
    beyond every token (Qwen2.5-7B's 152064 against 0.5B's 151936): they are cut off (`load_teacher`).
    Fewer logits are refused: a token this model can sample would have no probability there."""
    if tokenizer.get_vocab() != other.get_vocab():
        return f"its tokenizer differs ({len(other)} tokens against {len(tokenizer)}, or the same tokens under other ids)"
    if other_vocab_size < vocab_size:
        return (f"its logits cover {other_vocab_size} token ids, fewer than the policy's {vocab_size}: a token the policy "
                "can sample would have no probability under it")
    if other_vocab_size > vocab_size and len(other) > vocab_size:
        return (f"its logits cover {other_vocab_size} token ids and its tokenizer {len(other)} tokens, more than the "
                f"policy's {vocab_size} logits")
    return None


class PolicyModel(nn.Module):
    """The trainable module: a causal LM plus an optional scalar value head on the last hidden state.

    This is what gets wrapped by accelerate/DDP, so training forward passes go through its forward.
    The value head is `nn.Linear(hidden, 1)` with weight and bias initialised to ZERO: every value
    starts at 0 (a neutral baseline), and the critic's first gradients cannot push noise from a
    random head into the shared trunk (the trunk's gradient through the head is proportional to
    its weight). The head's weight still gets gradient (hidden state x value error) at once.
    """

    takes_cache = True
    """Its forward continues from a KV cache (`past_key_values`), as the LM's does."""

    def __init__(self, lm: nn.Module, value_head: bool = False):
        super().__init__()
        use_grouped_attention(lm)
        self.lm = lm
        self.trunk_depth = 0
        """Decoder layers below this one are a frozen trunk (`cory.trunk`; 0: every layer runs each pass)."""
        self.value_head: nn.Linear | None = None
        if value_head:
            hidden = lm.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            # Same device as the LM; float32 kept for the head (it is tiny) so values are precise
            # even when the LM runs in bf16.
            self.value_head.to(device=next(lm.parameters()).device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values=None,
        trunk_hidden: torch.Tensor | None = None,
        prefix_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, attention_mask, position_ids: [B, L].

        Returns (logits [B, L, V], values [B, L] float32 or None without a value head).
        `logits_to_keep=k > 0` returns only the last k positions of both ([B, k, V], [B, k]), which
        saves the [B, L, V] logits of a long prompt nobody needs. `past_key_values`: the KV cache of
        columns before `input_ids` (a shared prompt prefix); `attention_mask` then spans both.
        With `trunk_depth`, `trunk_hidden` [B, L, H] in place of `input_ids` runs only the top layers
        (`cory.trunk`): the trunk's output of these columns, and `prefix_hidden` [1, P, H] that of a
        prompt prefix every row shares (its top-layer keys and values are computed once here).
        """
        if trunk_hidden is not None:
            layers = decoder(self.lm).layers[self.trunk_depth:]
            if prefix_hidden is not None:
                past_key_values = prefix_top_cache(self.lm, layers, prefix_hidden, trunk_hidden.shape[0])
            logits, hidden = top_forward(self.lm, layers, trunk_hidden, attention_mask, position_ids,
                                         logits_to_keep or trunk_hidden.shape[1], past_key_values)
        else:
            # Without a cache to extend, use_cache=False: HF models default to building one, which
            # training never reads.
            out = lm_forward(self.lm, input_ids, attention_mask, position_ids, logits_to_keep, self.value_head is not None,
                             use_cache=past_key_values is not None, past_key_values=past_key_values)
            logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits  # no-op when the LM already sliced
            # hidden_states[-1] is the final (post-norm) hidden state that feeds the LM head.
            hidden = out.hidden_states[-1] if self.value_head is not None else None
            if hidden is not None and logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        values = None
        if self.value_head is not None:
            head = self.value_head
            values = head(hidden.to(head.weight.dtype)).squeeze(-1)
            values = values.to(torch.promote_types(values.dtype, torch.float32))
        return logits, values


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper (which keep it in `.module`)."""
    return getattr(model, "module", model)


class Policy:
    """A causal LM + tokenizer ready for RL: prompt rendering, batched generation, save/load.

    `module` (a `PolicyModel`) is the trainable thing to hand to the optimizer / accelerate;
    `model` is the LM inside it; assigning `policy.model = get_peft_model(policy.model, cfg)`
    swaps the LM inside the module.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, value_head: bool = False):
        self.module = PolicyModel(model, value_head=value_head)
        self.tokenizer = tokenizer
        self.prefix_store: PrefixStore | None = None
        prepare_tokenizer(tokenizer)

    @contextlib.contextmanager
    def frozen_prefix(self):
        """A block in which the weights do not change: sampling with `shared_prefix` (and the probes'
        action scores) keeps the KV cache of the last shared prefix and, on the next call, runs only
        what differs from it (e.g. an episode's steps share their instructions). Dropped on exit."""
        self.prefix_store = PrefixStore()
        try:
            yield self
        finally:
            self.prefix_store = None

    # ---- construction and persistence --------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        value_head: bool = False,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> "Policy":
        """Load an HF model folder / hub id, or a zoo name like `cory:tiny-reviews`.

        Weights are read from safetensors only (a pickled `*.bin` is never loaded). A folder written
        by `save_pretrained` with a `value_head.safetensors` gets its value head back, even with
        value_head=False (the checkpoint says it has one).
        dtype: "float32" | "bfloat16" | "float16" | "auto" | a torch.dtype | None (the default).
        """
        path = zoo.resolve(os.fspath(name_or_path))  # other names pass through unchanged
        kwargs = {"use_safetensors": True}
        if dtype is not None:
            kwargs["dtype"] = parse_dtype(dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            if not is_dir(path):
                raise FileNotFoundError(
                    f"model {name_or_path!r} is neither an existing folder nor loadable from the hub ({e})"
                ) from e
            raise
        if device is not None:
            lm.to(device)

        head_file = os.path.join(str(path), VALUE_HEAD_FILE)
        has_saved_head = os.path.isfile(head_file)
        policy = cls(lm, tokenizer, value_head=value_head or has_saved_head)
        if has_saved_head:
            policy.module.value_head.load_state_dict(load_file(head_file, device=str(policy.device)))
        return policy

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write an ordinary HF model folder (safetensors) + tokenizer, plus the value head if any.

        A PEFT-wrapped LM writes its adapter, as PEFT does; `cory.lora.save_lora_policy` writes a
        standalone merged folder.
        """
        os.makedirs(folder, exist_ok=True)
        self.model.save_pretrained(folder)  # safetensors: the only format transformers 5 writes
        self.tokenizer.save_pretrained(folder)
        head = self.module.value_head
        if head is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
            save_file(state, os.path.join(folder, VALUE_HEAD_FILE))

    @property
    def model(self) -> nn.Module:
        return self.module.lm

    @model.setter
    def model(self, lm: nn.Module) -> None:
        self.module.lm = lm

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ---- prompt rendering: the one path from prompt texts to query ids ---------------------

    def encode_prompts(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                       params: SamplingParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (strings, or token id lists used as-is) -> (ids [B, Lq], mask [B, Lq]), left-padded,
        on the model's device. Strings are tokenized with the tokenizer's special tokens (e.g. BOS),
        or, with `params.chat`, rendered as one user turn of the chat template each, after the system
        turn and example turns of `params`, ending with the assistant's generation prompt."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        if params.chat:
            if not isinstance(prompts[0], str):
                raise TypeError("chat rendering needs prompts as strings, not token ids")
            token_lists = self._render_chat(prompts, params.system_prompt, params.chat_examples)
        elif isinstance(prompts[0], str):
            token_lists = self.tokenizer(list(prompts))["input_ids"]
        else:
            token_lists = [list(map(int, p)) for p in prompts]
        for i, toks in enumerate(token_lists):
            if len(toks) == 0:
                raise ValueError(f"prompt {i} ({prompts[i]!r}) has no tokens")
        return left_pad(token_lists, self.tokenizer.pad_token_id, self.device)

    def _render_chat(self, prompts: Sequence[str], system_prompt: str, examples: Sequence[tuple[str, str]]) -> list[list[int]]:
        """The rendered text is tokenized without adding special tokens again (the template writes its own)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat rendering needs a tokenizer with a chat template (this one has none)")
        texts = []
        for prompt in prompts:
            turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
            for user, assistant in examples:
                turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            turns.append({"role": "user", "content": prompt})
            texts.append(self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def end_of_turn_ids(self) -> list[int]:
        """The token(s) the chat template writes right after an assistant message: where a chat
        response ends. Found by rendering a conversation, so it works for any template."""
        marker = "Zq9xMarker"
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False)
        after = text[text.rindex(marker) + len(marker):]
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids) | {
            i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special
        }
        return ids[:1] if ids and ids[0] in special else []

    def stop_ids(self, params: SamplingParams | None = None) -> list[int]:
        """Every token id that ends a response rendered by `params`: the tokenizer's and the generation
        config's EOS, and with `params.chat` the template's end-of-turn token."""
        ids = set(eos_ids(self.tokenizer, self.model))
        if params is not None and params.chat:
            ids.update(self.end_of_turn_ids())
        return sorted(ids)

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        logits_hook: LogitsHook | None = None,
    ) -> Generation:
        """Sample one response per prompt with cory's KV-cache loop (`cory.generation.native`).

        `generator` (on the model's device) makes sampling reproducible. `logits_hook(step,
        logprobs [B, V]) -> logits [B, V]` may change the distribution at each step (see
        `LogitsHook`). no_grad rather than inference_mode: inference tensors cannot later be saved
        for backward, and these ids/logprobs are inputs to the training step.
        """
        params = params or SamplingParams()
        query_ids, query_mask = self.encode_prompts(prompts, params)
        check_generator(generator, query_ids.device, params)
        lm = self.model
        was_training = lm.training
        lm.eval()
        try:
            ids, mask, logprobs, finished, trunk = sample(
                lm, query_ids, query_mask, params, generator, logits_hook,
                stop_ids=torch.tensor(self.stop_ids(params), dtype=torch.long, device=query_ids.device),
                pad_id=self.tokenizer.pad_token_id, decode=self.decode, prefix_store=self.prefix_store,
                trunk_depth=self.module.trunk_depth,
            )
        finally:
            lm.train(was_training)
        texts = [cut_at_stop(text, params.stop_strings) for text in self.decode(kept_token_lists(ids, mask))]
        return Generation(query_ids, query_mask, ids, mask, logprobs, finished, texts, trunk_hidden=trunk)

    def decode(self, token_lists: list[list[int]]) -> list[str]:
        """Token id lists -> texts, special tokens (EOS, end of turn) left out."""
        return self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Small setup helpers
# --------------------------------------------------------------------------------------------------


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, L], mask [B, L]), left-padded to the longest."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if toks:
            ids[i, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
            mask[i, width - len(toks):] = 1
    return ids.to(device), mask.to(device)


def prepare_tokenizer(tokenizer: Any) -> None:
    """Ensure a pad token (falling back to EOS) and left padding, which generation relies on."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def eos_ids(tokenizer: Any, lm: nn.Module) -> list[int]:
    """Every EOS id of a model: the tokenizer's and the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return sorted(ids)


def check_generator(generator, device: torch.device, params: SamplingParams) -> None:
    if generator is None or params.temperature == 0:
        return
    if torch.device(generator.device).type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the model is on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]
