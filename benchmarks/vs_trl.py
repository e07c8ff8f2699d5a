"""cory's GRPO against TRL's `GRPOTrainer`: wall time per optimizer step and the reward reached.

Both frameworks train the same embedded model (`cory:tiny-reviews`, float32, CPU) towards the
positive logit of the same sentiment classifier (`cory:tiny-sentiment`), on the same review-opening
prompts, with the same GRPO settings:

    P prompts x G completions per optimizer step, <= N new tokens, temperature 1.0, no top-k/top-p,
    one gradient update per generation batch (TRL: num_iterations=1, no accumulation),
    AdamW (weight decay 0, betas 0.9/0.999), constant learning rate, no warm-up, grad-norm clip 1.0,
    clipped ratio eps 0.2, group-std-scaled advantages, token-mean loss (TRL "dapo"), KL to the
    initial model as a beta * k3 loss term (the same beta for both; with beta = 0 TRL loads no
    reference model), no entropy bonus, no gradient checkpointing, no mixed precision.

The two trainings run side by side in one process, alternating single optimizer steps
(cory, TRL, TRL, cory, cory, TRL, ...), so adjacent steps of the two see the same machine load;
this is repeated with seeds 0..R-1. Reported:

- step time: the median wall time of one optimizer step (generation + reward + reference scoring +
  update). cory: around `TrainingRun.iterate()`. TRL: from `on_step_begin` to `on_step_end` of a
  `TrainerCallback` (excludes the Trainer's data loading and logging between steps; the full
  step-to-step interval is reported as well); also the median over step pairs of cory's step i /
  TRL's step i, which cancels slow phases of a shared CPU;
- train reward: the mean reward of the last K steps' samples;
- eval reward: a fixed-seed evaluation of each final policy on the 64 held-out prompts of cory's
  sentiment task (cory.evaluate.evaluate, 4 samples per prompt, temperature 1.0, same reward), the
  same code for both, plus the KL of the samples from the initial model;
- with --profile, where the time of a step goes in each (cProfile, grouped into phases).

With --lora-r R both train the same LoRA adapters (r R, alpha 2R, every projection of the decoder
layers, dropout 0; cory's `peft_config` builds PEFT's configuration for both); with also
--trainable-layers K the adapters sit on the top K decoder layers only (PEFT's `layers_to_transform`,
cory's `model.trainable_layers=K`), and cory runs its frozen trunk once per sequence. In both the
reference is the base model with the adapters off.

Both use one intra-op thread by default (--threads): on a shared CPU, two OpenMP threads per process
slow down 10-40x whenever another process competes for the cores, which swamps any comparison.

    python benchmarks/vs_trl.py [--steps 25] [--repeats 5] [--prompts-per-step 8] [--group-size 4]
                                [--max-new-tokens 16] [--lr 5e-4] [--beta 0.04] [--last-k 5]
                                [--threads 1] [--profile] [--lora-r 16 --trainable-layers 4]
Writes benchmarks/results/vs_trl.{json,md}. Needs `pip install -r requirements-bench.txt` (TRL).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import accelerate
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from cory import zoo
from cory.config import load_config
from cory.corpora import reviews
from cory.evaluate import evaluate
from cory.generation.sampling import SamplingParams
from cory.policy import Policy
from cory.rewards import load_reward
from cory.scoring import Scorer
from cory.train import TrainingRun

# TRL (and its `datasets`) are optional: `pip install -r requirements-bench.txt`; imported where used.

RESULTS = Path(__file__).parent / "results"
EVAL_SEED = 1234


# -- shared pieces ---------------------------------------------------------------------------------
def prompt_pool(num_train: int = 2048, num_eval: int = 64) -> tuple[list[str], list[str]]:
    """The same split as cory's `sentiment` task: (train prompts, held-out eval prompts)."""
    pool = reviews.prompts(num_train + num_eval, seed=2024)
    return pool[num_eval:], pool[:num_eval]


def evaluate_model(lm, model_path: str, eval_prompts, reward, args, reference) -> dict:
    """Fixed-seed evaluation of a causal LM with cory's evaluator (identical for both frameworks);
    `reference`: the frozen initial model, scored at the evaluation temperature."""
    lm.eval()
    policy = Policy(lm, AutoTokenizer.from_pretrained(model_path))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    out = evaluate(policy, eval_prompts, reward, params, samples_per_prompt=args.eval_samples, seed=EVAL_SEED,
                   reference=Scorer(reference, params.temperature or 1.0))
    return {k: out[k] for k in ("reward_mean", "reward_std", "kl_mean", "response_length", "eos_rate", "n")}


