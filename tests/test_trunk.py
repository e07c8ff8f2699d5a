"""model.trainable_layers: only the top K layers train, and the frozen trunk runs once per sequence.

On a 4-layer Llama (micro-reviews' tokenizer, random weights moved off their start so the policy and
its reference differ), with K = 2: everything the trunk path computes (log-probs, entropy, values,
whole distributions and so exact KL, the gradients of the trained parameters) equals the whole-depth
computation of the same weights within float32 rounding, in single-turn, shared-prefix, multi-turn
and CORY runs; the trunk's layers run only while sampling (or in one pass when another engine
sampled); K = all layers changes nothing; and a stale trunk state is caught.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import micro_overrides, random_llama
from cory import zoo
from cory.algorithms import make_algorithm
from cory.api import train
from cory.build import build_agents, make_accelerator
from cory.coevolve import CoryRun
from cory.config import load_config
from cory.envs.batch import GymTextEnvBatch
from cory.errors import UsageError
from cory.generation.sampling import SamplingParams
from cory.learner import Learner
from cory.rollout import Sampler, rollout_from_generation
from cory.scoring import sequence_layout, sequence_logprobs
from cory.trunk import decoder, trunk_states

TOL = 1e-5
PROMPTS = ["The film was", "I did not expect the acting to be", "A", "What a story, the ending was so"]
LEAD = "Write one more sentence of this movie review, in the same voice, and keep it short please: "


@pytest.fixture(scope="module")
def deep(tmp_path_factory, micro_lm):
    """A 4-layer Llama with micro-reviews' tokenizer (random weights: the passes only have to agree)."""
    return random_llama(tmp_path_factory.mktemp("deep"), micro_lm, num_hidden_layers=4, initializer_range=0.1)


