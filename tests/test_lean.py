"""Memory-lean training: single-agent LoRA (frozen base = reference), QLoRA's refusal without a GPU,
gradient checkpointing (same gradient) and bf16 weights end to end (train, checkpoint, resume)."""

import copy
import json

import pytest
import torch
from conftest import micro_overrides
from safetensors.torch import load_file

from cory.cli import main
from cory.config import load_config
from cory.errors import UsageError
from cory.scoring import sequence_logprobs
from cory.optim import is_checkpointing
from cory.train import TrainingRun


def _batch(policy, seed=0):
    """A fixed batch: 4 prompts and 6 random response tokens each."""
    q_ids, q_mask = policy.encode_prompts(["The film was", "I watched this", "A story", "Acting and"])
    g = torch.Generator().manual_seed(seed)
    r_ids = torch.randint(4, policy.tokenizer.vocab_size, (4, 6), generator=g)
    return q_ids, q_mask, r_ids, torch.ones_like(r_ids)


def test_lora_trains_only_adapters_and_its_reference_is_the_base(tmp_path, micro_lm, micro_rm):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, micro_overrides(tmp_path, **{"model.lora.r": 4, "model.lora.alpha": 8, "algo.lr": 0.05}))
    run = TrainingRun(cfg, tmp_path / "run")
    named = dict(run.policy.module.named_parameters())
    adapters = {n for n in named if "lora_" in n}
    assert adapters and all(named[n].requires_grad == (n in adapters) for n in named)
    # The reference holds no weights of its own: it is the policy's base, adapters switched off.
    policy_storage = {p.data_ptr() for p in run.policy.module.parameters()}
    assert {p.data_ptr() for p in run.learner.reference.parameters()} <= policy_storage
    before = {n: p.detach().clone() for n, p in named.items()}
    run.run()
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and changed <= adapters

    base = AutoModelForCausalLM.from_pretrained(micro_lm).eval()
    batch = _batch(run.policy)
    with torch.no_grad():
        ref = sequence_logprobs(run.learner.reference, *batch).logprobs
        want = sequence_logprobs(base, *batch).logprobs
        trained = sequence_logprobs(run.policy.module, *batch).logprobs
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    assert (trained - want).abs().max() > 1e-3  # the adapters did change the policy
    # final/ is an ordinary HF folder holding the merged model, and final/adapter/ the adapter.
    final = tmp_path / "run" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(merged, *batch).logprobs, trained, rtol=0, atol=1e-5)
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not any("lora_" in k for k in load_file(final / "model.safetensors"))


def test_lora_config_mistakes_are_one_line_errors():
    with pytest.raises(UsageError, match="set model.lora.r"):
        load_config(None, ["model.lora.quantize=4bit"])
    with pytest.raises(UsageError, match="config key 'cory.shared_base' is gone: use model.lora.r"):
        load_config(None, ["cory.shared_base=true"])
    with pytest.raises(UsageError, match="reference is the frozen base"):
        load_config(None, ["model.lora.r=8", "model.reference=cory:tiny-reviews"])
    with pytest.raises(UsageError, match="model.lora.quantize"):
        load_config(None, ["model.lora.r=8", "model.lora.quantize=8bit"])


def test_qlora_runs_on_a_gpu_and_is_refused_in_one_line_without(tmp_path, capsys, micro_lm, micro_rm):
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"model.lora.r": 4, "model.lora.quantize": "4bit",
                                                                             "train.iterations": 1})
    try:
        import bitsandbytes  # noqa: F401

        runnable = torch.cuda.is_available()
    except ImportError:
        runnable = False
    code = main(argv)
    if not runnable:
        assert code == 2 and not out.exists()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "model.lora.quantize=4bit" in err
        return
    assert code == 0 and (out / "final" / "adapter" / "adapter_config.json").exists()


