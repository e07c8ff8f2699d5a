"""The policy: any HF causal LM + tokenizer, an optional value head, batched sampling, masked logprobs.

Shapes: B = batch, Lq = query (prompt) length, Lr = response length, V = vocabulary, L = Lq + Lr.

Padding convention, used everywhere in cory:
- queries are LEFT-padded (the last query column is always a real token, so the position that
  predicts the first response token is the same column for every row);
- responses are RIGHT-padded;
- position ids are `cumsum(mask) - 1` clamped at 0, so a row's positions do not depend on how much
  padding its batch needed. Generation and `sequence_logprobs` use the same rule, which is what makes
  the logprobs recorded while sampling equal the ones recomputed for training.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cory.config import SAMPLING_KEYS, GenerationConfig, sampling_problem

VALUE_HEAD_FILE = "value_head.safetensors"

LogitsHook = Callable[[int, torch.Tensor], torch.Tensor]
"""`hook(step, logprobs [B, V]) -> logits [B, V]`: changes the distribution sampled at `step`.

It receives the tempered log-probs (`log_softmax(logits / T)`, float32) and returns unnormalised
logits; the result is renormalised, sampled from, and its log-probs are what `Generation.logprobs`
records. A hook object may also define `start(query_ids, query_mask)` (called once before the first
step) and `observe(step, token [B], alive [B])` (called after each sampled token), which is how a
hook runs a second model in lockstep (e.g. the reference, for a hard KL budget)."""


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


_GENERATION = GenerationConfig()


@dataclass
class SamplingParams:
    """What generation needs: the `generation` config section's sampling keys (`SAMPLING_KEYS`, with
    that section's defaults and its one check, `sampling_problem`) and how prompts are rendered
    (chat), which comes from the task or environment section. Runs build it with `from_config`."""

    max_new_tokens: int = _GENERATION.max_new_tokens
    """Upper bound on response length; rows that reach it end with `finished=False`."""
    temperature: float = _GENERATION.temperature
    """Softmax temperature; 0 means greedy (argmax), and its logprobs are then taken at T=1."""
    top_k: int = _GENERATION.top_k
    """Sample only among the k most likely tokens; 0 turns it off."""
    top_p: float = _GENERATION.top_p
    """Nucleus sampling: the smallest set of tokens with mass >= top_p; 1.0 turns it off."""
    stop_strings: tuple[str, ...] = tuple(_GENERATION.stop_strings)
    """A row stops once its decoded response contains any of these. EOS always stops a row."""
    chat: bool = False
    """Render each prompt as a user turn with the tokenizer's chat template (plus the assistant's
    generation prompt) and also stop at the template's end-of-turn token."""
    system_prompt: str = ""
    """With `chat`: a system turn put before each prompt (empty: none, or the template's default)."""
    chat_examples: tuple[tuple[str, str], ...] = ()
    """With `chat`: example (user, assistant) turns put before each prompt (few-shot in chat form)."""
    shared_prefix: bool = False
    """Run the token prefix that every prompt of a batch shares (instructions, a chat template's
    system and example turns) once, and start every row from its KV cache. Equal to the plain
    prefill up to float rounding; it saves (B - 1) x prefix tokens of prefill."""

    def __post_init__(self):
        if isinstance(self.stop_strings, str):  # a bare string would be iterated char by char
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        problem = sampling_problem(*(getattr(self, k) for k in SAMPLING_KEYS))
        if problem:
            key, value, rule = problem
            raise ValueError(f"{key} {rule}, got {value!r}")
        if (self.system_prompt or self.chat_examples) and not self.chat:
            raise ValueError("system_prompt and chat_examples need chat=True (they are chat turns)")
        self.chat_examples = tuple(tuple(e) for e in self.chat_examples)

    @classmethod
    def from_config(cls, generation: GenerationConfig, **rendering) -> "SamplingParams":
        """The sampling keys of a `generation` section, plus `chat`, `system_prompt`, `chat_examples`."""
        return cls(**{k: getattr(generation, k) for k in SAMPLING_KEYS}, **rendering)