def hf_sampler_eval(lm, model_path: str, eval_prompts, reward, args) -> dict:
    """The initial model's reward on the held-out prompts when sampled the way TRL samples
    (transformers `generate`, prompts tokenized without added special tokens, left padding,
    completions decoded without special tokens): against cory's evaluator on the same prompts, it
    shows whether the two samplers draw from the same distribution."""
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    prompts = [p for p in eval_prompts for _ in range(args.eval_samples)]
    torch.manual_seed(EVAL_SEED)
    scores, lengths = [], []
    for i in range(0, len(prompts), 64):
        batch = prompts[i:i + 64]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = lm.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        completions = out[:, enc["input_ids"].shape[1]:]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        scores += reward(batch, texts)
        lengths += (completions != tok.pad_token_id).sum(1).tolist()
    n = len(scores)
    mean = statistics.fmean(scores)
    return {"reward_mean": mean, "reward_se": statistics.stdev(scores) / n ** 0.5, "response_length": statistics.fmean(lengths), "n": n}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


# -- cory ------------------------------------------------------------------------------------------
def cory_config(args, seed: int):
    return load_config(None, [
        f"model.name={args.model}", "model.dtype=float32",
        "task.name=sentiment", f"task.reward={args.reward}", "task.reward_on=prompt+response",
        "task.num_train_prompts=2048", "task.num_eval_prompts=64",
        "algo.name=grpo", f"algo.group_size={args.group_size}", f"algo.lr={args.lr}",
        "algo.weight_decay=0.0", "algo.warmup_iterations=0", "algo.max_grad_norm=1.0",
        "algo.epochs=1", "algo.minibatch_size=0", "algo.micro_batch_size=0", "algo.clip_range=0.2",
        "algo.scale_rewards=true", "algo.loss_aggregation=token-mean", "algo.ent_coef=0.0",
        "algo.missing_eos_penalty=0.0",
        # TRL logs only its k3 estimate: cory's exact episode-KL accounting (one more policy
        # forward per step) is switched off so that both do the same work.
        f"kl.beta={args.beta}", "kl.controller=fixed", "kl.penalty=loss", "kl.exact_accounting=false",
        f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=1.0",
        "generation.top_k=0", "generation.top_p=1.0",
        f"train.batch_size={args.prompts_per_step}", f"train.iterations={args.steps}", f"train.seed={seed}",
        "train.log_with=[]", "train.progress=false",
    ] + (["train.mixed_precision=bf16"] if args.bf16 else [])
      + ([f"model.lora.r={args.lora_r}", f"model.lora.alpha={2 * args.lora_r}", "model.lora.dropout=0.0",
          f"model.trainable_layers={args.trainable_layers}"] if args.lora_r else []))


def trl_peft(args, model_path: str):
    """The PEFT LoRA configuration TRL gets: cory's adapters (same targets), on the top K layers."""
    if not args.lora_r:
        return None
    from transformers import AutoConfig

    from cory.config import LoraConfig
    from cory.lora import peft_config

    layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    top = list(range(layers - args.trainable_layers, layers)) if args.trainable_layers else None
    return peft_config(args.lora_r, 2 * args.lora_r, LoraConfig().targets, dropout=0.0, layers=top)


class CoryStepper:
    """One cory GRPO TrainingRun, stepped one optimizer step at a time."""

    def __init__(self, args, seed: int, work: Path):
        t0 = time.perf_counter()
        self.run = TrainingRun(cory_config(args, seed), work / f"cory-{seed}")
        self.setup_s = time.perf_counter() - t0
        self.threads = args.threads
        self.steps: list[dict] = []

    def step(self) -> None:
        set_threads(self.threads)  # TrainingRun sets cpu_count // processes; keep both frameworks equal
        t0 = time.perf_counter()
        m = self.run.iterate()
        dt = time.perf_counter() - t0
        self.steps.append({"time_s": dt, "reward": m["reward_mean"], "kl": m["kl_mean"], "loss_kl": m.get("loss/kl"),
                           "response_length": m["response_length"], "time_generate_s": m["time/generate"],
                           "end": time.perf_counter()})


