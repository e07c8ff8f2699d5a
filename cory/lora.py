"""LoRA adapters on a frozen base model: the one LoRA path of single-agent runs and of CORY.

A LoRA run (`model.lora.r > 0`) loads the base once and gives every agent its own adapter on it:
one (`default`) for a single-agent run, two (`agent_a`, `agent_b`) for CORY. The base's weights
never change, so the base seen with every adapter switched off *is* the initial model: it is the KL
reference without a second copy of the weights (`AdaptersDisabled`). QLoRA loads that frozen base
in 4-bit NF4 (bitsandbytes, CUDA only); the adapters and value heads stay in higher precision.

A trained adapter is saved twice (`save_lora_policy`): the merged model as an ordinary HF folder
(`AutoModelForCausalLM.from_pretrained(folder)`) and the adapter alone in `folder/adapter/`
(`PeftModel.from_pretrained(base, folder/adapter)`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from cory import zoo
from cory.errors import UsageError
from cory.policy import Policy
from cory.trunk import TopOutput, decoder, num_layers, prefix_top_cache, top_forward

ADAPTER_DIR = "adapter"
"""Sub-folder of a saved LoRA policy that holds the PEFT adapter."""


class AdaptersDisabled(torch.nn.Module):
    """A PEFT model seen with every LoRA adapter switched off: the frozen base, used as the KL
    reference of every LoRA run. It holds no weights of its own. With `trunk_depth` (adapters on
    the top layers only) it also runs from the trunk's output (`trunk_hidden=`, `cory.trunk`)."""

    def __init__(self, peft_model, trunk_depth: int = 0):
        super().__init__()
        self.peft_model = peft_model
        self.trunk_depth = trunk_depth

    def forward(self, *args, trunk_hidden=None, prefix_hidden=None, **kwargs):
        with self.peft_model.disable_adapter():
            if trunk_hidden is None:
                return self.peft_model(*args, **kwargs)
            layers = decoder(self.peft_model).layers[self.trunk_depth:]
            cache = kwargs.get("past_key_values")
            if prefix_hidden is not None:
                cache = prefix_top_cache(self.peft_model, layers, prefix_hidden, trunk_hidden.shape[0])
            logits, _ = top_forward(self.peft_model, layers, trunk_hidden, kwargs["attention_mask"], kwargs["position_ids"],
                                    kwargs.get("logits_to_keep") or trunk_hidden.shape[1], cache)
            return TopOutput(logits)


def check_quantize(quantize: str) -> None:
    """Raises UsageError (one line) where `model.lora.quantize` cannot run on this machine."""
    if quantize == "none":
        return
    if not torch.cuda.is_available():
        raise UsageError(f"model.lora.quantize={quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no GPU: use model.lora.quantize=none")
    try:
        import bitsandbytes  # noqa: F401  (optional: QLoRA only)
    except ImportError:
        raise UsageError(f"model.lora.quantize={quantize} (QLoRA) needs bitsandbytes: pip install -e '.[qlora]'") from None


def peft_config(r: int, alpha: int, targets, dropout: float = 0.0, layers: list[int] | None = None) -> PeftLoraConfig:
    """PEFT's LoRA configuration; `layers`: the decoder layers that get adapters (None: all)."""
    return PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM",
                          layers_to_transform=layers)


def load_base(name: str, dtype: torch.dtype, quantize: str = "none"):
    """(the frozen base LM, its tokenizer). With quantize=4bit the base is loaded in 4-bit on the
    current CUDA device, computing in `dtype` (bf16 when float32 is asked, as 4-bit kernels compute
    in half precision)."""
    check_quantize(quantize)
    path = zoo.resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if quantize != "4bit":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True), tokenizer
    compute = dtype if dtype != torch.float32 else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    lm = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute, use_safetensors=True,
                                              device_map={"": torch.cuda.current_device()})
    # Checkpointing is cory's own switch (train.gradient_checkpointing), not PEFT's default.
    return prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False), tokenizer


def lora_policies(name: str, lora, dtype: torch.dtype, adapters: list[str], value_head: bool = False, trainable_layers: int = 0
                  ) -> tuple[dict[str, Policy], AdaptersDisabled, dict[str, list[torch.nn.Parameter]]]:
    """One adapter per name in `adapters` on one frozen base loaded from `name`:
    (adapter -> its Policy, the reference = the base with adapters off, adapter -> its trainable
    parameters: the adapter's weights and its policy's value head). `lora`: r, alpha, dropout,
    targets and quantize (the `model.lora` section). `trainable_layers=K > 0`: adapters on the top
    K decoder layers only, the layers below a frozen trunk that every pass shares (`cory.trunk`)."""
    base, tokenizer = load_base(name, dtype, lora.quantize)
    depth = num_layers(base) - trainable_layers if trainable_layers else 0
    config = peft_config(lora.r, lora.alpha, lora.targets, lora.dropout,
                         list(range(depth, num_layers(base))) if trainable_layers else None)
    peft_model = get_peft_model(base, config, adapter_name=adapters[0])
    for adapter in adapters[1:]:
        peft_model.add_adapter(adapter, config)
    policies = {a: Policy(peft_model, tokenizer, value_head=value_head) for a in adapters}
    for policy in policies.values():
        policy.module.trunk_depth = depth
    params = {}
    for adapter, policy in policies.items():
        mine = [p for n, p in policy.module.named_parameters() if f".{adapter}." in n and "lora_" in n]
        if policy.module.value_head is not None:
            mine += list(policy.module.value_head.parameters())
        for p in mine:
            p.requires_grad_(True)
        params[adapter] = mine
    return policies, AdaptersDisabled(peft_model, depth), params


def save_lora_policy(policy: Policy, folder: str | os.PathLike, base_name: str, dtype: torch.dtype, adapter: str) -> None:
    """`folder/adapter/` (the PEFT adapter `adapter` of the policy's model) and, in `folder`, the
    merged model as an ordinary HF folder (with the policy's value head, if any). The merge runs on
    a fresh full-precision load of the base, so it needs no copy of the training model and works
    for a 4-bit base too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter_dir = folder / ADAPTER_DIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        policy.model.save_pretrained(scratch, selected_adapters=[adapter])
        # PEFT writes the `default` adapter at the top of the folder and any other in a sub-folder of its name.
        shutil.copytree(Path(scratch) if adapter == "default" else Path(scratch) / adapter, adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(zoo.resolve(base_name), dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    standalone = Policy(merged, policy.tokenizer)
    standalone.module.value_head = policy.module.value_head
    standalone.save_pretrained(folder)