@dataclass
class Generation:
    """A batch of sampled responses. All tensors live on the model's device."""

    query_ids: torch.LongTensor
    """[B, Lq] prompt tokens, left-padded with the pad id."""
    query_mask: torch.LongTensor
    """[B, Lq] 1 for real prompt tokens."""
    response_ids: torch.LongTensor
    """[B, Lr] sampled tokens, right-padded with the pad id; Lr = the longest kept response."""
    response_mask: torch.LongTensor
    """[B, Lr] 1 for every token the row sampled while alive, including the EOS token and the token
    that completed a stop string; 0 after it."""
    logprobs: torch.FloatTensor
    """[B, Lr] log-prob of each sampled token under log_softmax(logits / T) (T=1 when greedy), not
    restricted by top-k/top-p, after the logits hook if one was given; 0 where masked."""
    finished: torch.BoolTensor
    """[B] True if the row ended by EOS or a stop string, False if it hit max_new_tokens."""
    texts: list[str]
    """Decoded responses without special tokens, cut just BEFORE the first stop string (the stop
    string itself is not included, though its tokens are in response_ids)."""
    engine_logprobs: torch.FloatTensor | None = None
    """[B, Lr] set when another engine (vLLM) sampled: its log-probs of the sampled tokens, the
    behaviour log-probs the trainer's recomputation is compared with; None for the native loop."""


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


# --------------------------------------------------------------------------------------------------
# The trainable module
# --------------------------------------------------------------------------------------------------