# -- TRL -------------------------------------------------------------------------------------------
def trl_config(args, seed: int, out_dir: Path):
    from trl import GRPOConfig

    rows = args.prompts_per_step * args.group_size
    return GRPOConfig(
        output_dir=str(out_dir),
        # one optimizer step = one generation batch of P prompts x G completions
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group_size, num_iterations=1, max_steps=args.steps,
        # sampling
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, use_vllm=False, use_transformers_continuous_batching=False,
        # optimisation, as cory: AdamW, constant lr, no warm-up, no weight decay, clip 1.0
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        # GRPO objective, as cory's grpo: token-level clipped ratio, group-std advantages, k3 KL loss
        beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", importance_sampling_level="token",
        mask_truncated_completions=False, entropy_coef=0.0, top_entropy_quantile=1.0,
        # precision and device: float32 on CPU, no gradient checkpointing (cory has none either)
        use_cpu=True, bf16=args.bf16, fp16=False, gradient_checkpointing=False,
        # bookkeeping
        seed=seed, data_seed=seed, report_to=[], logging_steps=1, save_strategy="no", eval_strategy="no",
        log_completions=False, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )


def run_pair(args, seed: int, work: Path, model_path: str, train_prompts, reward) -> tuple[dict, dict]:
    """Trains cory and TRL side by side, alternating single optimizer steps: C T T C C T T C ...

    The TRL Trainer drives the loop; a callback runs one cory step just before TRL's step on even
    steps and just after it on odd ones, outside TRL's timed window. Adjacent steps of the two
    see the same machine load, so the per-pair ratio is robust to the noise of a shared CPU.
    """
    from datasets import Dataset
    from trl import GRPOTrainer

    set_threads(args.threads)
    rows = args.prompts_per_step * args.group_size
    calls: list[dict] = []

    def sentiment_reward(prompts, completions, **kwargs):
        # plain-text prompts: `completions` are the decoded strings (special tokens skipped)
        values = reward(list(prompts), list(completions))
        calls.append({"n": len(values), "unique_prompts": len(set(prompts)), "mean": sum(values) / len(values)})
        return values

    cory = CoryStepper(args, seed, work)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.logs = [], [], []

        def on_step_begin(self, args_, state, control, **kw):
            if len(self.begin) % 2 == 0:
                cory.step()
            set_threads(args.threads)
            self.begin.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            self.end.append(time.perf_counter())
            if len(self.end) % 2 == 0:
                cory.step()

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    t_setup = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    timer = Interleave()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notice for gradient_checkpointing, etc.
        trainer = GRPOTrainer(
            model=model, reward_funcs=sentiment_reward, args=trl_config(args, seed, work / f"trl-{seed}"),
            train_dataset=Dataset.from_dict({"prompt": list(train_prompts)}), processing_class=tokenizer,
            callbacks=[timer], peft_config=trl_peft(args, model_path),
        )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
    setup_s = time.perf_counter() - t_setup
    t_train = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    both_s = time.perf_counter() - t_train
    if len(timer.end) != args.steps or len(calls) != args.steps or len(cory.steps) != args.steps:
        raise RuntimeError(f"TRL ran {len(timer.end)} optimizer steps, {len(calls)} reward calls, cory {len(cory.steps)} steps; expected {args.steps}")
    for c in calls:  # the batch geometry the comparison relies on
        if c["n"] != rows or c["unique_prompts"] > args.prompts_per_step:
            raise RuntimeError(f"TRL scored {c['n']} completions of {c['unique_prompts']} prompts per step, expected {rows} of {args.prompts_per_step}")
    steps = []
    for i in range(args.steps):
        log = timer.logs[i] if i < len(timer.logs) else {}
        # step-to-step interval of TRL's loop (data loading, logging, callbacks), less the cory steps in it
        prev = timer.end[i - 1] if i else timer.begin[0]
        in_between = sum(s["time_s"] for s in cory.steps if prev < s["end"] <= timer.end[i])
        steps.append({"time_s": timer.end[i] - timer.begin[i], "interval_s": timer.end[i] - prev - in_between,
                      "reward": calls[i]["mean"], "reward_logged": log.get("reward"), "kl": log.get("kl"),
                      "response_length": log.get("completions/mean_length")})
    for s in cory.steps:
        s.pop("end")
    cory_time = sum(s["time_s"] for s in cory.steps)
    return ({"framework": "cory", "seed": seed, "setup_s": cory.setup_s, "train_s": cory_time, "steps": cory.steps,
             "model": cory.run.policy.model},
            {"framework": "trl", "seed": seed, "setup_s": setup_s, "train_s": both_s - cory_time, "steps": steps,
             "model": trainer.model})


