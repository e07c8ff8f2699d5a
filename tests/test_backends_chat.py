"""One prompt path for every backend: chat prompts reach the native loop and vLLM alike.

On cory:smollm2-135m-instruct (its real weights and chat template; its EOS set to <|endoftext|>, so
that only the chat rendering knows <|im_end|> ends an answer), greedy: in each place that renders
prompts (a chat task, an environment with example turns, CORY's observer, evaluation, `cory eval`)
both backends get the same query ids (`Policy.encode_prompts`: the system and user turns and the
assistant header) and give the same answers, ending at the template's end-of-turn token
(`Policy.stop_ids`). With vLLM given the raw prompt text (as before the one prompt path), or without
the end-of-turn stop, every test here fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cory import build
from cory.build import eval_params
from cory.cli import main
from cory.config import load_config
from cory.evaluate import evaluate, play_policy
from cory.generation import NativeBackend
from cory.generation.vllm_engine import EngineOptions, VLLMBackend, VLLMEngine
from cory.policy import Policy
from cory.rollout import Rollout, Sampler
from cory.tasks import make_task
from cory.tasks.pioneer_observer import PioneerObserverEnv

QUESTIONS = ["What is 2 + 3? Answer with the number only.", "Name one colour. One word.", "Say hello in French, one word."]


@pytest.fixture(scope="module")
def smollm2_eos_apart(smollm2, tmp_path_factory):
    """SmolLM2-135M-Instruct whose EOS is <|endoftext|>: its weights (linked), its chat template."""
    folder = tmp_path_factory.mktemp("smollm2-eos")
    for f in smollm2.iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
        elif f.name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            data = json.loads(f.read_text())
            data.update({"eos_token_id": 0} if f.name != "tokenizer_config.json" else {"eos_token": "<|endoftext|>"})
            (folder / f.name).write_text(json.dumps(data))
        else:
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def engine(smollm2_eos_apart):
    eng = VLLMEngine(str(smollm2_eos_apart), EngineOptions(dtype="float32", kv_cache_gib=0.125, max_model_len=1024))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def policy(smollm2_eos_apart):
    policy = Policy.from_pretrained(str(smollm2_eos_apart))
    assert policy.tokenizer.eos_token_id != end_of_turn(policy)
    return policy


@pytest.fixture(scope="module")
def backends(engine, policy):
    return {"native": NativeBackend(policy), "vllm": VLLMBackend(engine, policy)}


def chat_config(model, *extra: str, chat_task: bool = True):
    task = ["task.chat_template=true", "task.system_prompt=You answer briefly."] if chat_task else []
    return load_config(None, [f"model.name={model}", "task.reward=vader", "task.reward_on=response", *task,
                              "generation.max_new_tokens=24", "eval.temperature=0", "train.log_with=[]", *extra])


def end_of_turn(policy) -> int:
    [token] = policy.end_of_turn_ids()
    return token


def assert_same_rollouts(native: Rollout, served: Rollout, policy) -> None:
    """Equal query ids (the chat rendering: turns, then the assistant's header), equal greedy
    answers, and rows that finished end at the end-of-turn token."""
    assert torch.equal(native.query_ids, served.query_ids) and torch.equal(native.query_mask, served.query_mask)
    for ids, mask in zip(served.query_ids, served.query_mask):
        text = policy.tokenizer.decode(ids[mask.bool()].tolist())
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n"), text
    assert torch.equal(native.response_mask, served.response_mask)
    assert torch.equal(native.response_ids * native.response_mask, served.response_ids * served.response_mask)
    assert native.responses == served.responses and torch.equal(native.finished, served.finished)
    eot = end_of_turn(policy)
    lengths = native.response_mask.sum(-1)
    finished = native.finished.nonzero().flatten().tolist()
    assert finished, "no answer ended within the token budget: the end-of-turn stop is untested"
    for row in finished:
        assert native.response_ids[row, lengths[row] - 1] == eot


def test_a_chat_task_renders_and_stops_alike(smollm2_eos_apart, policy, backends):
    cfg = chat_config(smollm2_eos_apart)
    params = eval_params(cfg)
    assert params.chat and params.temperature == 0
    task = make_task(cfg.task)
    prompts = QUESTIONS + task.eval_prompts[:1]
    runs = {}
    for name, backend in backends.items():
        sampler = Sampler(policy, _Fixed(prompts), params, backend=backend)
        runs[name] = sampler.collect(len(prompts), np.random.default_rng(0))
    assert_same_rollouts(runs["native"], runs["vllm"], policy)


def test_an_environment_with_example_turns_renders_alike(smollm2_eos_apart, policy, backends):
    cfg = chat_config(smollm2_eos_apart, "env.id=cory/Bandit-v0", "env.chat_template=true", "env.kwargs={n_arms: 3, horizon: 2, cot: false}",
                      "env.chat_examples=[['Which button? Answer ACTION=X.', 'ACTION=blue']]", chat_task=False)
    params = eval_params(cfg)
    assert params.chat_examples == (("Which button? Answer ACTION=X.", "ACTION=blue"),)
    runs = {name: play_policy(policy, cfg.env.id, cfg.env.kwargs, 2, params, seed=3, max_turns=2, backend=backend)[1]
            for name, backend in backends.items()}
    assert_same_rollouts(runs["native"], runs["vllm"], policy)
    example = policy.tokenizer("ACTION=blue", add_special_tokens=False)["input_ids"]
    row = runs["vllm"].query_ids[0].tolist()
    assert any(row[i : i + len(example)] == example for i in range(len(row))), "the example turn reached vLLM"


def test_corys_observer_renders_alike(smollm2_eos_apart, policy, backends):
    cfg = chat_config(smollm2_eos_apart, "cory.enabled=true")
    params = eval_params(cfg)
    task = make_task(cfg.task)
    runs = {}
    for name, backend in backends.items():
        env = PioneerObserverEnv(_FixedTask(task, QUESTIONS[:2]), "chat")
        runs[name] = Sampler(policy, env, params, max_turns=2, backend=[backend, backend]).collect(2, np.random.default_rng(0))
    native, served = runs["native"], runs["vllm"]
    assert (native.turn_index == 1).sum() == 2  # the observer's turn is in both
    assert_same_rollouts(native, served, policy)
    observer_rows = (served.turn_index == 1).nonzero().flatten().tolist()
    assert all("Another assistant answered" in served.prompts[i] for i in observer_rows)


def test_evaluation_renders_alike(smollm2_eos_apart, policy, backends):
    cfg = chat_config(smollm2_eos_apart)
    results = {name: evaluate(policy, QUESTIONS, lambda p, r: [float(len(x)) for x in r], eval_params(cfg), 1, 0,
                              num_samples_shown=len(QUESTIONS), backend=backend)
               for name, backend in backends.items()}
    assert results["native"] == results["vllm"]
    assert results["native"]["eos_rate"] > 0


def test_cory_eval_renders_alike(smollm2_eos_apart, engine, capsys, monkeypatch, tmp_path):
    """`cory eval` with generation.backend=vllm (the module's engine, kept open) prints what the
    native loop prints."""
    monkeypatch.setattr(build, "make_engine", lambda cfg, model, lora_rank=0: engine)
    monkeypatch.setattr(engine, "close", lambda: None)
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    args = ["eval", str(smollm2_eos_apart), "--json", "task.name=prompts", f"task.prompt_file={prompts}", "task.reward=vader",
            "task.reward_on=response", "task.chat_template=true", "generation.max_new_tokens=24", "eval.temperature=0",
            "eval.samples_per_prompt=1"]
    printed = {}
    for backend in ("native", "vllm"):
        capsys.readouterr()
        assert main(args + [f"generation.backend={backend}"]) == 0
        printed[backend] = json.loads(capsys.readouterr().out)
    assert printed["native"] == printed["vllm"] and printed["native"]["eos_rate"] > 0


class _Fixed:
    """A one-turn environment over given prompts (the Sampler's protocol)."""

    def __init__(self, prompts):
        self.prompts = prompts

    def reset(self, n, rng, group_size=1):
        return list(self.prompts[:n])

    def step(self, responses):
        n = len(responses)
        return [""] * n, [0.0] * n, [True] * n, [{} for _ in range(n)]


class _FixedTask:
    """A task whose training prompts are given (so both backends answer the same ones)."""

    def __init__(self, task, prompts):
        self.name, self.reward, self.prompts = task.name, task.reward, prompts

    def sample_prompts(self, n, rng):
        return list(self.prompts[:n])

    def score(self, prompts, responses):
        return self.reward(prompts, responses)