def _grads_of_one_step(run, rollout):
    """The gradient each trainable parameter gets in one learner step on `rollout`."""
    grads = {}

    def record(*args, **kwargs):
        for n, p in run.policy.module.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()

    run.learner.optimizer.step = record
    run.learner.step(copy.deepcopy(rollout), 0, torch.Generator().manual_seed(0))
    return grads


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_gives_the_same_gradient(tmp_path, micro_lm, micro_rm, lora):
    extra = {"model.lora.r": lora, "algo.name": "ppo", "algo.max_grad_norm": 0}
    plain = TrainingRun(load_config(None, micro_overrides(tmp_path, **extra)), tmp_path / "plain")
    lean = TrainingRun(load_config(None, micro_overrides(tmp_path, **extra, **{"train.gradient_checkpointing": True})),
                       tmp_path / "lean")
    assert is_checkpointing(lean.policy.model) and not is_checkpointing(plain.policy.model)
    rollout = plain.sampler.collect(8, __import__("numpy").random.default_rng(0), torch.Generator().manual_seed(0))
    # The update's forward really goes through torch's checkpoint (once per layer and micro-batch).
    lm = lean.policy.model.get_base_model() if lora else lean.policy.model
    layer = lm.model.layers[0]
    calls = []
    inner = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    want = _grads_of_one_step(plain, rollout)
    got = _grads_of_one_step(lean, rollout)
    assert len(calls) == 1
    assert want.keys() == got.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_weights_train_checkpoint_and_resume_exactly(tmp_path, micro_lm, micro_rm):
    def train(out, iterations, resume=False):
        argv = ["train", "--output-dir", str(out)] + (["--resume"] if resume else []) + micro_overrides(
            tmp_path, **{"model.dtype": "bfloat16", "algo.lr": 1e-2, "train.checkpoint_every": 1, "train.iterations": iterations})
        assert main(argv) == 0

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(straight, 3)
    train(stopped, 2)
    train(stopped, 3, resume=True)
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(stopped / "final" / "model.safetensors")
    initial = load_file(micro_lm / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], initial[k].to(torch.bfloat16)) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(abs(r["logprob_gap"]) < 1e-2 for r in rows)


def test_mixed_precision_recomputes_the_old_log_probs_under_autocast(tmp_path, micro_lm, micro_rm):
    """float32 weights sample in float32; the update runs under bf16 autocast. The old policy's
    log-probs are the trainer's own under autocast, so PPO's first ratio is 1 (logprob_gap ~ 0),
    and the float32 / bf16 gap is measured (is/*) and corrected like another engine's."""
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out)] + micro_overrides(
        tmp_path, **{"train.mixed_precision": "bf16", "algo.name": "ppo", "train.iterations": 1})) == 0
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["logprob_gap"] < 1e-3
    assert row["is/log_ratio_abs_mean"] > 1e-3  # bf16 rounding: the gap the recomputation removes


@pytest.fixture
def back_to_full_precision(tmp_path):
    """accelerate keeps the mixed precision of the last Accelerator for the process: set it back to
    none after the test, so that later tests' learners do not autocast."""
    yield
    from cory.build import make_accelerator

    make_accelerator(load_config(None, micro_overrides(tmp_path)), tmp_path)


@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_mixed_precision_old_log_probs_are_the_trainers_and_the_correction_weights_them(tmp_path, micro_lm, cap, back_to_full_precision):
    from transformers import AutoModelForCausalLM

    from cory.algorithms import make_algorithm
    from cory.build import make_accelerator
    from cory.learner import Learner
    from cory.generation.sampling import SamplingParams
    from cory.policy import Policy
    from cory.rollout import rollout_from_generation

    make_accelerator(load_config(None, micro_overrides(tmp_path)), tmp_path)  # an earlier run in this process, no mixed precision
    cfg = load_config(None, micro_overrides(tmp_path, **{"train.mixed_precision": "bf16", **({"algo.is_cap": cap} if cap else {"algo.is_correction": "none"})}))
    accelerator = make_accelerator(cfg, tmp_path)
    policy = Policy.from_pretrained(str(micro_lm))
    reference = AutoModelForCausalLM.from_pretrained(micro_lm).eval().requires_grad_(False)
    learner = Learner(policy, reference, make_algorithm(cfg), cfg, accelerator)
    prompts = ["The film", "A quiet drama is"]
    gen = policy.generate(prompts, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(0))
    sampled, mask = gen.logprobs.clone(), gen.response_mask.bool()
    scored, weights = learner.score(rollout_from_generation(gen, prompts, [0.0, 0.0]))
    with torch.no_grad(), accelerator.autocast():
        own = sequence_logprobs(learner.module, gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask).logprobs
    assert torch.allclose(scored.logprobs[mask], own[mask].float(), atol=1e-6)  # old = the trainer's, under autocast
    assert not torch.allclose(scored.logprobs[mask], sampled[mask], atol=1e-3)  # not float32 sampling's
    weight = scored.scored.is_weight[mask]
    assert torch.equal(weights.weight, scored.scored.is_weight)
    expected = torch.ones_like(weight) if cap == 0 else (scored.logprobs[mask] - sampled[mask]).exp().clamp(max=cap)
    assert torch.allclose(weight, expected, atol=1e-6)


@pytest.mark.parametrize("key,value", [("algo.is_cap", 3), ("algo.is_correction", "icepop")])
def test_importance_correction_is_refused_where_the_trainer_samples_itself(tmp_path, micro_lm, micro_rm, key, value):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{key: value})) == 2
    assert not out.exists()
