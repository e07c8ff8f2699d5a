"""The Learner: one policy, its optimizer, an algorithm and a KL controller, on accelerate.

`step(rollout)` is the loop, in the order the data flows:

    score      reference log-probs, values, per-token KL, exact KL, importance weights,
               the teacher's per-token KL (distillation)                                 (cory.scoring)
    shape      adjusted scores, per-token rewards, the loss mask                        (cory.shaping)
    estimate   advantages and returns                                                   (cory.advantages)
    update     epochs of shuffled minibatches of the objective, accumulated over
               micro-batches with the whole minibatch's normaliser                      (cory.losses)

so micro-batching and data parallelism leave the gradient unchanged. Every algorithm plugs in here
unchanged, and CORY drives two Learners.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from cory.advantages import episode_sums
from cory.algorithms.base import Algorithm
from cory.drift.exact import kl_exact, mixture_logprobs
from cory.errors import RunError, UsageError
from cory.kl import make_controller, masked_mean, masked_sum, per_token_kl
from cory.losses import ImportanceWeights, aggregate_weights, importance_weights, loss_counts, objective
from cory.metrics.training import rollout_metrics
from cory.optim import enable_checkpointing, learning_rate, make_optimizer
from cory.policy import Policy, unwrap
from cory.rollout import Rollout, Targets, TokenScores
from cory.scoring import Scorer, sequence_layout
from cory.shaping import RunningMoments, adjust_scores, loss_mask, shaped_rewards
from cory.sharding import gather_full, is_sharded, release_full
from cory.trunk import trunk_states

SCORE_CHUNK_ELEMENTS = 2**26
"""Scoring with whole distributions runs over row chunks of at most this many [rows x tokens x
vocabulary] entries (256 MB of float32 per tensor)."""

DEFERRED_KL_ELEMENTS = 2**26
"""The exact KL waits for the update's first pass (which has the policy's whole distributions
anyway) when the reference's whole distributions of the rollout fit in this many entries."""

MAX_SKIPPED_ITERATIONS = 3
"""Training stops when every optimizer step of this many iterations in a row had non-finite gradients."""


@dataclass
class FirstPass:
    """What the update's first pass computed for scoring (None where it was not asked to)."""

    kl_exact: torch.Tensor | None = None
    """[B, Lr] the exact per-token KL (`Learner.exact_kl_waits`)."""
    old_logprobs: torch.Tensor | None = None
    """[B, Lr] the trainer's own log-probs of the tokens (`Learner.old_logprobs_wait`)."""
    weights: ImportanceWeights | None = None
    """Their importance weights against the engine's log-probs."""


class NonFiniteLossError(RunError):
    """The loss (or every step's gradients) became NaN or infinite; training stops rather than
    corrupting the weights."""