def moved(policy):
    """Moves every trained weight (adapters, top layers, value head) so the policy differs from its reference."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def agents(deep, tmp_path, *extra, value_head=True, names=("policy",)):
    cfg = load_config(None, micro_overrides(tmp_path, **{"model.name": str(deep), "model.trainable_layers": 2, **dict(e.split("=", 1) for e in extra)}))
    built = build_agents(cfg, list(names), value_head)
    for policy in built.policies.values():
        moved(policy)
    return cfg, built


def whole_depth(model):
    """The same module scoring at full depth (its trunk still frozen)."""
    inner = getattr(model, "module", model)
    saved = inner.trunk_depth
    inner.trunk_depth = 0
    return saved


def assert_close(a, b, name, tol=TOL):
    """Within `tol`, absolutely or relatively (float32 rounding of O(1) values after a few layers)."""
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"{name}: largest difference {(a - b).abs().max().item():.2e}"


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_top_layers_on_the_trunk_output_equal_the_whole_depth(deep, tmp_path, lora, shared_prefix):
    """Log-probs, entropy, values and whole distributions of the policy (LoRA or full fine-tuning of
    the top 2 layers) and of its reference, and the gradients of every trained parameter."""
    cfg, built = agents(deep, tmp_path, f"model.lora.r={lora}")
    policy, reference = built.policies["policy"], built.reference
    prompts = [LEAD + p for p in PROMPTS] if shared_prefix else PROMPTS
    gen = policy.generate(prompts, SamplingParams(max_new_tokens=7), torch.Generator().manual_seed(0))
    args = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
    ids, mask, positions = sequence_layout(*args)
    recomputed = trunk_states(policy.model, policy.module.trunk_depth, ids, mask, positions)
    weights = torch.randn(gen.response_ids.shape, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for mode, trunk in (("whole", None), ("trunk", recomputed), ("sampled trunk", gen.trunk_hidden)):
        policy.module.zero_grad(set_to_none=True)
        out = sequence_logprobs(policy.module, *args, with_entropy=True, with_values=True, with_full_logprobs=True,
                                shared_prefix=shared_prefix, trunk_hidden=trunk)
        ((out.logprobs * weights).sum() + out.values.pow(2).sum() + out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.requires_grad}
        with torch.no_grad():
            ref = sequence_logprobs(reference, *args, with_full_logprobs=True, shared_prefix=shared_prefix, trunk_hidden=trunk)
        outputs[mode] = (out, grads, ref)
    whole, _, whole_ref = outputs["whole"]
    for mode in ("trunk", "sampled trunk"):
        out, grads, ref = outputs[mode]
        for name in ("logprobs", "entropy", "values"):
            assert_close(getattr(out, name), getattr(whole, name), f"{mode} {name}")
        exact = (out.full_logprobs.exp() * (out.full_logprobs - ref.full_logprobs)).sum(-1)
        exact_whole = (whole.full_logprobs.exp() * (whole.full_logprobs - whole_ref.full_logprobs)).sum(-1)
        assert_close(exact, exact_whole, f"{mode} exact KL")
        assert_close(ref.logprobs, whole_ref.logprobs, f"{mode} reference log-probs")
        # float32 sums over every token: within 1e-5 of the largest gradient entry (a one-element
        # parameter such as the value head's bias sums terms that cancel, so its own scale is not the measure)
        scale = max(g.abs().max() for g in outputs["whole"][1].values())
        for name, grad in outputs["whole"][1].items():
            assert grad.abs().sum() > 0, name
            assert (grads[name] - grad).abs().max() <= TOL * scale, f"{mode} gradient of {name}"
    assert set(outputs["whole"][1]) == {n for n, p in policy.module.named_parameters() if p.requires_grad}
    trained_layers = {int(n.split("layers.")[1].split(".")[0]) for n in outputs["whole"][1] if "layers." in n}
    assert trained_layers == {2, 3}  # the top 2 of 4 layers; embeddings, norm and head frozen


def test_a_stale_trunk_state_is_caught(deep, tmp_path):
    """The comparison above fails when the trunk's output is stale: the states of another sequence
    (the batch's rows shifted by one) or a zero column."""
    cfg, built = agents(deep, tmp_path)
    policy = built.policies["policy"]
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=7), torch.Generator().manual_seed(0))
    args = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
    with torch.no_grad():
        whole = sequence_logprobs(policy.module, *args).logprobs
        for stale in (gen.trunk_hidden.roll(1, dims=0), gen.trunk_hidden * (torch.arange(gen.trunk_hidden.shape[1]) != 3)[None, :, None]):
            got = sequence_logprobs(policy.module, *args, trunk_hidden=stale).logprobs
            assert (got - whole).abs().max() > 100 * TOL


def learner_gradient(cfg, built, rollout, trunk: bool, tmp_path):
    """The gradient at the first optimizer step of a Learner on a copy of the agent, and its metrics;
    with trunk=False the same weights score every pass at full depth."""
    built = copy.deepcopy(built)
    policy = built.policies["policy"]
    if not trunk:
        policy.module.trunk_depth = built.reference.trunk_depth = 0
        rollout = replace(rollout, trunk_hidden=None)
    learner = Learner(policy, built.reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path), built.parameters["policy"])
    params = [p for p in learner.module.parameters() if p.requires_grad]
    grads = []
    learner.optimizer.step = lambda *a, **k: grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                                                     for p in params]))
    _, metrics = learner.step(rollout)
    return grads[0], metrics


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_learner_step_on_the_trunk_equals_the_whole_depth(deep, tmp_path, algo):
    """Scoring (reference, values, exact KL) and the update on the trunk states kept from sampling,
    against the same step at full depth: the same gradient and figures."""
    extra = ["algo.group_size=2"] if algo == "grpo" else []
    cfg, built = agents(deep, tmp_path, f"algo.name={algo}", "kl.beta=0.1", *extra)
    policy = built.policies["policy"]
    prompts = [p for p in PROMPTS for _ in range(2)]
    gen = policy.generate(prompts, SamplingParams(max_new_tokens=7), torch.Generator().manual_seed(0))
    rollout = rollout_from_generation(gen, prompts, [float(i % 3) for i in range(len(prompts))])
    rollout.group_ids = torch.arange(len(prompts)) // 2
    trunk, metrics = learner_gradient(cfg, built, rollout, True, tmp_path)
    whole, whole_metrics = learner_gradient(cfg, built, rollout, False, tmp_path)
    assert (trunk - whole).abs().max() <= TOL * whole.abs().max()
    for key in ("entropy", "logprob_gap", "episode_kl/exact_mean", "kl_mean", "loss/policy"):
        assert metrics[key] == pytest.approx(whole_metrics[key], abs=TOL), key


