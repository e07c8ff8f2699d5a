"""The Learner: one policy, its optimizer, an algorithm and a KL controller, on accelerate.

`step(rollout)` scores the rollout (reference log-probs, values, per-token KL), shapes per-token
rewards once for every algorithm (score, missing-EOS and overlong penalties, reward normalisation,
KL penalty), runs the algorithm's advantage estimator, then minimises `cory.losses.objective` over
epochs of shuffled minibatches, accumulating gradients over micro-batches. The aggregation's
normaliser is that of the whole minibatch on all processes, so micro-batching and data parallelism
leave the gradient unchanged. Every algorithm plugs in here unchanged, and CORY drives two Learners.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from accelerate import Accelerator

from cory.advantages import ESTIMATORS, episode_sums, episode_totals, group_normalized
from cory.algorithms.base import Algorithm
from cory.drift.exact import kl_exact, mixture_logprobs
from cory.errors import UsageError
from cory.kl import kl_k1, kl_k3, make_controller, masked_mean, masked_sum, per_token_kl
from cory.losses import aggregate_weights, loss_counts, objective
from cory.policy import Policy, sequence_logprobs
from cory.rollout import Rollout
from cory.sharding import gather_full, is_sharded, release_full

logger = logging.getLogger(__name__)

SCORE_CHUNK_ELEMENTS = 2**26
"""Scoring with whole distributions runs over row chunks of at most this many [rows x tokens x
vocabulary] entries (256 MB of float32 per tensor)."""


class NonFiniteLossError(RuntimeError):
    """The loss (or every step's gradients) became NaN or infinite; training stops rather than
    corrupting the weights."""


MAX_SKIPPED_ITERATIONS = 3
"""Training stops when every optimizer step of this many iterations in a row had non-finite gradients."""


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """[B, L] per-token rewards: -beta * KL at every response token, plus the turn's score at its last token."""
    rewards = -beta * kl * mask
    last = (mask.sum(-1) - 1).clamp_min(0).long()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """[B] DAPO's soft overlong penalty: 0 up to max_len - buffer tokens, then falling linearly to
    -penalty at max_len."""
    over = (lengths.to(torch.float32) - (max_len - buffer)).clamp_min(0.0)
    return -penalty * over / buffer


def tis_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, cap: float) -> dict:
    """Truncated importance sampling for rollouts sampled by another engine: 'tis_weight' [B, L] =
    min(pi_train_old / pi_engine, cap) on masked tokens (1 with cap = 0: no weighting), and the
    mismatch (mean and max |log-ratio|, share of tokens capped) as 0-dim tensors."""
    log_ratio = (old_logprobs - engine_logprobs) * mask
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=cap) if cap > 0 else torch.ones_like(ratio)
    m = mask.bool()
    return {
        "tis_weight": torch.where(m, weight, torch.zeros_like(weight)),
        "tis/log_ratio_abs_mean": masked_mean(log_ratio.abs(), mask),
        "tis/log_ratio_abs_max": torch.where(m, log_ratio.abs(), torch.zeros_like(log_ratio)).max(),
        "tis/capped_fraction": masked_mean(((ratio > cap) & (cap > 0)).to(log_ratio.dtype), mask),
    }


