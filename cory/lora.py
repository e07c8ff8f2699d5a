"""LoRA adapters on a frozen base model: single-agent LoRA / QLoRA and CORY's shared base.

The base model's weights never change during a LoRA run, so the base seen with every adapter
switched off *is* the initial model: it serves as the KL reference without a second copy of the
weights in memory (`AdaptersDisabled`). QLoRA loads that frozen base in 4-bit NF4 (bitsandbytes,
CUDA only); the adapters and the value head stay in higher precision.

A trained LoRA policy is saved twice in `final/`: the merged model as an ordinary HF folder
(`AutoModelForCausalLM.from_pretrained(final)`) and the adapter alone in `final/adapter/`
(`PeftModel.from_pretrained(base, final/adapter)`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cory.config import LoraConfig
from cory.errors import UsageError
from cory.policy import Policy

ADAPTER_DIR = "adapter"
"""Sub-folder of a saved LoRA policy that holds the PEFT adapter."""


class AdaptersDisabled(torch.nn.Module):
    """A PEFT model seen with every LoRA adapter switched off: the frozen base, used as the KL
    reference by single-agent LoRA and by CORY's shared-base mode. It holds no weights of its own."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def check_quantize(quantize: str) -> None:
    """Raises UsageError (one line) where `model.lora.quantize` cannot run on this machine."""
    if quantize == "none":
        return
    if not torch.cuda.is_available():
        raise UsageError(f"model.lora.quantize={quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no GPU: use model.lora.quantize=none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(f"model.lora.quantize={quantize} (QLoRA) needs bitsandbytes: pip install -e '.[qlora]'") from None


def peft_config(r: int, alpha: int, targets, dropout: float = 0.0):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type="CAUSAL_LM")


def lora_policy(name: str, lora: LoraConfig, dtype: torch.dtype, value_head: bool = False) -> tuple[Policy, AdaptersDisabled]:
    """(policy with one trainable adapter on a frozen base, the reference = that base).

    Only the adapter (and the value head, if any) require gradients. With `lora.quantize=4bit` the
    base is loaded in 4-bit on the current CUDA device, computing in `dtype` (bf16 when float32 is
    asked, as 4-bit kernels compute in half precision).
    """
    from peft import get_peft_model

    check_quantize(lora.quantize)
    if lora.quantize == "4bit":
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from cory import zoo

        path = zoo.resolve(name)
        compute = dtype if dtype != torch.float32 else torch.bfloat16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
        lm = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute,
                                                  device_map={"": torch.cuda.current_device()})
        # Checkpointing is cory's own switch (train.gradient_checkpointing), not PEFT's default.
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
        policy = Policy(lm, AutoTokenizer.from_pretrained(path), value_head=value_head)
    else:
        policy = Policy.from_pretrained(name, value_head=value_head, dtype=dtype)
    policy.model = get_peft_model(policy.model, peft_config(lora.r, lora.alpha, lora.targets, lora.dropout))
    return policy, AdaptersDisabled(policy.model)


def save_lora_policy(policy: Policy, folder: str | os.PathLike, base_name: str, dtype: torch.dtype) -> None:
    """`folder/adapter/` (the PEFT adapter) and, in `folder`, the merged model as an ordinary HF
    folder. The merge runs on a fresh full-precision load of the base on the CPU, so it needs no
    copy of the training model and works for a 4-bit base too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cory import zoo

    folder = Path(folder)
    adapter_dir = folder / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(zoo.resolve(base_name), dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    standalone = Policy(merged, policy.tokenizer)
    standalone.module.value_head = policy.module.value_head
    standalone.save_pretrained(folder)