def test_multi_turn_episodes_on_the_trunk_equal_the_whole_depth(tmp_path, micro_lm):
    """A bandit episode's turns, each with its own trunk states, re-padded into one rollout."""
    agent = agent_model(tmp_path)
    cfg = load_config(None, micro_overrides(tmp_path, **{"model.name": str(agent), "model.trainable_layers": 2, "algo.name": "reinforce",
                                                         "env.id": "cory/Bandit-v0", "env.kwargs": "{n_arms: 3, horizon: 3}",
                                                         "generation.max_new_tokens": 4, "kl.beta": 0.1}))
    built = build_agents(cfg, ["policy"], False)
    moved(built.policies["policy"])
    env = GymTextEnvBatch("cory/Bandit-v0", **cfg.env.kwargs)
    rollout = Sampler(built.policies["policy"], env, SamplingParams(max_new_tokens=4)).collect(3, np.random.default_rng(0),
                                                                                                 torch.Generator().manual_seed(0))
    assert rollout.trunk_hidden is not None and int(rollout.turn_index.max()) == 2
    trunk, _ = learner_gradient(cfg, built, rollout, True, tmp_path)
    whole, _ = learner_gradient(cfg, built, rollout, False, tmp_path)
    assert (trunk - whole).abs().max() <= TOL * whole.abs().max()


def agent_model(tmp_path):
    """A 4-layer Llama with micro-agent's tokenizer (random weights)."""
    return random_llama(tmp_path / "agent4", zoo.build("cory:micro-agent", progress=False), hidden_size=32,
                        intermediate_size=64, num_hidden_layers=4, max_position_embeddings=512, initializer_range=0.1)


@pytest.mark.parametrize("lora", [0, 4])
def test_a_cory_iteration_on_the_trunk_equals_the_whole_depth(deep, tmp_path, micro_rm, lora):
    """Both agents (full copies with a FrozenTop reference, or two adapters on one base) take the
    gradient steps of the whole depth in an iteration (pioneer's and observer's turns)."""
    def iterate(trunk: bool, out):
        cfg = load_config(None, micro_overrides(tmp_path, **{"model.name": str(deep), "model.trainable_layers": 2, "cory.enabled": True,
                                                             "model.lora.r": lora}))
        run = CoryRun(cfg, out)
        if not trunk:
            for agent in run.agents.values():
                agent.policy.module.trunk_depth = 0
            run.agents["a"].learner.reference.trunk_depth = 0
        grads = {}
        for name, agent in run.agents.items():
            params = agent.learner.optimizer.param_groups[0]["params"]
            step = agent.learner.optimizer.step

            def recorded(*a, name=name, params=params, step=step, **k):
                grads[name] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
                return step(*a, **k)

            agent.learner.optimizer.step = recorded
        run._start(resume=False)
        run.iterate()
        return grads

    trunk, whole = iterate(True, tmp_path / "trunk"), iterate(False, tmp_path / "whole")
    for name in ("a", "b"):
        assert (trunk[name] - whole[name]).abs().max() <= TOL * whole[name].abs().max(), name


def count_layer_calls(lm):
    layers = decoder(lm).layers
    calls = [0] * len(layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: calls.__setitem__(i, calls[i] + 1), with_kwargs=True)
               for i, layer in enumerate(layers)]
    return calls, handles