class RunningMoments:
    """Running mean and variance of scores (Chan et al.'s parallel update), for reward scaling."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def fused_adamw(params: list[torch.nn.Parameter], accelerator: Accelerator) -> dict:
    """`{"fused": True}` where torch's fused AdamW kernel applies (floating parameters on CPU or
    CUDA, no sharding wrapper), else `{}`. On SmolLM2-135M it makes the CPU step ~5x faster than
    the per-tensor loop (benchmarks/throughput.py --phases: "update: optimizer step")."""
    sharded = str(accelerator.distributed_type).split(".")[-1] in {"FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"}
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok and not sharded else {}


def enable_checkpointing(model) -> None:
    """Activation checkpointing on an HF model (and a PEFT model around one), non-reentrant: correct
    with a frozen base (LoRA), whose inputs need no gradient. transformers renamed the switch from
    gradient_checkpointing_* to activation_checkpointing_*; either is used."""
    if is_checkpointing(model):
        return
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", False) or getattr(model, "is_gradient_checkpointing", False))


class Learner:
    def __init__(self, policy: Policy, reference: torch.nn.Module, algorithm: Algorithm, cfg, accelerator: Accelerator,
                 parameters: list[torch.nn.Parameter] | None = None, fallback: torch.nn.Module | None = None):
        """`reference` must already be frozen (it may share modules with the policy, as CORY's
        shared-base mode does); `parameters` defaults to every trainable parameter of the policy.
        `fallback`: the frozen model that writes tokens the agent defers (asking for help); tokens
        mixed under a hard budget fall back on the reference."""
        if cfg.train.shared_prefix and accelerator.num_processes > 1:
            raise UsageError("train.shared_prefix runs on one process (its prefix pass runs outside the DDP/FSDP wrapper): "
                             "drop it when launching several")
        self.policy = policy
        self.fallback = fallback.to(accelerator.device).eval() if fallback is not None else None
        self.algorithm = algorithm
        self.cfg = cfg
        self.accelerator = accelerator
        self.reference = reference.to(accelerator.device).eval()
        params = parameters if parameters is not None else [p for p in policy.module.parameters() if p.requires_grad]
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(policy.model)
        fused = {} if is_sharded(policy.module) else fused_adamw(params, accelerator)
        optimizer = torch.optim.AdamW(params, lr=cfg.algo.lr, weight_decay=cfg.algo.weight_decay, **fused)
        if is_sharded(policy.module):
            # FSDP2 reduces the gradients itself (accelerate would wrap the module in DDP), and its
            # sharded optimizer state is checkpointed by cory.sharding, not by accelerate.
            self.module, self.optimizer = policy.module, optimizer
            gather_full(self.module)  # whole weights outside updates (see cory.sharding)
        else:
            check_engine(accelerator, cfg)
            self.module, self.optimizer = accelerator.prepare(policy.module, optimizer)
        self.controller = make_controller(cfg.kl)
        # Mixed precision over float32 weights: generation ran in float32, the update runs under
        # autocast, and the two log-probs of one token differ by half-precision rounding (~0.03 nats
        # in bf16 on SmolLM2-135M), enough to clip PPO's ratio at the first step. The old policy's
        # log-probs are then recomputed under autocast, as for another engine's samples.
        self.recompute_old = accelerator.mixed_precision in ("bf16", "fp16") and any(p.dtype == torch.float32 for p in params)
        self.temperature = cfg.generation.temperature or 1.0
        self.shared_prefix = cfg.train.shared_prefix
        self.score_moments = RunningMoments()
        self.skipped_in_a_row = 0
        penalty = cfg.kl.penalty
        self.kl_in_reward = algorithm.kl_in_reward if penalty == "auto" else penalty == "reward"

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rollout: Rollout) -> Rollout:
        """Adds reference log-probs, values (if the algorithm needs them), per-token KL and, with
        `kl.exact_accounting`, the exact per-token KL of the distribution each token was sampled from.

        The policy itself is only run here when values or whole distributions need it, or when
        generation's log-probs are not the trainer's (another engine, or mixed precision over
        float32 weights: then they are recomputed here); otherwise the behaviour log-probs come
        from generation. Entropy is measured in the update's first forward. Whole distributions are
        handled in row chunks, so memory stays bounded.
        """
        rollout = rollout.to(self.accelerator.device)
        if rollout.engine_logprobs is None and self.recompute_old:
            rollout.engine_logprobs = rollout.logprobs  # the sampling precision's log-probs
        estimator = self.cfg.kl.estimator
        whole = estimator == "full" or self.cfg.kl.exact_accounting
        pieces: dict[str, list[torch.Tensor]] = {}
        for rows in self._chunks(rollout, whole):
            for name, value in self._score_rows(rollout, rows, whole).items():
                pieces.setdefault(name, []).append(value)
        joined = {name: torch.cat(values) for name, values in pieces.items()}
        mask = rollout.response_mask
        if rollout.engine_logprobs is not None:
            # Another engine (or precision) sampled: the trainer's own log-probs are the old policy's,
            # and tokens are weighted by the truncated ratio pi_train_old / pi_engine.
            current = joined["current"]
            if rollout.control is not None:  # the token came from the mixture with the fallback
                current = mixture_logprobs(current, rollout.control.fallback_logprobs, rollout.control.mix_weight)
            rollout.logprobs = current * mask
            rollout.extras.update(tis_weights(rollout.logprobs, rollout.engine_logprobs.to(rollout.logprobs.dtype), mask, self.cfg.algo.tis_cap))
        rollout.ref_logprobs = joined["ref"]
        rollout.values = joined.get("values")
        for name in ("kl_exact", "kl_semi", "help_mass"):
            if name in joined:
                rollout.extras[name] = torch.where(mask.bool(), joined[name], 0.0)
        if estimator == "full":
            kl = joined["kl_exact"]
        else:
            kl = per_token_kl(estimator, rollout.logprobs, rollout.ref_logprobs)
        rollout.extras["kl"] = kl.float() * mask
        return rollout

    def _chunks(self, rollout: Rollout, whole: bool) -> list[torch.Tensor]:
        n = len(rollout)
        if not whole:
            return [torch.arange(n)]
        vocab = getattr(getattr(self.policy.model, "config", None), "vocab_size", None) or 1
        size = max(1, SCORE_CHUNK_ELEMENTS // max(1, rollout.response_ids.shape[1] * vocab))
        return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]

    def _score_rows(self, rollout: Rollout, rows: torch.Tensor, whole: bool) -> dict[str, torch.Tensor]:
        args = tuple(t[rows] for t in (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask))
        out: dict[str, torch.Tensor] = {}
        with self.accelerator.autocast():
            ref = sequence_logprobs(self.reference, *args, temperature=self.temperature, with_full_logprobs=whole,
                                    shared_prefix=self.shared_prefix)
            cur = None
            if self.algorithm.needs_values or whole or rollout.engine_logprobs is not None:
                cur = sequence_logprobs(self.module, *args, temperature=self.temperature, shared_prefix=self.shared_prefix,
                                        with_values=self.algorithm.needs_values, with_full_logprobs=whole)
        out["ref"] = ref.logprobs.float()
        if cur is not None:
            out["current"] = cur.logprobs
        if cur is not None and cur.values is not None:
            out["values"] = cur.values.float()
        if not whole:
            return out
        ref_full = ref.full_logprobs.float()
        sampled = cur.full_logprobs.float()
        control = rollout.control
        if control is not None:
            # The token was drawn from w q + (1 - w) f: f is the reference (hard budget) or the
            # trusted policy (asking for help).
            fallback = ref_full
            if not control.fallback_is_reference:
                if self.fallback is None:
                    raise ValueError("tokens written by a trusted model need the Learner's `fallback` model")
                with self.accelerator.autocast():
                    fallback = sequence_logprobs(self.fallback, *args, temperature=self.temperature, with_full_logprobs=True,
                                                 shared_prefix=self.shared_prefix).full_logprobs.float()
            sampled = mixture_logprobs(sampled, fallback, control.mix_weight[rows])
        out["kl_exact"] = kl_exact(sampled, ref_full)
        pessimistic_full = getattr(self.reference, "pessimistic_full", None)
        if pessimistic_full is not None:  # a pessimistic ensemble (cory.drift.ensemble)
            log_semi, help_mass = pessimistic_full(*args)
            out["kl_semi"] = kl_exact(sampled, log_semi)
            out["help_mass"] = help_mass
        return out

    # -- update --------------------------------------------------------------------------------
    def _minibatches(self, n: int, generator: torch.Generator | None):
        size = self.cfg.algo.minibatch_size or n
        micro = self.cfg.algo.micro_batch_size or size
        for _ in range(self.cfg.algo.epochs):
            order = torch.randperm(n, generator=generator) if size < n else torch.arange(n)
            for start in range(0, n, size):
                idx = order[start : start + size]
                yield idx, [idx[i : i + micro] for i in range(0, len(idx), micro)]

    def set_lr(self, iteration: int) -> float:
        warm = self.cfg.algo.warmup_iterations
        lr = self.cfg.algo.lr * (min(1.0, (iteration + 1) / warm) if warm else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def adjust_scores(self, rollout: Rollout) -> torch.Tensor:
        """[B] task scores after the missing-EOS and overlong penalties and optional running-std scaling."""
        a = self.cfg.algo
        scores = rollout.scores.float().clone()
        if a.missing_eos_penalty:
            scores = scores + a.missing_eos_penalty * (~rollout.finished).float()
        if a.overlong_buffer:
            scores = scores + overlong_penalty(rollout.response_mask.sum(-1), self.cfg.generation.max_new_tokens,
                                               a.overlong_buffer, a.overlong_penalty)
        if a.normalize_rewards:
            gathered = self.accelerator.gather(scores)
            self.score_moments.update(gathered)
            scores = scores / self.score_moments.std
        return scores

    def loss_mask(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """[B, Lr] the tokens that train: the response mask, less truncated responses
        (algo.overlong_filter) and groups whose scores are all equal (algo.dynamic_sampling)."""
        a = self.cfg.algo
        keep = torch.ones_like(rollout.finished)
        if a.overlong_filter:
            keep = keep & rollout.finished
        if a.dynamic_sampling:
            # A group trains if any of its episodes' total scores differs from the group's mean.
            totals = episode_totals(scores.double(), rollout.episode_ids)
            first = rollout.turn_index == 0
            spread = group_normalized(totals, rollout.group_ids, scale=False, members=first).abs() > 1e-9
            same_group = (rollout.group_ids[:, None] == rollout.group_ids[None, :]) & first[None, :]
            keep = keep & ((same_group.double() @ spread.double()) > 0)
        return rollout.response_mask * keep[:, None].to(rollout.response_mask.dtype)

    def update(self, rollout: Rollout, generator: torch.Generator | None = None) -> dict[str, float]:
        """Optimizer steps over the scored rollout; returns the mean of the objective's diagnostics."""
        self.module.train()
        a = self.cfg.algo
        sharded = is_sharded(self.module)
        if sharded:
            release_full(self.module)
        logs: dict[str, list[float]] = {}
        grad_norms = []
        skipped = steps = 0
        first_step = True
        kl_estimator = None if self.kl_in_reward else self.cfg.kl.estimator
        constant = float(a.loss_constant or self.cfg.generation.max_new_tokens)
        processes = self.accelerator.num_processes
        loss_mask = rollout.extras["loss_mask"]
        for minibatch, micro_batches in self._minibatches(len(rollout), generator):
            # The normaliser of the whole minibatch on every process: each micro-batch's loss is its
            # share of the minibatch's objective, whatever the micro-batch size or process count.
            counts = loss_counts(loss_mask[minibatch.to(loss_mask.device)])
            if processes > 1:
                counts = self.accelerator.reduce(counts.to(self.accelerator.device), "sum")
            sums: dict[str, float] = {}
            for k, idx in enumerate(micro_batches):
                mb = rollout.select(idx)
                last = k == len(micro_batches) - 1
                # Gradients are summed over micro-batches and only all-reduced across processes on
                # the last one (the all-reduce averages, hence the factor `processes`).
                ctx = self.accelerator.no_sync(self.module) if not last else contextlib.nullcontext()
                with ctx:
                    with self.accelerator.autocast():
                        out = sequence_logprobs(
                            self.module, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                            temperature=self.temperature, with_values=self.algorithm.needs_values, with_entropy=True,
                            shared_prefix=self.shared_prefix,
                        )
                        if mb.control is not None:  # train on the distribution actually sampled
                            out.logprobs = mixture_logprobs(out.logprobs, mb.control.fallback_logprobs,
                                                            mb.control.mix_weight) * mb.response_mask
                        weights = aggregate_weights(mb.extras["loss_mask"], a.loss_aggregation, counts, constant)
                        loss, info = objective(self.algorithm, a, out, mb, weights, self.controller.beta, kl_estimator)
                    if first_step:
                        # Before the first optimizer step the policy is the behaviour policy: its
                        # recomputed log-probs must match generation's (logprob_gap ~ 0).
                        mask = mb.response_mask
                        info["entropy"] = masked_mean(out.entropy.detach().float(), mask)
                        info["logprob_gap"] = masked_mean((out.logprobs.detach().float() - mb.logprobs).abs(), mask)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"{self.algorithm.name} loss is {loss.item()} (learning rate or rewards too large?)")
                    self.accelerator.backward(loss * processes)
                for name, value in info.items():
                    # loss/* are this micro-batch's share of the minibatch's value: summed; the rest averaged.
                    if name.startswith("loss/"):
                        sums[name] = sums.get(name, 0.0) + float(value)
                    else:
                        logs.setdefault(name, []).append(float(value))
            for name, value in sums.items():
                logs.setdefault(name, []).append(value)
            # The norm is taken even without clipping (max norm inf scales by exactly 1): a step on
            # non-finite gradients would make every weight NaN, so it is skipped and counted.
            max_norm = a.max_grad_norm if a.max_grad_norm > 0 else math.inf
            norm = self.accelerator.clip_grad_norm_(self.module.parameters(), max_norm)
            if norm is None:  # DeepSpeed clips inside its engine and may not report a norm
                self.optimizer.step()
                steps += 1
            elif math.isfinite(float(norm)):
                grad_norms.append(float(norm))
                self.optimizer.step()
                steps += 1
            else:
                skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            first_step = False
        if sharded:
            gather_full(self.module)
        out = {k: sum(v) / len(v) for k, v in logs.items()}
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["skipped_updates"] = skipped
        if skipped:
            logger.warning("skipped %d of %d optimizer steps: non-finite gradients", skipped, skipped + len(grad_norms))
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if not steps else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_ITERATIONS:
            raise NonFiniteLossError(f"gradients were non-finite in every optimizer step of {self.skipped_in_a_row} iterations "
                                     "in a row (learning rate or rewards too large?)")
        return out

    def step(self, rollout: Rollout, iteration: int = 0, generator: torch.Generator | None = None) -> tuple[Rollout, dict[str, float]]:
        """Score, shape rewards, compute advantages, update. Returns the scored rollout and metrics."""
        t0 = time.perf_counter()
        lr = self.set_lr(iteration)
        rollout = self.score(rollout)
        mask = rollout.response_mask
        kl = rollout.extras["kl"]
        beta = self.controller.beta
        scores = self.adjust_scores(rollout)
        token_rewards = shaped_rewards(scores, kl, mask, beta if self.kl_in_reward else 0.0)
        rollout.extras["token_rewards"] = token_rewards
        advantages, returns = ESTIMATORS[self.algorithm.estimator].fn(
            token_rewards, mask, rollout.values, rollout.episode_ids, rollout.turn_index, rollout.group_ids, self.cfg.algo)
        rollout.extras["advantages"] = advantages
        if returns is not None:
            rollout.extras["returns"] = returns
        rollout.extras["loss_mask"] = self.loss_mask(rollout, scores)
        metrics = self.update(rollout, generator)
        metrics["loss_token_fraction"] = (rollout.extras["loss_mask"].sum() / mask.sum().clamp_min(1)).item()
        for name in ("tis/log_ratio_abs_mean", "tis/log_ratio_abs_max", "tis/capped_fraction"):
            if name in rollout.extras:
                metrics[name] = float(rollout.extras[name])
        # The controllers hold the KL of whole episodes (all turns of one), not of single turns.
        episode_kl = episode_sums(masked_sum(kl, mask).float(), rollout.episode_ids)
        metrics.update(rollout_metrics(rollout))
        if rollout.values is not None and "returns" in rollout.extras:
            metrics["value/explained_variance"] = explained_variance(rollout.values, rollout.extras["returns"], mask)
        metrics.update({"beta": beta, "lr": lr, "time/update": time.perf_counter() - t0})
        self.controller.update(self.accelerator.reduce(episode_kl.mean().detach(), "mean").item(), len(episode_kl) * self.accelerator.num_processes)
        return rollout, metrics

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.score_moments.load_state_dict(state["score_moments"])