# -- profile ---------------------------------------------------------------------------------------
CORY_PHASES = [  # (label, file suffix, function, caller function or None)
    ("generation (sampling loop)", "cory/policy.py", "generate", None),
    ("reward (classifier)", "cory/rewards/__init__.py", "call", None),
    # Learner.score (through _score_rows): the reference, plus a no-grad policy forward where values
    # or exact episode-KL accounting need it (an earlier version matched caller "score", which
    # never calls sequence_logprobs itself, and left both forwards in "everything else"). Both
    # passes go through a Scorer (cory/scoring.py), whose __call__ runs sequence_logprobs.
    ("reference forward", "cory/scoring.py", "__call__", "_score_rows"),
    ("policy forward + loss", "cory/scoring.py", "__call__", "update"),
    ("backward", "accelerate/accelerator.py", "backward", None),
    ("grad clip", "accelerate/accelerator.py", "clip_grad_norm_", None),
    ("optimizer step", "accelerate/optimizer.py", "step", None),
]
TRL_PHASES = [
    ("generation (sampling loop)", "transformers/generation/utils.py", "generate", None),
    ("reward (classifier)", "trl/trainer/grpo_trainer.py", "_calculate_rewards", None),
    ("policy forward + loss", "trl/trainer/grpo_trainer.py", "_compute_loss", None),
    ("backward", "accelerate/accelerator.py", "backward", None),
    ("grad clip", "accelerate/accelerator.py", "clip_grad_norm_", None),
    ("optimizer step", "accelerate/optimizer.py", "step", None),
]


def phase_times(stats: pstats.Stats, phases, n_steps: int) -> dict[str, float]:
    """Seconds per step spent in each phase (cumulative time of its function, optionally only
    when called from a given caller)."""
    out = {}
    for label, suffix, fn, caller in phases:
        total = 0.0
        for (file, _, name), (_, _, _, ct, callers) in stats.stats.items():
            if name != fn or not file.replace(os.sep, "/").endswith(suffix):
                continue
            if caller is None:
                total += ct
            else:
                total += sum(v[3] for (_, _, cname), v in callers.items() if cname == caller)
        out[label] = total / n_steps
    return out


def top_functions(stats: pstats.Stats, n_steps: int, n_rows: int = 12) -> list[dict]:
    rows = []
    for (file, line, fn), (_, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n_rows]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if file != "~" else "~"
        rows.append({"function": f"{where}({fn})", "calls_per_step": nc / n_steps,
                     "own_s_per_step": tt / n_steps, "total_s_per_step": ct / n_steps})
    return rows


def profile_cory(args, work: Path, n_steps: int = 3) -> dict:
    """cProfile of `n_steps` cory GRPO steps after two warm-up steps."""
    run = TrainingRun(cory_config(args, 0), work / "cory-profile")
    set_threads(args.threads)
    for _ in range(2):
        run.iterate()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(n_steps):
        run.iterate()
    prof.disable()
    stats = pstats.Stats(prof)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
    print(buf.getvalue())
    phases = phase_times(stats, CORY_PHASES, n_steps)
    return {"steps_profiled": n_steps, "step_s": (time.perf_counter() - t0) / n_steps,
            "phases_s": phases, "top_own_time": top_functions(stats, n_steps)}


def profile_trl(args, work: Path, model_path: str, train_prompts, reward, n_steps: int = 3) -> dict:
    """cProfile of `n_steps` TRL GRPOTrainer optimizer steps after two warm-up steps."""
    from datasets import Dataset
    from trl import GRPOTrainer

    prof = cProfile.Profile()
    spans = []

    class Profiled(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            set_threads(args.threads)
            if state.global_step >= 2:
                spans.append(time.perf_counter())
                prof.enable()

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step >= 3:  # global_step is already incremented here
                prof.disable()
                spans[-1] = time.perf_counter() - spans[-1]

    def sentiment_reward(prompts, completions, **kwargs):
        return reward(list(prompts), list(completions))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = trl_config(argparse.Namespace(**{**vars(args), "steps": 2 + n_steps}), 0, work / "trl-profile")
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                              reward_funcs=sentiment_reward, args=config,
                              train_dataset=Dataset.from_dict({"prompt": list(train_prompts)}),
                              processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[Profiled()],
                              peft_config=trl_peft(args, model_path))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    stats = pstats.Stats(prof)
    phases = phase_times(stats, TRL_PHASES, n_steps)
    # TRL's profiling_decorator wraps both the reference forward and the reward call made from
    # _generate_and_score_completions: their sum, less the reward, is the reference forward.
    wrapped = phase_times(stats, [("w", "trl/extras/profiling.py", "wrapper", "_generate_and_score_completions")], n_steps)["w"]
    phases["reference forward"] = wrapped - phases["reward (classifier)"]
    ordered = [label for label, *_ in CORY_PHASES]
    phases = {k: phases[k] for k in ordered if k in phases} | {k: v for k, v in phases.items() if k not in ordered}
    return {"steps_profiled": n_steps, "step_s": sum(spans) / n_steps,
            "phases_s": phases, "top_own_time": top_functions(stats, n_steps)}