class Learner:
    def __init__(self, policy: Policy, reference: torch.nn.Module, algorithm: Algorithm, cfg, accelerator: Accelerator,
                 parameters: list[torch.nn.Parameter] | None = None, fallback: torch.nn.Module | None = None,
                 teacher: torch.nn.Module | None = None):
        """`reference` must already be frozen (it may share modules with the policy, as LoRA's base
        with adapters disabled does); `parameters` defaults to every trainable parameter of the
        policy. `fallback`: the frozen model that writes tokens the agent defers (asking for help);
        tokens mixed under a hard budget fall back on the reference. `teacher`: the frozen model
        whose reverse KL rewards every token (on-policy distillation, distill.*)."""
        if cfg.train.shared_prefix and accelerator.num_processes > 1:
            raise UsageError("train.shared_prefix runs on one process (its prefix pass runs outside the DDP/FSDP wrapper): "
                             "drop it when launching several")
        self.policy = policy
        self.algorithm = algorithm
        self.cfg = cfg
        self.accelerator = accelerator
        params = parameters if parameters is not None else [p for p in policy.module.parameters() if p.requires_grad]
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(policy.model)
        sharded = is_sharded(policy.module)
        optimizer = make_optimizer(params, cfg.algo.lr, cfg.algo.weight_decay, accelerator, sharded)
        if sharded:
            # FSDP2 reduces the gradients itself (accelerate would wrap the module in DDP), and its
            # sharded optimizer state is checkpointed by cory.sharding, not by accelerate.
            self.module, self.optimizer = policy.module, optimizer
            gather_full(self.module)  # whole weights outside updates (see cory.sharding)
        else:
            check_engine(accelerator, cfg)
            self.module, self.optimizer = accelerator.prepare(policy.module, optimizer)
        temperature = cfg.generation.temperature or 1.0
        self.scorer = Scorer(self.module, temperature, cfg.train.shared_prefix)
        self.reference = reference.to(accelerator.device).eval()
        self.fallback = fallback.to(accelerator.device).eval() if fallback is not None else None
        self.teacher = teacher.to(accelerator.device).eval() if teacher is not None else None
        self.teacher_exact = teacher is not None and cfg.distill.estimator == "full"
        self.controller = make_controller(cfg.kl)
        # Mixed precision over float32 weights: generation ran in float32, the update runs under
        # autocast, and the two log-probs of one token differ by half-precision rounding (~0.03 nats
        # in bf16 on SmolLM2-135M), enough to clip PPO's ratio at the first step. The old policy's
        # log-probs are then recomputed under autocast, as for another engine's samples.
        self.recompute_old = accelerator.mixed_precision in ("bf16", "fp16") and any(p.dtype == torch.float32 for p in params)
        self.kl_in_reward = algorithm.kl_in_rewards(cfg.kl.penalty)
        self.terms = algorithm.objective_terms(cfg.algo, cfg.kl.penalty, cfg.kl.estimator)
        if self.teacher_exact:  # the exact KL's own gradient is a loss term; its effect on later tokens is in the rewards
            self.terms = replace(self.terms, teacher_coef=cfg.distill.coef)
        self.score_moments = RunningMoments()
        self.skipped_in_a_row = 0
        self.last_skipped = 0
        """Optimizer steps of the latest iteration skipped for non-finite gradients."""

    # -- score -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rollout: Rollout, defer_exact_kl: bool = False,
              defer_old: bool = False) -> tuple[Rollout, ImportanceWeights | None]:
        """The rollout with its `TokenScores`: reference log-probs, values (if the algorithm needs
        them), per-token KL and, with `kl.exact_accounting`, the exact per-token KL of the
        distribution each token was sampled from; and the importance weights when another engine
        (or precision) sampled, whose log-probs are then replaced by the trainer's own.

        The policy itself is only run here when values or whole distributions need it, or when
        generation's log-probs are not the trainer's; otherwise the behaviour log-probs come from
        generation. Entropy is measured in the update's first forward. Whole distributions are
        handled in row chunks, so memory stays bounded. `defer_exact_kl` (see `exact_kl_waits`): the
        reference's whole distributions are kept (`TokenScores.ref_full_logprobs`) for the update's
        first pass to compute the exact KL, instead of a pass of the policy here. `defer_old` (see
        `old_logprobs_wait`): the trainer's own log-probs are left to the update's first pass too;
        until then the rollout's log-probs are the engine's, and its KL and weights are those of
        the engine's log-probs (nothing reads them before the update; `step` replaces them).
        """
        rollout = rollout.to(self.accelerator.device)
        depth = unwrap(self.module).trunk_depth
        if depth and rollout.trunk_hidden is None:  # another engine sampled: one pass of the frozen trunk
            ids, mask, positions = sequence_layout(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
            rollout = replace(rollout, trunk_hidden=trunk_states(self.policy.model, depth, ids, mask, positions))
        engine_logprobs = rollout.engine_logprobs
        if engine_logprobs is None and self.recompute_old:
            engine_logprobs = rollout.logprobs  # the sampling precision's log-probs
        estimator = self.cfg.kl.estimator
        whole = estimator == "full" or self.teacher_exact or (self.cfg.kl.exact_accounting and not defer_exact_kl)
        pieces: dict[str, list[torch.Tensor]] = {}
        for rows in self._chunks(rollout, whole or defer_exact_kl):
            recompute = engine_logprobs is not None and not defer_old
            for name, value in self._score_rows(rollout, rows, whole, recompute, defer_exact_kl).items():
                pieces.setdefault(name, []).append(value)
        joined = {name: torch.cat(values) for name, values in pieces.items()}
        mask = rollout.response_mask
        logprobs, weights = rollout.logprobs, None
        if engine_logprobs is not None and not defer_old:
            # Another engine, precision or weights version sampled: the trainer's own log-probs are the
            # old policy's, and tokens are weighted by algo.is_correction of pi_train_old / pi_behaviour.
            current = joined["current"]
            if rollout.control is not None:  # the token came from the mixture with the fallback
                current = mixture_logprobs(current, rollout.control.fallback_logprobs, rollout.control.mix_weight)
            logprobs = current * mask
            weights = self.importance(logprobs, engine_logprobs, mask)
        kl = joined["kl_exact"] if estimator == "full" else per_token_kl(estimator, logprobs, joined["ref"])
        teacher_kl = None
        if self.teacher is not None:  # exact, or k1 of the (possibly recomputed) log-probs the update starts from
            teacher_kl = joined["teacher_kl"] if self.teacher_exact else per_token_kl("k1", logprobs, joined["teacher"])

        def masked(name: str) -> torch.Tensor | None:
            return torch.where(mask.bool(), joined[name], 0.0) if name in joined else None

        scored = TokenScores(ref_logprobs=joined["ref"], kl=kl.float() * mask, values=joined.get("values"),
                             kl_exact=masked("kl_exact"), kl_semi=masked("kl_semi"), help_mass=masked("help_mass"),
                             teacher_kl=teacher_kl.float() * mask if teacher_kl is not None else None,
                             teacher_full_logprobs=joined.get("teacher_full"),
                             is_weight=weights.weight if weights is not None else None, ref_full_logprobs=joined.get("ref_full"))
        return replace(rollout, logprobs=logprobs, engine_logprobs=engine_logprobs, scored=scored), weights

    @torch.no_grad()
    def sampled_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """[B, Lr] the log-probs that sampling with the current weights records for the rollout's
        tokens (full precision, evaluation mode; the mixture with the fallback where a sampling
        control steered): what checks a behaviour policy's claimed log-probs."""
        rollout = rollout.to(self.accelerator.device)
        training = self.module.training
        self.module.eval()
        try:
            logprobs = self.scorer(rollout).logprobs.float()
        finally:
            self.module.train(training)
        if rollout.control is not None:
            logprobs = mixture_logprobs(logprobs, rollout.control.fallback_logprobs, rollout.control.mix_weight)
        return logprobs * rollout.response_mask

    def exact_kl_waits(self, rollout: Rollout) -> bool:
        """Whether the exact KL can be computed in the update's first pass, from the whole
        distributions that pass computes anyway, instead of in a pass of the policy in `score`:
        it is logged only (kl.estimator is not `full`), the tokens came from the policy alone (no
        sampling control), scoring runs the policy for nothing else (no values, no recomputed
        log-probs), the first pass sees every row before the first optimizer step (one minibatch
        per epoch) with the sampling policy (no adapter dropout), and the reference's whole
        distributions fit `DEFERRED_KL_ELEMENTS`."""
        kl = self.cfg.kl
        vocab = getattr(getattr(self.policy.model, "config", None), "vocab_size", None) or 1
        return (kl.exact_accounting and kl.estimator != "full" and not self.teacher_exact and self._first_pass_scores(rollout)
                and rollout.engine_logprobs is None and not self.recompute_old
                and getattr(self.reference, "pessimistic_full", None) is None
                and len(rollout) * rollout.response_ids.shape[1] * vocab <= DEFERRED_KL_ELEMENTS)

    def _first_pass_scores(self, rollout: Rollout) -> bool:
        """What `exact_kl_waits` and `old_logprobs_wait` both need: the update's first pass sees every
        row before the first optimizer step (one minibatch per epoch) with the weights scoring would
        use (no adapter dropout), on tokens from the policy alone (no sampling control), and scoring
        has no pass of the policy to run anyway (no values)."""
        episodes = len(torch.unique(rollout.episode_ids))
        return (self.cfg.algo.minibatch_size in (0, episodes) and not self.cfg.model.lora.dropout and rollout.control is None
                and not self.algorithm.needs_values)

    def importance(self, old: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> ImportanceWeights:
        """`algo.is_correction`'s weights of pi_train_old / pi_engine for [B, L] log-probs over `mask`."""
        a = self.cfg.algo
        return importance_weights(old, engine.to(old.dtype), mask, a.is_correction, a.is_cap, a.is_floor)

    def old_logprobs_wait(self, rollout: Rollout) -> bool:
        """Whether the trainer's own log-probs of another engine's (or precision's, or weights
        version's) tokens, PPO's old policy and the numerator of the importance ratio, can be taken
        from the update's first pass instead of a pass of the policy in `score`: that pass sees
        every row before the first optimizer step (one minibatch per epoch) with the weights and
        the precision scoring would use (no adapter dropout), and nothing before the update reads
        them: no KL in the rewards, no values, no whole distributions, no teacher, no sampling
        control. The first step's ratio is then exactly 1, where a separate pass gives 1 to float
        rounding."""
        kl = self.cfg.kl
        return ((rollout.engine_logprobs is not None or self.recompute_old) and kl.estimator != "full" and not kl.exact_accounting
                and not self.kl_in_reward and self.teacher is None and self._first_pass_scores(rollout))

    def _chunks(self, rollout: Rollout, whole: bool) -> list[torch.Tensor]:
        n = len(rollout)
        if not whole:
            return [torch.arange(n)]
        vocab = getattr(getattr(self.policy.model, "config", None), "vocab_size", None) or 1
        size = max(1, SCORE_CHUNK_ELEMENTS // max(1, rollout.response_ids.shape[1] * vocab))
        return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]

    def _score_rows(self, rollout: Rollout, rows: torch.Tensor, whole: bool, recompute: bool, keep_ref: bool) -> dict[str, torch.Tensor]:
        reference = self.scorer.of(self.reference)
        out: dict[str, torch.Tensor] = {}
        with self.accelerator.autocast():
            ref = reference(rollout, rows, with_full_logprobs=whole or keep_ref)
            cur = teacher = None
            if self.algorithm.needs_values or whole or recompute:
                cur = self.scorer(rollout, rows, with_values=self.algorithm.needs_values, with_full_logprobs=whole)
            if self.teacher is not None:  # the scorer's settings (temperature, shared prefix); no trunk of its own
                teacher = self.scorer.of(self.teacher)(rollout, rows, with_full_logprobs=self.teacher_exact)
        out["ref"] = ref.logprobs.float()
        if teacher is not None:
            out["teacher"] = teacher.logprobs.float()
        if keep_ref:
            out["ref_full"] = ref.full_logprobs.float()
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
                    fallback = self.scorer.of(self.fallback)(rollout, rows, with_full_logprobs=True).full_logprobs.float()
            sampled = mixture_logprobs(sampled, fallback, control.mix_weight[rows.to(control.mix_weight.device)])
        out["kl_exact"] = kl_exact(sampled, ref_full)
        if self.teacher_exact:
            out["teacher_full"] = teacher.full_logprobs.float()
            out["teacher_kl"] = kl_exact(sampled, out["teacher_full"])
        pessimistic_full = getattr(self.reference, "pessimistic_full", None)
        if pessimistic_full is not None:  # a pessimistic ensemble (cory.drift.ensemble)
            args = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
            log_semi, help_mass = pessimistic_full(*(t[rows.to(t.device)] for t in args))
            out["kl_semi"] = kl_exact(sampled, log_semi)
            out["help_mass"] = help_mass
        return out

    # -- shape -----------------------------------------------------------------------------------
    def adjust_scores(self, rollout: Rollout) -> torch.Tensor:
        """[B] task scores after the missing-EOS and overlong penalties and optional running-std scaling."""
        a = self.cfg.algo
        scores = adjust_scores(rollout.scores, rollout.finished, rollout.response_mask.sum(-1),
                               missing_eos_penalty=a.missing_eos_penalty, overlong_buffer=a.overlong_buffer,
                               overlong_penalty_at_max=a.overlong_penalty, max_new_tokens=self.cfg.generation.max_new_tokens)
        if a.normalize_rewards:
            self.score_moments.update(self.accelerator.gather(scores))
            scores = scores / self.score_moments.std
        return scores

    def targets(self, rollout: Rollout) -> Targets:
        """Shaped per-token rewards, the algorithm's advantages and returns, and the loss mask."""
        a, scored, mask = self.cfg.algo, rollout.scored, rollout.response_mask
        scores = self.adjust_scores(rollout)
        d = self.cfg.distill
        rewards = shaped_rewards(scores, scored.kl, mask, self.controller.beta if self.kl_in_reward else 0.0,
                                 scored.teacher_kl, d.coef, d.task_coef)
        advantages, returns = self.algorithm.estimate(rewards, mask, scored.values, rollout.episode_ids, rollout.turn_index,
                                                      rollout.group_ids, a)
        keep = loss_mask(mask, rollout.finished, scores, rollout.episode_ids, rollout.turn_index, rollout.group_ids,
                         overlong_filter=a.overlong_filter, dynamic_sampling=a.dynamic_sampling)
        return Targets(rewards=rewards, advantages=advantages, returns=returns, loss_mask=keep)

    # -- update ----------------------------------------------------------------------------------
    def _minibatches(self, rollout: Rollout, generator: torch.Generator | None):
        """(rows of the minibatch, its micro-batches' rows) for every optimizer step: `epochs` passes
        over the episodes in a fresh order each, `minibatch_size` episodes per step (every turn of
        an episode in the same minibatch; a single-turn row is an episode)."""
        a = self.cfg.algo
        episodes = rollout.episode_ids.cpu()
        ids, first = torch.unique(episodes, return_inverse=True)
        rows_of = [torch.nonzero(first == e).flatten() for e in range(len(ids))]
        order_of = torch.argsort(torch.stack([r[0] for r in rows_of]))  # episodes in order of their first rows
        rows_of = [rows_of[i] for i in order_of.tolist()]
        n = len(rows_of)
        size = a.minibatch_size or n
        for _ in range(a.epochs):
            order = torch.randperm(n, generator=generator) if size < n else torch.arange(n)
            for start in range(0, n, size):
                idx = torch.cat([rows_of[e] for e in order[start : start + size].tolist()])
                micro = a.micro_batch_size or len(idx)
                yield idx, [idx[i : i + micro] for i in range(0, len(idx), micro)]

    def _teacher_kl(self, out, mb: Rollout) -> torch.Tensor | None:
        """[B, Lr] the exact KL from this forward's distributions to the teacher's (distill.estimator=full)."""
        if not self.teacher_exact:
            return None
        teacher = mb.scored.teacher_full_logprobs
        return kl_exact(out.full_logprobs.float(), teacher.to(out.full_logprobs.device))

    def set_lr(self, iteration: int) -> float:
        lr = learning_rate(iteration, self.cfg.algo.lr, self.cfg.algo.warmup_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def update(self, rollout: Rollout, generator: torch.Generator | None = None, reference_full: torch.Tensor | None = None,
               old_from_first_pass: bool = False) -> tuple[dict[str, float], FirstPass]:
        """Optimizer steps over the rollout with its targets; returns the mean of the objective's
        diagnostics, and what the first pass computed for scoring: with `reference_full` (the
        reference's whole distributions [B, Lr, V], when the exact KL waits for this pass) the exact
        per-token KL, with `old_from_first_pass` (when the old log-probs wait for it, the rollout's
        log-probs being the engine's) the trainer's own log-probs, which are then the old policy of
        every step and the numerator of the importance weights."""
        self.module.train()
        a = self.cfg.algo
        sharded = is_sharded(self.module)
        if sharded:
            release_full(self.module)
        logs: dict[str, list[float]] = {}
        grad_norms = []
        skipped = steps = 0
        first_step = True
        beta = self.controller.beta
        constant = float(a.loss_constant or self.cfg.generation.max_new_tokens)
        processes = self.accelerator.num_processes
        full_mask = rollout.targets.loss_mask
        exact = torch.zeros_like(rollout.scored.kl) if reference_full is not None else None
        own = torch.zeros_like(rollout.logprobs) if old_from_first_pass else None
        own_weights = None
        for minibatch, micro_batches in self._minibatches(rollout, generator):
            # The normaliser of the whole minibatch on every process: each micro-batch's loss is its
            # share of the minibatch's objective, whatever the micro-batch size or process count.
            counts = loss_counts(full_mask[minibatch.to(full_mask.device)])
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
                        out = self.scorer(mb, with_values=self.algorithm.needs_values, with_entropy=True,
                                          with_full_logprobs=first_step and exact is not None or self.teacher_exact)
                        logprobs = out.logprobs
                        if mb.control is not None:  # train on the distribution actually sampled
                            logprobs = mixture_logprobs(logprobs, mb.control.fallback_logprobs, mb.control.mix_weight) * mb.response_mask
                        mask = mb.targets.loss_mask
                        weights = aggregate_weights(mask, a.loss_aggregation, counts, constant)
                        old, is_weight = mb.logprobs, mb.scored.is_weight
                        if own is not None and first_step:  # this pass is the old policy's
                            old = logprobs.detach() * mb.response_mask
                            own[idx.to(own.device)] = old.to(own.dtype)
                            is_weight = self.importance(old, mb.engine_logprobs, mb.response_mask).weight
                        elif own is not None:
                            old, is_weight = own[idx.to(own.device)], own_weights.weight[idx.to(own.device)]
                        loss, info = objective(self.terms, logprobs, out.entropy, out.values, old_logprobs=old,
                                               ref_logprobs=mb.scored.ref_logprobs, old_values=mb.scored.values,
                                               advantages=mb.targets.advantages, returns=mb.targets.returns,
                                               is_weight=is_weight, mask=mask, weights=weights, beta=beta,
                                               teacher_kl=self._teacher_kl(out, mb))
                    if first_step:
                        # Before the first optimizer step the policy is the behaviour policy: its
                        # recomputed log-probs must match generation's (logprob_gap ~ 0), and the
                        # exact KL of each token's distribution can be taken here.
                        info["entropy"] = masked_mean(out.entropy.detach().float(), mb.response_mask)
                        info["logprob_gap"] = masked_mean((logprobs.detach().float() - old.float()).abs(), mb.response_mask)
                        if exact is not None:
                            kl = kl_exact(out.full_logprobs.detach().float(), reference_full[idx.to(reference_full.device)])
                            exact[idx.to(exact.device)] = torch.where(mb.response_mask.bool(), kl, 0.0)
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
            if own is not None and first_step:  # every row was in the first minibatch
                own_weights = self.importance(own, rollout.engine_logprobs, rollout.response_mask)
            first_step = False
        if sharded:
            gather_full(self.module)
        metrics = {k: sum(v) / len(v) for k, v in logs.items()}
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["skipped_updates"] = skipped
        self.last_skipped = skipped
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if not steps else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_ITERATIONS:
            raise NonFiniteLossError(f"gradients were non-finite in every optimizer step of {self.skipped_in_a_row} iterations "
                                     "in a row (learning rate or rewards too large?)")
        return metrics, FirstPass(kl_exact=exact, old_logprobs=own, weights=own_weights)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self, rollout: Rollout, iteration: int = 0, generator: torch.Generator | None = None) -> tuple[Rollout, dict[str, float]]:
        """Score, shape, estimate, update. Returns the rollout with its scores and targets, and metrics."""
        t0 = time.perf_counter()
        lr = self.set_lr(iteration)
        beta = self.controller.beta
        defer_old = self.old_logprobs_wait(rollout)
        rollout, weights = self.score(rollout, defer_exact_kl=self.exact_kl_waits(rollout), defer_old=defer_old)
        reference_full = rollout.scored.ref_full_logprobs
        rollout = replace(rollout, scored=replace(rollout.scored, ref_full_logprobs=None), targets=self.targets(rollout))
        metrics, first = self.update(rollout, generator, reference_full, old_from_first_pass=defer_old)
        rollout = replace(rollout, scored=replace(rollout.scored, teacher_full_logprobs=None))
        if first.kl_exact is not None:  # computed by the update's first pass
            rollout = replace(rollout, scored=replace(rollout.scored, kl_exact=first.kl_exact))
        if first.old_logprobs is not None:  # so were the trainer's own log-probs: the KL and weights follow them
            weights = first.weights
            kl = per_token_kl(self.cfg.kl.estimator, first.old_logprobs, rollout.scored.ref_logprobs).float() * rollout.response_mask
            rollout = replace(rollout, logprobs=first.old_logprobs, scored=replace(rollout.scored, kl=kl, is_weight=weights.weight))
        if weights is not None:
            metrics.update({"is/log_ratio_abs_mean": float(weights.log_ratio_abs_mean),
                            "is/log_ratio_abs_max": float(weights.log_ratio_abs_max),
                            weights.metric: float(weights.corrected_fraction)})
        metrics.update(rollout_metrics(rollout))
        metrics.update({"beta": beta, "lr": lr, "time/update": time.perf_counter() - t0})
        # The controllers hold the KL of whole episodes (all turns of one), not of single turns.
        episode_kl = episode_sums(masked_sum(rollout.scored.kl, rollout.response_mask).float(), rollout.episode_ids)
        self.controller.update(self.accelerator.reduce(episode_kl.mean().detach(), "mean").item(),
                               len(episode_kl) * self.accelerator.num_processes)
        return rollout, metrics

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.score_moments.load_state_dict(state["score_moments"])


def check_engine(accelerator: Accelerator, cfg) -> None:
    """Refuses, in one line, what cory's update loop cannot do under DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise UsageError("DeepSpeed ZeRO-3 partitions the weights, which cory's sampler and evaluation need whole: use train.fsdp=true (FSDP2) or ZeRO-2")
    if cfg.algo.micro_batch_size and cfg.algo.micro_batch_size != cfg.algo.minibatch_size:
        raise UsageError("under DeepSpeed the engine steps after every backward pass: leave algo.micro_batch_size=0 (no accumulation)")