@pytest.mark.parametrize("sampled_trunk", [True, False])
def test_the_trunk_runs_once_per_sequence(deep, tmp_path, sampled_trunk):
    """Counted layer calls in one PPO step (reference, old values and exact KL in one pass, 2 epochs
    x 2 minibatches): the trunk's layers not once (their output came from sampling) or exactly once
    (another engine sampled: one no-grad pass), the top layers in every pass."""
    cfg, built = agents(deep, tmp_path, "algo.name=ppo", "algo.epochs=2", "algo.minibatch_size=2")
    policy = built.policies["policy"]
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=5), torch.Generator().manual_seed(0))
    rollout = rollout_from_generation(gen, PROMPTS, [1.0, 0.0, 2.0, 0.5])
    if not sampled_trunk:
        rollout.trunk_hidden = None
    learner = Learner(policy, built.reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path), built.parameters["policy"])
    calls, handles = count_layer_calls(policy.model)
    ref_calls, ref_handles = count_layer_calls_of(built.reference)
    learner.step(rollout)
    for h in handles + ref_handles:
        h.remove()
    assert calls[:2] == [0, 0] if sampled_trunk else calls[:2] == [1, 1]
    # the policy's top layers: old values and distributions (1), 2 epochs x 2 minibatches (4)
    assert calls[2:] == [5, 5] and ref_calls == [1, 1]


def count_layer_calls_of(reference):
    calls = [0] * len(reference.top)
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: calls.__setitem__(i, calls[i] + 1), with_kwargs=True)
               for i, layer in enumerate(reference.top)]
    return calls, handles


def test_all_layers_is_the_run_without_the_key(deep, tmp_path, micro_rm):
    """model.trainable_layers = the model's number of layers trains every weight, as without the key:
    bit-identical metrics and weights."""
    runs = {}
    for k in (0, 4):
        out = tmp_path / f"k{k}"
        train(load_config(None, micro_overrides(tmp_path, **{"model.name": str(deep), "model.trainable_layers": k})), out)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[k] = ([{key: v for key, v in row.items() if not key.startswith(("time/", "tokens_per_s/"))} for row in rows],
                   (out / "final" / "model.safetensors").read_bytes())
    assert runs[0] == runs[4]


def test_refusals_are_one_line(deep, tmp_path):
    with pytest.raises(UsageError, match="must be between 1 and the model's 4 decoder layers"):
        agents(deep, tmp_path, "model.trainable_layers=5")
    with pytest.raises(UsageError, match="leave model.reference and model.reference_ensemble empty"):
        load_config(None, ["model.trainable_layers=2", "model.reference=cory:micro-reviews"])
    with pytest.raises(UsageError, match="use one of model.trainable_layers and train.fsdp"):
        load_config(None, ["model.trainable_layers=2", "train.fsdp=true"])


def test_the_exact_kl_waits_for_the_updates_first_pass(deep, tmp_path):
    """REINFORCE (no values) with one minibatch: scoring runs the reference alone, the update's first
    pass gives the exact KL from the policy's whole distributions it computes anyway; the figures
    equal those of scoring the policy separately."""
    cfg, built = agents(deep, tmp_path, "algo.name=reinforce", "kl.beta=0.1")
    policy = built.policies["policy"]
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(0))
    rollout = rollout_from_generation(gen, PROMPTS, [1.0, 0.0, 2.0, 0.5])
    learner = Learner(policy, built.reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path), built.parameters["policy"])
    assert learner.exact_kl_waits(rollout)
    separate, _ = learner.score(rollout)  # the policy scored in its own pass
    calls, handles = count_layer_calls(policy.model)
    stepped, metrics = learner.step(rollout)
    for h in handles:
        h.remove()
    assert calls[2:] == [1, 1]  # the update's one pass, no scoring pass of the policy
    assert_close(stepped.scored.kl_exact, separate.scored.kl_exact, "exact KL")
    assert (stepped.scored.kl_exact[gen.response_mask.bool()] > 0).all()
    assert metrics["episode_kl/exact_mean"] == pytest.approx(float(separate.scored.kl_exact.sum(-1).mean()), rel=1e-5)
    two_minibatches = load_config(None, micro_overrides(tmp_path, **{"model.name": str(deep), "algo.minibatch_size": 2}))
    assert not Learner(policy, built.reference, make_algorithm(two_minibatches), two_minibatches, make_accelerator(cfg, tmp_path),
                       built.parameters["policy"]).exact_kl_waits(rollout)  # later minibatches would see a stepped policy