def check_engine(accelerator: Accelerator, cfg) -> None:
    """Refuses, in one line, what cory's update loop cannot do under DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise UsageError("DeepSpeed ZeRO-3 partitions the weights, which cory's sampler and evaluation need whole: use train.fsdp=true (FSDP2) or ZeRO-2")
    if cfg.algo.micro_batch_size and cfg.algo.micro_batch_size != cfg.algo.minibatch_size:
        raise UsageError("under DeepSpeed the engine steps after every backward pass: leave algo.micro_batch_size=0 (no accumulation)")


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Per-iteration diagnostics of a scored rollout (per-process values)."""
    mask = rollout.response_mask.float()
    kl = rollout.extras["kl"]
    lengths = mask.sum(-1)
    # Per episode: the sum over its turns (a single-turn task has one turn per episode).
    scores = episode_sums(rollout.scores.float(), rollout.episode_ids)
    seq_kl = episode_sums(masked_sum(kl, mask).float(), rollout.episode_ids)
    n_episodes = len(scores)
    out = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl_mean": seq_kl.mean().item(),
        "kl_max": seq_kl.max().item(),
        "kl_token_mean": masked_mean(kl, mask).item(),
        "response_length": lengths.mean().item(),
        "turns_per_episode": len(rollout) / n_episodes,
        "truncated_rate": (~rollout.finished).float().mean().item(),
    }
    out.update(episode_kl_metrics(rollout))
    control = rollout.control
    if control is not None and control.help is not None:
        out["help_rate"] = masked_mean(control.help.float(), mask).item()
    if "help_mass" in rollout.extras:
        out["help_mass_mean"] = masked_mean(rollout.extras["help_mass"], mask).item()
    if control is not None and control.fallback_is_reference:
        out["budget/mixed_token_rate"] = masked_mean((control.mix_weight < 1).float(), mask).item()
        out["budget/reference_token_rate"] = masked_mean((control.mix_weight < 1e-3).float(), mask).item()
    return out