class PolicyModel(nn.Module):
    """The trainable module: a causal LM plus an optional scalar value head on the last hidden state.

    This is what gets wrapped by accelerate/DDP, so training forward passes go through its forward.
    The value head is `nn.Linear(hidden, 1)` with weight and bias initialised to ZERO: every value
    starts at 0 (a neutral baseline), and the critic's first gradients cannot push noise from a
    random head into the shared trunk (the trunk's gradient through the head is proportional to
    its weight). The head's weight still gets gradient (hidden state x value error) at once.
    """

    def __init__(self, lm: nn.Module, value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.value_head: nn.Linear | None = None
        if value_head:
            hidden = lm.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            # Same device as the LM; float32 kept for the head (it is tiny) so values are precise
            # even when the LM runs in bf16.
            self.value_head.to(device=_device_of(lm))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, attention_mask, position_ids: [B, L].

        Returns (logits [B, L, V], values [B, L] float32 or None without a value head).
        `logits_to_keep=k > 0` returns only the last k positions of both ([B, k, V], [B, k]), which
        saves the [B, L, V] logits of a long prompt nobody needs. `past_key_values`: the KV cache of
        columns before `input_ids` (a shared prompt prefix); `attention_mask` then spans both.
        """
        with_hidden = self.value_head is not None
        # Without a cache to extend, use_cache=False: HF models default to building one, which
        # training never reads.
        out = _lm_forward(
            self.lm, input_ids, attention_mask, position_ids, logits_to_keep, with_hidden,
            use_cache=past_key_values is not None, past_key_values=past_key_values,
        )
        logits = out.logits
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]  # no-op when the LM already sliced
        values = None
        if with_hidden:
            # hidden_states[-1] is the final (post-norm) hidden state that feeds the LM head.
            hidden = out.hidden_states[-1]
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            head = self.value_head
            values = head(hidden.to(head.weight.dtype)).squeeze(-1)
            values = values.to(torch.promote_types(values.dtype, torch.float32))
        return logits, values


def _lm_forward(lm, input_ids, attention_mask, position_ids, logits_to_keep=0, with_hidden=False,
                **kw):
    """One forward of a HF causal LM, asking it to compute only the logits we keep when it can."""
    if logits_to_keep and _accepts_logits_to_keep(lm):
        kw["logits_to_keep"] = logits_to_keep
    if with_hidden:
        kw["output_hidden_states"] = True
    return lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)


def _accepts_logits_to_keep(lm: nn.Module) -> bool:
    # PEFT wrappers forward **kwargs to the model they wrap, so ask the innermost model.
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return _forward_has_param(type(inner), "logits_to_keep")


@functools.lru_cache(maxsize=None)
def _forward_has_param(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper (which keep it in `.module`)."""
    return getattr(model, "module", model)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, L] positions counting real tokens only (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------
# Log-probs of given responses (training / reference side)
# --------------------------------------------------------------------------------------------------


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
) -> LogprobOutput:
    """Per-token log-probs of responses given queries, in one forward pass.

    model: a `PolicyModel` (possibly wrapped by DDP/accelerate) or a bare HF causal LM (e.g. the
    frozen reference). query_ids/query_mask: [B, Lq] left-padded; response_ids/response_mask:
    [B, Lr] right-padded. Gradients flow unless the caller disables them.

    The sequence is [query | response] ([B, Lq+Lr], padded on both sides). Response token t is
    predicted by the output at column Lq-1+t, so logits, entropy and values are all read from
    columns Lq-1 .. Lq+Lr-2: `values[:, t]` is the value of the state BEFORE response token t.
    temperature 0 (greedy sampling) is scored at T=1, as `Policy.generate` records it.
    `shared_prefix`: the leading query tokens that every row shares (a chat template's system and
    example turns; at least 16) run once, batch 1, and their keys and values are repeated for every
    row, gradients included; equal to the full pass up to float rounding, it saves (B - 1) x prefix
    tokens of forward and backward. For a `PolicyModel` or an HF causal LM (with or without
    adapters); other modules run the full pass.
    Returns a `LogprobOutput`; every masked position is 0.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    inner = _unwrap(model)
    is_policy = isinstance(inner, PolicyModel)
    if with_values and not (is_policy and inner.value_head is not None):
        raise ValueError("with_values=True needs a PolicyModel built with value_head=True")

    device = _device_of(inner)
    query_ids, query_mask, response_ids, response_mask = (
        t.to(device) for t in (query_ids, query_mask, response_ids, response_mask)
    )
    lr = response_ids.shape[1]
    prefix = _shared_prefix_length(query_ids, query_mask) if shared_prefix and _takes_cache(inner) else 0
    cache = None
    if prefix:
        query_ids, query_mask, shared = _lay_out_prefix(query_ids, query_mask, prefix)
        cache = _prefix_cache(inner.lm if is_policy else model, shared.tolist(), None, device)
        cache.batch_repeat_interleave(query_ids.shape[0])
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    position_ids = position_ids_from_mask(attention_mask)
    input_ids, position_ids = input_ids[:, prefix:], position_ids[:, prefix:]  # the prefix is in the cache

    # Keep Lr+1 trailing positions: the last one predicts past the response and is dropped.
    keep = lr + 1
    if is_policy:
        logits, values = model(input_ids, attention_mask, position_ids, logits_to_keep=keep, past_key_values=cache)
    else:
        out = _lm_forward(model, input_ids, attention_mask, position_ids, keep, use_cache=cache is not None,
                          past_key_values=cache)
        logits, values = out.logits[:, -keep:], None
    logits = logits[:, :-1]  # [B, Lr, V]

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
    result = LogprobOutput(logprobs=_zero_where_masked(logprobs, keep_mask))
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        result.entropy = _zero_where_masked(entropy, keep_mask)
    if with_values:
        result.values = _zero_where_masked(values[:, -keep:-1], keep_mask)
    if with_full_logprobs:
        if logp_all.requires_grad:
            result.full_logprobs = _zero_where_masked(logp_all, keep_mask.unsqueeze(-1))
        else:  # nothing else holds it: mask in place instead of a second [B, Lr, V] tensor
            result.full_logprobs = logp_all.masked_fill_(~keep_mask.unsqueeze(-1), 0.0)
    return result


def _zero_where_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # where() rather than multiply: garbage at padded positions may be inf/NaN, and NaN * 0 = NaN.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------
# Sampling helpers (pure functions over [B, V] tensors)
# --------------------------------------------------------------------------------------------------


def filter_top_k_top_p(logprobs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B, V] log-probs -> [B, V] with tokens outside the top-k / nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (always at least
    one token). top-p is measured after top-k, as in HF.
    """
    vocab = logprobs.shape[-1]
    if 0 < top_k < vocab:
        kth = logprobs.topk(top_k, dim=-1).values[:, -1:]
        logprobs = logprobs.masked_fill(logprobs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False
        sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
        logprobs = torch.empty_like(logprobs).scatter_(-1, order, sorted_lp)
    return logprobs


def sample_tokens(
    logprobs: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, V] (tempered) log-probs -> [B] token ids: argmax if greedy, else filtered sampling."""
    if params.temperature == 0:
        return logprobs.argmax(-1)
    filtered = filter_top_k_top_p(logprobs, params.top_k, params.top_p)
    return sample_categorical(filtered.softmax(-1), generator)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] probabilities -> [B] one draw per row, by inverting the CDF.

    Same distribution as torch.multinomial(probs, 1) but ~7x faster on CPU (one uniform per row
    instead of multinomial's per-call setup), which matters when the model is tiny.
    u lies in (0, total], so a token of probability 0 is never drawn: searchsorted returns the
    first index whose cumulative mass reaches u, and a zero-probability token never adds mass.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = (1.0 - torch.rand(total.shape, generator=generator, device=probs.device)) * total
    # The clamp only guards against u landing past the last (rounded) cdf entry.
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------


class Policy:
    """A causal LM + tokenizer ready for RL: batched generation, log-probs, save/load.

    `module` (a `PolicyModel`) is the trainable thing to hand to the optimizer / accelerate;
    `model` is the LM inside it; assigning `policy.model = get_peft_model(policy.model, cfg)`
    swaps the LM inside the module.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, value_head: bool = False):
        self.module = PolicyModel(model, value_head=value_head)
        self.tokenizer = tokenizer
        self.prefix_store: PrefixStore | None = None
        _prepare_tokenizer(tokenizer)

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

        A folder written by `save_pretrained` with a `value_head.safetensors` gets its value head
        back, even with value_head=False (the checkpoint says it has one).
        dtype: "float32" | "bfloat16" | "float16" | "auto" | a torch.dtype | None (the default).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.fspath(name_or_path)
        if path.startswith("cory:"):
            # zoo.resolve leaves every other name unchanged, so only zoo names pay for importing
            # it (lazily: the zoo builds models and imports this module).
            from cory import zoo

            path = zoo.resolve(path)
        kwargs = {}
        if dtype is not None:
            kwargs["dtype"] = _parse_dtype(dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            if not os.path.isdir(str(path)):
                raise FileNotFoundError(
                    f"model {name_or_path!r} is neither an existing folder nor loadable from the "
                    f"hub ({e})"
                ) from e
            raise
        if device is not None:
            lm.to(device)

        head_file = os.path.join(str(path), VALUE_HEAD_FILE)
        has_saved_head = os.path.isfile(head_file)
        policy = cls(lm, tokenizer, value_head=value_head or has_saved_head)
        if has_saved_head:
            from safetensors.torch import load_file

            policy.module.value_head.load_state_dict(load_file(head_file, device=str(policy.device)))
        return policy

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write an ordinary HF model folder (safetensors) + tokenizer, plus the value head if any.

        A PEFT-wrapped LM writes its adapter, as PEFT does; merge it first for a standalone folder.
        """
        from safetensors.torch import save_file

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
        return _device_of(self.module)

    # ---- tokenisation -------------------------------------------------------------------------

    def encode_prompts(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], chat: bool = False, system_prompt: str = "",
        chat_examples: Sequence[tuple[str, str]] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (strings, or token id lists used as-is) -> (ids [B, Lq], mask [B, Lq]), left-padded,
        on the model's device. Strings are tokenized with the tokenizer's special tokens (e.g. BOS),
        or, with `chat`, rendered by `render_chat` first."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        if chat:
            if not isinstance(prompts[0], str):
                raise TypeError("chat rendering needs prompts as strings, not token ids")
            token_lists = self.render_chat(prompts, system_prompt, chat_examples)
        elif isinstance(prompts[0], str):
            token_lists = self.tokenizer(list(prompts))["input_ids"]
        else:
            token_lists = [list(map(int, p)) for p in prompts]
        for i, toks in enumerate(token_lists):
            if len(toks) == 0:
                raise ValueError(f"prompt {i} ({prompts[i]!r}) has no tokens")
        return left_pad(token_lists, self.tokenizer.pad_token_id, self.device)

    def render_chat(
        self, prompts: Sequence[str], system_prompt: str = "", examples: Sequence[tuple[str, str]] = ()
    ) -> list[list[int]]:
        """Each prompt as one user turn of the tokenizer's chat template, after an optional system
        turn and example (user, assistant) turns, ending with the assistant's generation prompt;
        token id lists. The rendered text is tokenized without adding special tokens again (the
        template writes its own)."""
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

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        logits_hook: LogitsHook | None = None,
    ) -> Generation:
        """Sample one response per prompt with the KV cache. See `Generation` for the output.

        `generator` (on the model's device) makes sampling reproducible. `logits_hook(step,
        logprobs [B, V]) -> logits [B, V]` may change the distribution at each step (see
        `LogitsHook`). no_grad rather than inference_mode: inference tensors cannot later be saved
        for backward, and these ids/logprobs are inputs to the training step.
        """
        params = params or SamplingParams()
        query_ids, query_mask = self.encode_prompts(prompts, params.chat, params.system_prompt,
                                                    params.chat_examples)
        lm = self.model
        _check_generator(generator, query_ids.device, params)
        eos_ids = _eos_ids(self.tokenizer, lm)
        if params.chat:
            eos_ids = torch.cat([eos_ids, torch.tensor(self.end_of_turn_ids(), dtype=torch.long)]).unique()
        was_training = lm.training
        lm.eval()
        try:
            ids, mask, logprobs, finished = _sample_loop(
                lm, query_ids, query_mask, params, generator, logits_hook,
                eos_ids=eos_ids.to(query_ids.device),
                pad_id=self.tokenizer.pad_token_id,
                decode=self._decode,
                prefix_store=getattr(self, "prefix_store", None),
            )
        finally:
            lm.train(was_training)
        texts = [
            _cut_at_stop(text, params.stop_strings)
            for text in self._decode(_kept_token_lists(ids, mask))
        ]
        return Generation(query_ids, query_mask, ids, mask, logprobs, finished, texts)

    def _decode(self, token_lists: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)

    # ---- scoring ------------------------------------------------------------------------------

    def logprobs(
        self,
        batch: Generation | Any | torch.Tensor,
        query_mask: torch.Tensor | None = None,
        response_ids: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        **kw: bool,
    ) -> LogprobOutput:
        """`sequence_logprobs(self.module, ...)` for a Generation (or anything with query_ids,
        query_mask, response_ids, response_mask attributes) or for the four tensors.
        kw: with_entropy / with_values / with_full_logprobs."""
        if isinstance(batch, torch.Tensor):
            tensors = (batch, query_mask, response_ids, response_mask)
            if any(t is None for t in tensors):
                raise TypeError("pass a Generation, or all four of query_ids, query_mask, "
                                "response_ids, response_mask")
        else:
            tensors = (batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        return sequence_logprobs(self.module, *tensors, temperature=temperature, **kw)


# --------------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------------


def _sample_loop(
    lm: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    logits_hook: LogitsHook | None,
    eos_ids: torch.Tensor,
    pad_id: int,
    decode: Callable[[list[list[int]]], list[str]],
    prefix_store: PrefixStore | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill, then one cached forward per new token.

    Returns response ids [B, n], mask [B, n], logprobs [B, n], finished [B], where n <= max_new_tokens
    is the number of steps run (the loop stops once every row is done).
    """
    batch, lq = query_ids.shape
    max_new = params.max_new_tokens
    device = query_ids.device
    temperature = params.temperature if params.temperature > 0 else 1.0

    # Preallocated outputs and attention mask: each step writes one column, no concatenation.
    out_ids = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((batch, max_new), dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
    attention = torch.ones((batch, lq + max_new), dtype=torch.long, device=device)
    attention[:, :lq] = query_mask
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    prefix = _shared_prefix_length(query_ids, query_mask) if params.shared_prefix else 0
    if prefix:
        # The prefix is run once and its cache repeated for every row.
        laid, laid_mask, shared = _lay_out_prefix(query_ids, query_mask, prefix, pad_id)
        attention[:, :lq] = laid_mask
        positions = position_ids_from_mask(attention[:, :lq])
        cache = _prefix_cache(lm, shared.tolist(), prefix_store, device)
        cache.batch_repeat_interleave(batch)
        out = _lm_forward(lm, laid[:, prefix:], attention[:, :lq], positions[:, prefix:], logits_to_keep=1,
                          use_cache=True, past_key_values=cache)
    else:
        positions = position_ids_from_mask(query_mask)
        out = _lm_forward(lm, query_ids, query_mask, positions, logits_to_keep=1, use_cache=True)
    cache = out.past_key_values
    next_position = positions[:, -1:] + 1  # [B, 1]; the last query column is real (left padding)
    logits = out.logits[:, -1]

    stop_window = _stop_window(params.stop_strings)
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

        done = done | torch.isin(token, eos_ids)
        if stop_window:
            done = done | _hits_stop_string(out_ids, done, steps, stop_window, params.stop_strings,
                                            decode)
        if step == max_new - 1 or bool(done.all()):
            break
        out = lm(
            input_ids=token[:, None],
            attention_mask=attention[:, : lq + step + 1],
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_position = next_position + 1
        logits = out.logits[:, -1]

    return out_ids[:, :steps], out_mask[:, :steps], out_logprobs[:, :steps], done


class PrefixStore:
    """The KV cache (batch 1) of the last prompt prefix run, kept across calls by `Policy.frozen_prefix`."""

    def __init__(self):
        self.tokens: list[int] = []
        self.cache = None


def _prefix_cache(lm: nn.Module, tokens: list[int], store: PrefixStore | None, device: torch.device):
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
        cache = _lm_forward(lm, ids, attention, positions, logits_to_keep=1, use_cache=True, past_key_values=cache).past_key_values
    if store is not None:
        store.tokens, store.cache = list(tokens), copy.deepcopy(cache)
    return cache


def _shared_prefix_length(query_ids: torch.Tensor, query_mask: torch.Tensor, minimum: int = 16) -> int:
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


def _lay_out_prefix(query_ids: torch.Tensor, query_mask: torch.Tensor, prefix: int,
                    pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch whose rows share their first `prefix` real tokens, re-laid as [shared
    prefix | left padding | own tokens] (same width, same real tokens at the same positions, so
    `position_ids_from_mask` gives every token its old position): (ids [B, Lq], mask [B, Lq],
    the shared tokens [prefix])."""
    lq = query_ids.shape[1]
    lengths = query_mask.long().sum(-1)
    shared = query_ids[0, lq - int(lengths[0]):][:prefix]
    columns = torch.arange(lq, device=query_ids.device)[None]
    own = columns >= (lq - lengths + prefix)[:, None]  # where each row's own tokens lie
    mask = (own | (columns < prefix)).to(query_mask.dtype)
    ids = torch.where(own, query_ids, torch.full_like(query_ids, pad_id))
    ids[:, :prefix] = shared
    return ids, mask, shared


def _takes_cache(module: nn.Module) -> bool:
    """Whether `module`'s forward can continue from a KV cache: a PolicyModel, an HF causal LM,
    or either behind a PEFT wrapper (or cory.lora's AdaptersDisabled, which holds one)."""
    if isinstance(module, PolicyModel):
        return True
    inner = getattr(module, "peft_model", module)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _forward_has_param(type(inner), "past_key_values")


def _stop_window(stop_strings: tuple[str, ...]) -> int:
    """How many trailing tokens to decode to see a stop string completed by the newest token.

    A string of n characters spans at most n tokens when each token decodes to >= 1 character;
    byte-fallback tokenizers may need up to 4 tokens per character, hence 4n, plus slack for
    tokenizers whose decoding of a slice differs at its left edge. 0 = no stop strings.
    """
    if not stop_strings:
        return 0
    return 4 * max(len(s) for s in stop_strings) + 8


def _hits_stop_string(
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


def _cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """The text before the earliest stop string (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def _kept_token_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    lengths = mask.sum(-1).tolist()
    return [row[:n] for row, n in zip(ids.tolist(), lengths)]


# --------------------------------------------------------------------------------------------------
# Small setup helpers
# --------------------------------------------------------------------------------------------------


def left_pad(
    token_lists: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
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


def _prepare_tokenizer(tokenizer: Any) -> None:
    """Ensure a pad token (falling back to EOS) and left padding, which generation relies on."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _eos_ids(tokenizer: Any, lm: nn.Module) -> torch.Tensor:
    """[n] every id that ends a response: the tokenizer's EOS and the generation config's EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return torch.tensor(sorted(ids), dtype=torch.long)


def _check_generator(generator, device: torch.device, params: SamplingParams) -> None:
    if generator is None or params.temperature == 0:
        return
    if torch.device(generator.device).type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the model is on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]