@pytest.mark.parametrize("correction,micro", [("token-tis", 0), ("seq-mis", 0), ("icepop", 0), ("token-tis", 1)])
def test_the_old_logprobs_of_another_engines_tokens_wait_for_the_updates_first_pass(deep, tmp_path, monkeypatch, correction, micro):
    """Tokens from another engine (its log-probs off the trainer's by up to 0.5 nats, and the
    rollout's log-probs the engine's, as a stale worker or vLLM hands them over), GRPO, one
    minibatch (in micro-batches of `micro` rows) and 2 epochs: the trainer's own log-probs, PPO's old
    policy and the importance ratio's numerator, come from the update's first pass, with no scoring
    pass of the policy; the weights after the step, the log-probs, the KL, the importance weights
    and the metrics equal those of scoring the policy in a pass of its own."""
    extra = ("algo.name=grpo", "algo.epochs=2", "kl.beta=0.1", "kl.exact_accounting=false", f"algo.is_correction={correction}",
             "algo.is_cap=1.2", "train.max_staleness=1", f"algo.micro_batch_size={micro}") + \
        (("algo.is_floor=0.9",) if correction == "icepop" else ())
    cfg, built = agents(deep, tmp_path, *extra, value_head=False)
    policy = built.policies["policy"]
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(0))
    rollout = rollout_from_generation(gen, PROMPTS, [1.0, 0.0, 2.0, 0.5])
    offset = 0.4 * torch.sin(torch.arange(rollout.logprobs.numel(), dtype=torch.float32)).view_as(rollout.logprobs) - 0.1
    engine = (rollout.logprobs + offset) * rollout.response_mask
    rollout = replace(rollout, logprobs=engine, engine_logprobs=engine, group_ids=torch.tensor([0, 0, 1, 1]))
    start = copy.deepcopy(policy.module.state_dict())
    runs = {}
    for waits in (True, False):
        policy.module.load_state_dict(start)
        learner = Learner(policy, built.reference, make_algorithm(cfg), cfg, make_accelerator(cfg, tmp_path), built.parameters["policy"])
        if not waits:
            monkeypatch.setattr(learner, "old_logprobs_wait", lambda r: False)
        assert learner.old_logprobs_wait(rollout) == waits
        calls, handles = count_layer_calls(policy.model)
        stepped, metrics = learner.step(rollout)
        for h in handles:
            h.remove()
        trained = {k: v.clone() for k, v in policy.module.state_dict().items()}
        runs[waits] = (stepped, metrics, trained, calls[2:])
    (waited, m_waited, w_waited, c_waited), (separate, m_separate, w_separate, c_separate) = runs[True], runs[False]
    epoch = 1 if not micro else len(PROMPTS)  # forwards of each trained layer per epoch (scoring's pass is one)
    assert c_separate == [1 + 2 * epoch] * 2 and c_waited == [2 * epoch] * 2  # scoring's pass is gone; the 2 epochs' stay
    assert m_waited[f"is/{'truncated' if correction == 'token-tis' else 'masked'}_{'sequences' if correction.startswith('seq') else 'tokens'}"] > 0
    for name in ("logprobs", "engine_logprobs"):
        assert_close(getattr(waited, name), getattr(separate, name), name)
    for name in ("kl", "is_weight", "ref_logprobs"):
        assert_close(getattr(waited.scored, name), getattr(separate.scored, name), name)
    assert_close(waited.targets.advantages, separate.targets.advantages, "advantages")
    for name, value in w_separate.items():
        assert_close(w_waited[name], value, name)
    assert any(not torch.equal(w_separate[name], start[name]) for name in start)  # the step moved the weights
    assert m_waited["logprob_gap"] == 0.0
    assert not torch.allclose(waited.logprobs, engine)  # the engine's log-probs were replaced, and their KL with them
    for refused in (("algo.minibatch_size=2",), ("kl.penalty=reward",), ("kl.exact_accounting=true",), ("model.lora.dropout=0.1",)):
        other = load_config(None, micro_overrides(tmp_path, **{"model.name": str(deep), "model.trainable_layers": 2,
                                                               **dict(e.split("=", 1) for e in extra + refused)}))
        assert not Learner(policy, built.reference, make_algorithm(other), other, make_accelerator(other, tmp_path),
                           built.parameters["policy"]).old_logprobs_wait(rollout), refused
    for name, value in m_separate.items():
        if not name.startswith(("time/", "tokens_per_s/")) and name != "logprob_gap":
            assert m_waited[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_a_groups_prompt_runs_once_and_each_answer_samples_as_if_it_ran_its_own(deep, tmp_path, monkeypatch, shared_prefix):
    """Rows that repeat one prompt (a group's answers) prefill it once, at the batch of distinct
    prompts; every row then samples the tokens, log-probs and trunk states it samples when each row
    runs its own prompt (distinct-row detection switched off)."""
    from cory.generation import native

    cfg, built = agents(deep, tmp_path)
    policy = built.policies["policy"]
    prompts = [PROMPTS[i] for i in (1, 0, 1, 2, 0, 1)]
    if shared_prefix:
        prompts = [LEAD + p for p in prompts]
    params = SamplingParams(max_new_tokens=6, shared_prefix=shared_prefix)
    batches = []
    handle = decoder(policy.model).layers[0].register_forward_pre_hook(
        lambda m, a, k: batches.append((a[0] if a else k["hidden_states"]).shape[:2]), with_kwargs=True)
    once = policy.generate(prompts, params, torch.Generator().manual_seed(3))
    prefill_rows = [b for b, length in batches if length > 1]
    monkeypatch.setattr(native, "distinct_rows", lambda ids, mask: (None, None))
    batches.clear()
    each = policy.generate(prompts, params, torch.Generator().manual_seed(3))
    handle.remove()
    assert prefill_rows[-1] == 3 and [b for b, length in batches if length > 1][-1] == len(prompts)
    assert torch.equal(once.query_ids, each.query_ids) and torch.equal(once.response_ids, each.response_ids)
    assert_close(once.logprobs, each.logprobs, "log-probs")
    assert_close(once.trunk_hidden, each.trunk_hidden, "trunk states")
    assert not torch.equal(once.response_ids[0], once.response_ids[2])  # the group's answers still differ


@pytest.mark.parametrize("identical", [True, False])
def test_trunk_states_sampled_with_a_shared_prefix_equal_the_whole_depth(deep, tmp_path, identical):
    """With generation.shared_prefix the trunk states kept from sampling equal the trunk's output of
    the sampled sequences at full depth, and those kept by the same sampling without the shared
    prefix: for distinct prompts (their common lead run once) and for a batch whose prompts are all
    one (a bandit episode's first turn: the whole prompt is shared, and prefilled once)."""
    _, built = agents(deep, tmp_path)
    policy = built.policies["policy"]
    prompts = [LEAD + (PROMPTS[1] if identical else p) for p in PROMPTS]
    shared = policy.generate(prompts, SamplingParams(max_new_tokens=6, shared_prefix=True), torch.Generator().manual_seed(2))
    plain = policy.generate(prompts, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(2))
    assert shared.trunk_hidden is not None and plain.trunk_hidden is not None
    assert torch.equal(shared.response_ids, plain.response_ids)
    ids, mask, positions = sequence_layout(shared.query_ids, shared.query_mask, shared.response_ids, shared.response_mask)
    recomputed = trunk_states(policy.model, policy.module.trunk_depth, ids, mask, positions)
    assert shared.trunk_hidden.shape == recomputed.shape
    real = mask.bool()
    real[:, -1] = False  # the last sampled token is never fed back: its column is 0
    assert_close(shared.trunk_hidden[real], recomputed[real], "shared-prefix trunk states vs whole depth")
    assert_close(shared.trunk_hidden[real], plain.trunk_hidden[real], "shared-prefix trunk states vs no shared prefix")