# -- summary ---------------------------------------------------------------------------------------
def summarise(runs: list[dict], args) -> dict:
    med = statistics.median
    out = {}
    for fw in ("cory", "trl"):
        rs = [r for r in runs if r["framework"] == fw]
        all_times = [s["time_s"] for r in rs for s in r["steps"]]
        per_rep = [med([s["time_s"] for s in r["steps"]]) for r in rs]
        last = [statistics.fmean([s["reward"] for s in r["steps"][-args.last_k:]]) for r in rs]
        first = [statistics.fmean([s["reward"] for s in r["steps"][: args.last_k]]) for r in rs]
        later = [s["time_s"] for r in rs for s in r["steps"][1:]]  # empty with --steps 1
        d = {
            "step_s_median": med(all_times), "step_s_median_per_repeat": per_rep,
            "step_s_median_excl_first": med(later) if later else float("nan"),
            "train_reward_first_k_per_repeat": first, "train_reward_last_k_per_repeat": last,
            "train_reward_last_k_mean": statistics.fmean(last), "train_s_per_repeat": [r["train_s"] for r in rs],
            "setup_s_per_repeat": [r["setup_s"] for r in rs],
        }
        if fw == "trl":
            d["step_interval_s_median"] = med([s["interval_s"] for r in rs for s in r["steps"]])
        if all("eval" in r for r in rs):
            ev = [r["eval"]["reward_mean"] for r in rs]
            d["eval_reward_per_repeat"] = ev
            d["eval_reward_mean"] = statistics.fmean(ev)
            d["eval_kl_per_repeat"] = [r["eval"]["kl_mean"] for r in rs]
            d["eval_kl_mean"] = statistics.fmean(d["eval_kl_per_repeat"])
        out[fw] = d
    c, t = out["cory"], out["trl"]
    pairs = []  # step i of cory and step i of TRL ran back to back
    for rc in (r for r in runs if r["framework"] == "cory"):
        rt = next(r for r in runs if r["framework"] == "trl" and r["seed"] == rc["seed"])
        pairs += [a["time_s"] / b["time_s"] for a, b in zip(rc["steps"], rt["steps"])]
    ratios = {
        "step_time": c["step_s_median"] / t["step_s_median"],
        "step_time_paired_median": med(pairs),
        "step_time_paired_quartiles": statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3,
        "step_time_per_repeat": [a / b for a, b in zip(c["step_s_median_per_repeat"], t["step_s_median_per_repeat"])],
        "step_time_vs_trl_interval": c["step_s_median"] / t["step_interval_s_median"],
        "train_reward_last_k": _ratio(c["train_reward_last_k_mean"], t["train_reward_last_k_mean"]),
        "train_reward_last_k_diff": c["train_reward_last_k_mean"] - t["train_reward_last_k_mean"],
    }
    if "eval_reward_mean" in c and "eval_reward_mean" in t:
        ratios["eval_reward"] = _ratio(c["eval_reward_mean"], t["eval_reward_mean"])
        ratios["eval_reward_diff"] = c["eval_reward_mean"] - t["eval_reward_mean"]
        diffs = [a - b for a, b in zip(c["eval_reward_per_repeat"], t["eval_reward_per_repeat"])]
        ratios["eval_reward_diff_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    diffs = [a - b for a, b in zip(c["train_reward_last_k_per_repeat"], t["train_reward_last_k_per_repeat"])]
    ratios["train_reward_last_k_diff_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    out["ratio_cory_over_trl"] = ratios
    reward_key = "eval_reward_diff" if "eval_reward_diff" in ratios else "train_reward_last_k_diff"
    out["goal"] = {
        "statement": "cory step time <= 0.5 x TRL's, with at least equal reward",
        "step_time_measure": "step_time_paired_median",
        "step_time_met": ratios["step_time_paired_median"] <= 0.5,
        "reward_met": ratios[reward_key] >= 0.0,
        "reward_measure": reward_key,
    }
    se = ratios.get(reward_key + "_se")
    out["goal"]["reward_diff_within_2se"] = None if se is None else abs(ratios[reward_key]) <= 2 * se
    out["goal"]["met"] = out["goal"]["step_time_met"] and out["goal"]["reward_met"]
    return out


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None where the ratio means nothing (b <= 0: rewards are logits and can be negative)."""
    return a / b if b > 0 and a >= 0 else None


def _spread(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}" if len(xs) > 1 else fmt.format(xs[0])


def markdown(result: dict) -> str:
    s, cfg = result["summary"], result["settings"]
    c, t, r = s["cory"], s["trl"], s["ratio_cory_over_trl"]
    f3 = "{:.3f}"
    rat = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        f"# cory GRPO vs TRL {result['versions']['trl']} GRPOTrainer on {cfg['model']} (CPU, {cfg['threads']} thread{'s' if cfg['threads'] > 1 else ''})",
        "",
        f"{cfg['prompts_per_step']} prompts x {cfg['group_size']} completions per optimizer step, <= {cfg['max_new_tokens']} new tokens, "
        + (f"LoRA r {cfg['lora_r']} (alpha {2 * cfg['lora_r']}) on " + (f"the top {cfg['trainable_layers']} decoder layers" if cfg.get('trainable_layers') else "every decoder layer")
           + " in both (TRL through PEFT's `layers_to_transform`), " if cfg.get("lora_r") else "full fine-tuning, ")
        + f"temperature 1.0, lr {cfg['lr']:g} (constant), beta {cfg['beta']:g} (k3 loss term), clip 0.2, token-mean loss, "
        f"{cfg['steps']} steps x {cfg['repeats']} alternating repeats (seeds {', '.join(map(str, cfg['seeds']))}); "
        f"reward = `{cfg['reward']}`" + (" (VADER compound score)" if cfg['reward'] == "vader" else " positive logit") + f". Train reward = mean of the last {cfg['last_k']} steps' samples; "
        f"eval reward = fixed-seed evaluation of the final policy on the 64 held-out prompts x {cfg['eval_samples']} samples "
        f"(same evaluator for both). Spread = min–max over repeats. The two draw their training prompts "
        f"independently, {cfg['prompts_per_step']} per step: train rewards differ by which prompts were drawn (a review "
        f"opening's own sentiment counts when the reward reads prompt + response); the eval rows use the same prompts.",
        "",
        "| measure | cory | TRL | cory / TRL |",
        "|---|---|---|---|",
        f"| step time, median (s) | {c['step_s_median']:.3f} ({_spread(c['step_s_median_per_repeat'], f3)}) | "
        f"{t['step_s_median']:.3f} ({_spread(t['step_s_median_per_repeat'], f3)}) | {r['step_time']:.2f} ({_spread(r['step_time_per_repeat'], '{:.2f}')}) |",
        f"| paired step ratio (cory step i / TRL step i, adjacent in time): median [quartiles] | | | "
        f"{r['step_time_paired_median']:.2f} [{r['step_time_paired_quartiles'][0]:.2f}, {r['step_time_paired_quartiles'][2]:.2f}] |",
        f"| TRL step-to-step interval incl. data loading + logging (s) | | {t['step_interval_s_median']:.3f} | {r['step_time_vs_trl_interval']:.2f} |",
        f"| train reward, first {cfg['last_k']} steps | {statistics.fmean(c['train_reward_first_k_per_repeat']):.3f} | "
        f"{statistics.fmean(t['train_reward_first_k_per_repeat']):.3f} | |",
        f"| train reward, last {cfg['last_k']} steps | {c['train_reward_last_k_mean']:.3f} ({_spread(c['train_reward_last_k_per_repeat'], f3)}) | "
        f"{t['train_reward_last_k_mean']:.3f} ({_spread(t['train_reward_last_k_per_repeat'], f3)}) | {rat(r['train_reward_last_k'])} (diff {r['train_reward_last_k_diff']:+.3f}) |",
    ]
    if "eval_reward" in r:
        lines.append(
            f"| eval reward, final policy (initial model: {result['initial_eval']['reward_mean']:.3f}) | {c['eval_reward_mean']:.3f} ({_spread(c['eval_reward_per_repeat'], f3)}) | "
            f"{t['eval_reward_mean']:.3f} ({_spread(t['eval_reward_per_repeat'], f3)}) | {rat(r['eval_reward'])} (diff {r['eval_reward_diff']:+.3f}) |")
        lines.append(f"| eval KL from the initial model (nats/sequence) | {c['eval_kl_mean']:.3f} | {t['eval_kl_mean']:.3f} | |")
    if result.get("sampler_check"):
        sc, ie = result["sampler_check"], result["initial_eval"]
        se_c = ie["reward_std"] / ie["n"] ** 0.5
        lines.append(f"| initial model on the held-out prompts: cory's sampler vs transformers `generate` sampling as TRL does "
                     f"(± standard error) | {ie['reward_mean']:.3f} ± {se_c:.3f} | {sc['reward_mean']:.3f} ± {sc['reward_se']:.3f} | "
                     f"(diff {ie['reward_mean'] - sc['reward_mean']:+.3f}) |")
    g = s["goal"]
    se = r.get(g["reward_measure"] + "_se")
    noise = "" if se is None else (f" ± {se:.3f} (standard error over the seed-paired repeats; "
                                   + ("within" if g["reward_diff_within_2se"] else "outside") + " 2 SE)")
    lines += [
        "",
        f"Goal ({g['statement']}): step time {'met' if g['step_time_met'] else 'NOT met'} "
        f"(paired median {r['step_time_paired_median']:.2f}x), reward {'met' if g['reward_met'] else 'NOT met'} "
        f"(cory − TRL {g['reward_measure'].replace('_diff', '')}: {r[g['reward_measure']]:+.3f}{noise}).",
        "",
        "Both run in one process and alternate single optimizer steps (cory, TRL, TRL, cory, ...); the paired ratio "
        "compares steps taken back to back, so it is the robust figure on a shared CPU. TRL's own defaults that differ "
        "from the common settings were overridden: gradient checkpointing off, bf16 "
        + ("autocast on for both" if cfg.get("bf16") else "off") + ", constant learning rate, "
        "beta as above. One intra-op thread each: with two, competing processes on the 2-core machine slow every step "
        "down 10-40x at random moments.",
        "",
        f"Command: `{result.get('command', 'python benchmarks/vs_trl.py')}`. Models: `{cfg['model_folder']}`, reward `{cfg['reward_folder']}`. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}. Total wall time {result['wall_s']:.0f} s.",
    ]
    if result.get("profile"):
        pc, pt = result["profile"]["cory"], result["profile"]["trl"]
        lines += ["", f"## Where a step's time goes (cProfile, mean of {pc['steps_profiled']} steps each after 2 warm-up steps, seconds per step)", "",
                  "| phase | cory | TRL |", "|---|---|---|"]
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "—"  # noqa: E731
        for label in list(pc["phases_s"]) + [k for k in pt["phases_s"] if k not in pc["phases_s"]]:
            lines.append(f"| {label} | {fmt(pc['phases_s'], label)} | {fmt(pt['phases_s'], label)} |")
        rest_c = pc["step_s"] - sum(pc["phases_s"].values())
        rest_t = pt["step_s"] - sum(pt["phases_s"].values())
        lines.append(f"| everything else (padding, advantages, metrics, bookkeeping) | {rest_c:.3f} | {rest_t:.3f} |")
        lines.append(f"| whole step, under the profiler | {pc['step_s']:.3f} | {pt['step_s']:.3f} |")
        for name, p in (("cory", pc), ("TRL", pt)):
            lines += ["", f"Top functions by own time, {name}:", "", "| function | calls/step | own s/step | total s/step |", "|---|---|---|---|"]
            lines += [f"| `{r['function']}` | {r['calls_per_step']:g} | {r['own_s_per_step']:.4f} | {r['total_s_per_step']:.4f} |" for r in p["top_own_time"][:8]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cory:tiny-reviews")
    ap.add_argument("--reward", default="cory:tiny-sentiment")
    ap.add_argument("--prompts-per-step", type=int, default=8, help="P: prompts per optimizer step")
    ap.add_argument("--group-size", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per training run")
    ap.add_argument("--repeats", type=int, default=5, help="repeats, seeds 0..repeats-1 (each trains both, alternating steps)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient for both (0: no reference model in TRL)")
    ap.add_argument("--last-k", type=int, default=5, help="train reward = mean over the last K steps")
    ap.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt in the final evaluation (0 = skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both (1: on a shared CPU, 2 OpenMP threads slow down 10-40x whenever another process runs)")
    ap.add_argument("--bf16", action="store_true", help="both train with bf16 autocast (cory train.mixed_precision=bf16, TRL bf16=True)")
    ap.add_argument("--lora-r", type=int, default=0, help="both train LoRA adapters of this rank (0: full fine-tuning)")
    ap.add_argument("--trainable-layers", type=int, default=0, help="with --lora-r: adapters on the top K decoder layers only (0: all)")
    ap.add_argument("--profile", action="store_true", help="also cProfile 3 steps of each and report where a step's time goes")
    ap.add_argument("--out", default=str(RESULTS), help="folder for vs_trl.json and vs_trl.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    import trl

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    t_all = time.perf_counter()
    set_threads(args.threads)
    model_path = zoo.resolve(args.model)
    reward = load_reward(args.reward)
    train_prompts, eval_prompts = prompt_pool()
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().requires_grad_(False)
    initial_eval = evaluate_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), model_path,
                                  eval_prompts, reward, args, reference) if args.eval_samples else None
    # the frozen reference is the initial model: sample it the way TRL does (no second load)
    sampler_check = hf_sampler_eval(reference, model_path, eval_prompts, reward, args) if args.eval_samples else None

    runs = []
    with tempfile.TemporaryDirectory(prefix="cory-vs-trl-") as tmp:
        work = Path(tmp)
        for rep in range(args.repeats):
            for r in run_pair(args, rep, work, model_path, train_prompts, reward):
                if args.eval_samples:
                    set_threads(args.threads)
                    r["eval"] = evaluate_model(r["model"], model_path, eval_prompts, reward, args, reference)
                del r["model"]
                times = [s["time_s"] for s in r["steps"]]
                rew = [s["reward"] for s in r["steps"]]
                print(f"[repeat {rep}] {r['framework']:4s}: median step {statistics.median(times):.3f} s, train {r['train_s']:.1f} s, "
                      f"reward first {statistics.fmean(rew[:args.last_k]):+.3f} -> last {statistics.fmean(rew[-args.last_k:]):+.3f}"
                      + (f", eval {r['eval']['reward_mean']:+.3f} (kl {r['eval']['kl_mean']:.3f})" if "eval" in r else ""), flush=True)
                runs.append(r)
        profile = None
        if args.profile:
            profile = {"cory": profile_cory(args, work),
                       "trl": profile_trl(args, work, model_path, train_prompts, reward)}

    settings = {k: getattr(args, k) for k in ("model", "reward", "prompts_per_step", "group_size", "max_new_tokens", "steps",
                                               "repeats", "lr", "beta", "last_k", "eval_samples", "threads", "bf16",
                                               "lora_r", "trainable_layers")}
    settings.update({"model_folder": Path(model_path).name, "reward_folder": Path(zoo.resolve(args.reward)).name,
                     "seeds": list(range(args.repeats)), "temperature": 1.0,
                     "dtype": "float32 weights, bf16 autocast" if args.bf16 else "float32", "device": "cpu",
                     "clip": 0.2, "max_grad_norm": 1.0, "loss": "token-mean (TRL loss_type=dapo)", "kl_term": "beta * k3 in the loss",
                     "trl_extra": {"num_iterations": 1, "gradient_accumulation_steps": 1, "steps_per_generation": 1,
                                   "lr_scheduler_type": "constant", "gradient_checkpointing": False, "use_vllm": False,
                                   "bf16": args.bf16, "scale_rewards": "group"}})
    result = {
        "command": " ".join(["python", "benchmarks/vs_trl.py", *sys.argv[1:]]),
        "settings": settings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "trl": trl.__version__, "python": platform.python_version()},
        "initial_eval": initial_eval,
        "sampler_check": sampler_check,
        "summary": summarise(runs, args),
        "runs": runs,
        "profile": profile,
        "wall_s": time.perf_counter() - t_all,
    }
    md = markdown(result)
    print(md)
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # The default model keeps the historical file name; others (the real model, bf16) get their own.
        tag = "" if args.model == "cory:tiny-reviews" else "_" + args.model.removeprefix("cory:").replace("/", "_")
        tag += "_bf16" if args.bf16 else ""
        tag += (f"_lora{args.lora_r}" + (f"_top{args.trainable_layers}" if args.trainable_layers else "")) if args.lora_r else ""
        (out / f"vs_trl{tag}.json").write_text(json.dumps(result, indent=2))
        (out / f"vs_trl{tag}.md").write_text(md)


if __name__ == "__main__":
    main()