EPISODE_KL_PERCENTILES = (50, 90, 99)


def episode_kl_metrics(rollout: Rollout) -> dict[str, float]:
    """Total KL per episode (summed over all of the agent's tokens in every turn) by the sampled
    estimators k1 and k3 and, when scored, exactly (and against the unnormalised pessimistic
    reference): mean, max and percentiles over the batch's episodes."""
    mask = rollout.response_mask.float()
    per_token = {"k1": kl_k1(rollout.logprobs, rollout.ref_logprobs), "k3": kl_k3(rollout.logprobs, rollout.ref_logprobs)}
    if "kl_exact" in rollout.extras:
        per_token["exact"] = rollout.extras["kl_exact"]
    if "kl_semi" in rollout.extras:
        per_token["semi"] = rollout.extras["kl_semi"]
    out = {}
    for name, kl in per_token.items():
        totals = episode_sums(masked_sum(kl.float(), mask), rollout.episode_ids)
        out[f"episode_kl/{name}_mean"] = totals.mean().item()
        out[f"episode_kl/{name}_max"] = totals.max().item()
        if name in ("exact", "semi"):
            for q in EPISODE_KL_PERCENTILES:
                out[f"episode_kl/{name}_p{q}"] = torch.quantile(totals, q / 100).item()
    return out


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    m = mask.bool()
    r, v = returns[m].float(), values[m].float()
    var_r = r.var(unbiased=False)
    return float("nan") if var_r <= 1e-12 else float(1 - (r - v).var(unbiased=False) / var_r)


def reduce_metrics(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over processes (max for *_max), the same dict on every rank."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device, dtype=torch.float64)
    gathered = accelerator.gather(values[None]).reshape(accelerator.num_processes, len(keys))
    out = {}
    for i, k in enumerate(keys):
        col = gathered[:, i]
        out[k] = float(col.max() if k.endswith("_max") else col.mean())
    return out
