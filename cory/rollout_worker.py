"""Asynchronous rollouts (`train.max_staleness` = k > 0): a worker process samples the next batches
while the trainer updates, on weights at most k versions old.

Versions. The weights after i iterations are version i, and iteration i trains batch i. The
trainer publishes version i at the start of the run (or of a resumed run) and after every
iteration: the trained parameters (all of them, or only the LoRA adapters, the top layers and the
value head: whatever the optimizers hold) flattened into one float32 tensor in shared memory, sent
through a `torch.multiprocessing` queue (no file of the run directory is ever read back, and no
pickle crosses between runs). Before sampling batch i the worker takes the newest version it has
been sent, waiting for one >= i - k, so no batch is more than k versions older than the weights
that train on it: with k = 1, batch i + 1 is sampled while batch i trains.

Proof that the weights reached the sampler. Each batch carries its version (`Rollout.policy_version`,
per row) and a checksum (sum and sum of squares in float64) of the parameters the worker loaded. The
trainer compares it with the checksum of the version it sent, then recomputes the behaviour
log-probs of a few rows of each turn (`VERIFY_ROWS`) with that version's weights (swapped into its model for
the pass when the batch is stale, then restored bit for bit) and compares them with the worker's
(`async/behaviour_gap`, logged every iteration). Either check failing stops the run: a worker that
dropped an update, or loaded it somewhere its sampler does not read, cannot go unnoticed. A batch
whose rows are more than k versions old stops the run too.

Engines. The worker samples with the run's backend: the native loop reads the modules it loads the
weights into; a vLLM engine (generation.backend=vllm, its own engine in the worker process) is told
after each load (`WorkerSide.loaded`) and reloads the weights, or syncs the LoRA adapters, in place
before its next batch, as the synchronous loop's engine does after every step. The log-prob check
above then covers the engine: an engine still serving the old weights fails it.

Behaviour log-probs. The worker's log-probs become `Rollout.engine_logprobs`: the Learner computes
the trainer's own (the old policy of PPO's ratio; in the update's first forward where nothing reads
them earlier, `Learner.old_logprobs_wait`) and weights each token by `algo.is_correction` of
their ratio, logging the mismatch (`is/log_ratio_abs_mean`) every iteration.

Failures. The trainer waits for each batch at most `train.worker_timeout`, and looks at the worker
every second. A worker that dies, raises, or sends nothing in time stops the run with one line
(RunError, exit 1); the checkpoints already written are untouched. The worker waits for new weights
as long as the trainer lives (an evaluation or a checkpoint may take longer than the timeout), and
exits when the trainer is gone: its output queue never holds up its exit (`cancel_join_thread`).
It samples batches `first_index` .. `train.iterations` - 1 and no more, then waits to be closed.

Random streams. A fresh worker's generators come from a stream of their own, derived from
`train.seed` and the first batch index (`worker_generators`), not from a copy of the trainer's (whose
generator shuffles minibatches): the two processes never replay each other's random numbers.

Resume. The worker's generators (prompt draws, token sampling) travel with each batch; the
checkpoint after iteration i keeps the ones that follow batch i - 1 (`RunState.sampler`). A resumed
run starts a fresh worker from them and from version i: batch i draws the same prompts as in the
uninterrupted run, but the batches that were in flight when it stopped are sampled again with the
checkpoint's weights (staleness 0), so the tokens, and what follows, may differ. Iterations,
versions, weights, optimizer and learner state resume exactly; no batch index is skipped or trained
twice. `train.max_staleness` cannot change on --resume (`cory.run.RESUMABLE_KEYS`); forced to 0, the
trainer continues the worker's generators itself (`Run._start`).
"""

from __future__ import annotations

import math
import os
import queue
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.multiprocessing as mp

from cory.errors import RunError
from cory.rollout import Rollout
from cory.run import RunState

POLL_SECONDS = 1.0
"""How often a waiting trainer looks whether the worker is still alive (and a waiting worker whether
the trainer is)."""

WORKER_STREAM = 0xC0A5
"""The spawn key that sets the worker's random stream apart from the trainer's (`worker_generators`)."""

VERIFY_ROWS = 2
"""Rows of each turn index of a batch whose behaviour log-probs the trainer recomputes with the batch's
weights version (every turn, so that both agents of CORY are checked)."""

VERIFY_ATOL = 1e-3
"""The largest gap (nats) between those and the worker's log-probs: the same weights give float
rounding (~1e-6); another version gives the drift of an optimizer step or more."""

CHECKSUM_RTOL = 1e-9
"""Relative tolerance of the weight checksum (float64 sums of the same values in another order
differ by ~1e-15; one optimizer step moves them by far more)."""


def _nothing() -> None:
    """A sampler that reads the modules' weights directly needs no word of new ones."""


@dataclass
class WorkerSide:
    """What a worker process builds from the config: the modules whose parameters it receives by
    name (`agent/parameter`), `collect(index, rng, generator)`, which samples batch `index`, and
    `loaded()`, called after new weights were loaded into the modules (a vLLM engine's backends mark
    themselves stale, so that the engine reloads them in place before it samples again)."""

    modules: dict[str, torch.nn.Module]
    collect: Callable[[int, np.random.Generator, torch.Generator], Rollout]
    loaded: Callable[[], None] = _nothing


@dataclass
class Batch:
    """What the worker sends for one batch."""

    index: int
    """The iteration that trains it."""
    version: int
    """The weights version that sampled it."""
    checksum: tuple[float, float]
    """Sum and sum of squares (float64) of the parameters the sampler held."""
    rollout: Rollout
    sampler_state: dict
    """The worker's generators after this batch (`RunState.state_dict`)."""
    seconds: float
    """Time the worker took to sample it."""
    metrics: dict | None = None
    """The trainer's checks of it (`AsyncRollouts.take`): `async/wait`, `async/behaviour_gap`."""


def named_parameters(modules: dict[str, torch.nn.Module], names: list[str]) -> list[torch.nn.Parameter]:
    """The parameters `agent/parameter` of `modules`, in the order of `names`."""
    found = {f"{agent}/{n}": p for agent, m in modules.items() for n, p in m.named_parameters()}
    missing = [n for n in names if n not in found]
    if missing:
        raise RunError(f"the rollout worker's model has no parameter {missing[0]} (of {len(missing)} missing)")
    return [found[n] for n in names]


def flatten(params: list[torch.nn.Parameter], shared: bool = False) -> torch.Tensor:
    """One float32 vector of the parameters' values (in shared memory when `shared`)."""
    out = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
    if shared:
        out.share_memory_()
    torch.cat([p.detach().reshape(-1).float().cpu() for p in params], out=out)
    return out


def checksum(flat: torch.Tensor) -> tuple[float, float]:
    x = flat.double()
    return float(x.sum()), float((x * x).sum())


def same_checksum(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(math.isclose(x, y, rel_tol=CHECKSUM_RTOL, abs_tol=1e-12) for x, y in zip(a, b))


@torch.no_grad()
def load_flat(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view(p.shape).to(p.dtype))
        offset += p.numel()


class _Stop(Exception):
    """The worker is done: the trainer closed it, or is gone."""


def _parent_alive(ppid: int) -> bool:
    parent = mp.parent_process()
    if parent is not None:
        return parent.is_alive()
    return os.getppid() == ppid  # re-parented: the trainer is gone


def _receive(weights: mp.Queue, wait: bool, ppid: int):
    """The next message from the trainer; with `wait`, for as long as the trainer lives (no timeout:
    an evaluation or a checkpoint may keep it busy), else None when none is waiting. Raises _Stop when
    the trainer closes the worker or is gone."""
    while True:
        try:
            message = weights.get(timeout=POLL_SECONDS) if wait else weights.get_nowait()
        except queue.Empty:
            if not wait:
                return None
            if not _parent_alive(ppid):
                raise _Stop from None  # nobody to sample for
            continue
        if message is None:
            raise _Stop
        return message


def serve(factory: Callable, cfg, names: list[str], first_index: int, last_index: int, sampler_state: dict,
          max_staleness: int, threads: int, weights: mp.Queue, batches: mp.Queue) -> None:
    """The worker process: builds its side with `factory(cfg)`, samples batches `first_index` ..
    `last_index` - 1, then waits until the trainer closes it (or is gone), so that everything it sent
    can be read. Its exit never waits for the trainer to read the queue (a trainer killed with an
    unread batch in the pipe would block it forever)."""
    batches.cancel_join_thread()
    ppid = os.getppid()
    try:
        try:
            torch.set_num_threads(threads)
            side = factory(cfg)
            params = named_parameters(side.modules, names)
            state = RunState.fresh(0, 0)
            state.load_state_dict({"iteration": first_index, **sampler_state})
            version = -1
            for index in range(first_index, last_index):
                arrived = False
                while True:  # the newest weights sent; wait for one recent enough for this batch
                    message = _receive(weights, version < index - max_staleness, ppid)
                    if message is None:
                        break
                    version, flat = message
                    load_flat(params, flat)
                    arrived = True
                    del flat
                if arrived:
                    side.loaded()
                t0 = time.perf_counter()
                rollout = side.collect(index, state.rng, state.generator)
                rollout = replace(rollout, policy_version=torch.full((len(rollout),), version, dtype=torch.long))
                held = checksum(flatten(params))
                sampled = state.state_dict()
                sampled.pop("iteration")
                batches.put(("batch", Batch(index, version, held, rollout, sampled, time.perf_counter() - t0)))
        except _Stop:
            return
        except Exception as e:  # noqa: BLE001  (any failure reaches the trainer as one line)
            line = (str(e).splitlines() or [type(e).__name__])[0][:300]
            where = traceback.extract_tb(e.__traceback__)[-1]
            batches.put(("error", f"the rollout worker failed: {type(e).__name__}: {line} ({where.filename}:{where.lineno})"))
        while True:  # everything is sent (versions that still arrive are not needed)
            _receive(weights, True, ppid)
    except (_Stop, KeyboardInterrupt):
        return


def worker_generators(seed: int, first_index: int = 0) -> dict:
    """The generators (`RunState.state_dict`'s `rng` and `generator`) of a worker that starts at batch
    `first_index` with no saved ones: a stream of their own, spawned from `train.seed`, never the
    trainer's (`RunState.fresh`), whose generator also shuffles minibatches."""
    sequence = np.random.SeedSequence(seed, spawn_key=(WORKER_STREAM, first_index))
    generator = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return {"rng": np.random.default_rng(sequence).bit_generator.state, "generator": generator.get_state().tolist()}


def start_worker(factory: Callable, cfg, state: RunState, modules: dict[str, torch.nn.Module], learners: dict,
                 threads: int) -> "AsyncRollouts | None":
    """The rollout worker of a run whose state is `state` (None with train.max_staleness = 0, or when
    nothing is left to train): it receives the parameters that the `learners`' optimizers hold, by the
    agent names of `modules`, and continues the generators of `state.sampler` (a fresh worker: its own
    stream, `worker_generators`)."""
    if not cfg.train.max_staleness or state.iteration >= cfg.train.iterations:
        return None
    trained = {name: [p for group in learners[name].optimizer.param_groups for p in group["params"]] for name in modules}
    sampler = state.sampler or worker_generators(cfg.train.seed, state.iteration)
    return AsyncRollouts(factory, cfg, modules, trained, state.iteration, sampler, threads)


class AsyncRollouts:
    """The trainer's side of the worker: starts it, publishes weights versions, and hands over
    batches after checking their version and checksum."""

    def __init__(self, factory: Callable, cfg, modules: dict[str, torch.nn.Module], parameters: dict[str, list],
                 first_index: int, sampler_state: dict, threads: int):
        """`modules` by agent name and the `parameters` of each that train (what is sent);
        `factory` (a module-level function, run in the worker) builds the worker's `WorkerSide`."""
        t = cfg.train
        self.max_staleness, self.timeout, self.iterations = t.max_staleness, t.worker_timeout, t.iterations
        by_param = {id(p): f"{agent}/{n}" for agent, m in modules.items() for n, p in m.named_parameters()}
        self.names = [by_param[id(p)] for agent in modules for p in parameters[agent]]
        self.params = named_parameters(modules, self.names)
        self.sent: dict[int, tuple[float, float]] = {}
        self.flats: dict[int, torch.Tensor] = {}
        """The weights of the versions a batch may still come from (the last k + 1)."""
        self.version = first_index
        self.received = first_index - 1
        """The last batch index the worker sent."""
        ctx = mp.get_context("spawn")
        self.weights, self.batches = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=serve, name="cory-rollout-worker", daemon=True,
                                   args=(factory, cfg, self.names, first_index, t.iterations, sampler_state, t.max_staleness,
                                         threads, self.weights, self.batches))
        self.exitcode: int | None = None
        """The worker's exit code once closed (0: it stopped when told)."""
        self.process.start()
        self.publish(first_index)

    def publish(self, version: int) -> float:
        """Sends the trained parameters as `version`; returns the seconds it took."""
        t0 = time.perf_counter()
        flat = flatten(self.params, shared=True)
        self.sent[version], self.flats[version], self.version = checksum(flat), flat, version
        for old in [v for v in self.sent if v < version - self.max_staleness]:
            del self.sent[old], self.flats[old]
        self.weights.put((version, flat))
        return time.perf_counter() - t0

    def take(self, index: int, logprobs_of: Callable[[Rollout], torch.Tensor]) -> Batch:
        """Batch `index` to train on, checked (`next`, then `verify` with `logprobs_of`); its
        `metrics` hold the time the trainer waited for it and the measured behaviour gap. After it
        trained, `trained` hands the new weights to the worker."""
        t0 = time.perf_counter()
        batch = self.next(index)
        waited = time.perf_counter() - t0
        batch.metrics = {"async/wait": waited, "async/behaviour_gap": self.verify(batch, logprobs_of)}
        return batch

    def next(self, index: int) -> Batch:
        """Batch `index`, checked: RunError (one line) if the worker died, failed, sent nothing
        within the timeout, or sent samples too stale or from weights it was not sent."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                kind, payload = self.batches.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RunError(self._died(index)) from None
                if time.monotonic() > deadline:
                    raise RunError(f"the rollout worker sent no batch {index} within train.worker_timeout={self.timeout:g} s; "
                                   "the last checkpoint is kept: continue with --resume") from None
            except Exception as e:  # noqa: BLE001  (a batch's tensors are fetched from the worker as it is read)
                self.process.join(POLL_SECONDS)  # a worker killed after it sent the batch: its tensors are gone with it
                if not self.process.is_alive():
                    raise RunError(self._died(index)) from None
                line = (str(e).splitlines() or [type(e).__name__])[0][:200]
                raise RunError(f"batch {index} from the rollout worker cannot be read ({type(e).__name__}: {line}); "
                               "the last checkpoint is kept: continue with --resume") from None
        if kind == "error":
            raise RunError(f"{payload}; the last checkpoint is kept")
        batch: Batch = payload
        self.received = batch.index
        if batch.index != index:
            raise RunError(f"the rollout worker sent batch {batch.index} where batch {index} was due")
        oldest = int(batch.rollout.policy_version.min())
        if index - oldest > self.max_staleness or batch.version not in self.sent:
            raise RunError(f"the rollout worker sampled batch {index} with weights version {oldest}, more than "
                           f"train.max_staleness={self.max_staleness} versions old")
        if not same_checksum(batch.checksum, self.sent[batch.version]):
            raise RunError(f"the rollout worker's sampler does not hold the weights of version {batch.version} it reports "
                           "(checksum mismatch): the weights did not reach it")
        batch.rollout = replace(batch.rollout, engine_logprobs=batch.rollout.logprobs)
        return batch

    def _died(self, index: int) -> str:
        return (f"the rollout worker died (exit code {self.process.exitcode}) before sending batch {index}; "
                "the last checkpoint is kept: continue with --resume")

    def trained(self, batch: Batch, state: RunState) -> dict[str, float]:
        """After `batch` (from `take`) trained (state.iteration counts it): the worker's generators go
        into the run state (for the checkpoint), the new weights to the worker (unless it was the
        last iteration); returns the iteration's async metrics (`take`'s checks and the versions)."""
        state.sampler = batch.sampler_state
        published = self.publish(state.iteration) if state.iteration < self.iterations else 0.0
        oldest = int(batch.rollout.policy_version.min())
        return {**(batch.metrics or {}), "async/version_min": oldest, "async/version_max": int(batch.rollout.policy_version.max()),
                "async/staleness_max": batch.index - oldest, "async/publish": published}

    def verify(self, batch: Batch, logprobs_of: Callable[[Rollout], torch.Tensor]) -> float:
        """The largest gap (nats) between the worker's log-probs of a few rows of `batch` and
        `logprobs_of` those rows (the trainer's model, `Learner.sampled_logprobs`) with the weights
        of the batch's version; RunError above `VERIFY_ATOL`. The trainer's weights are those of
        `self.version` again afterwards, bit for bit."""
        turns = batch.rollout.turn_index.cpu()  # the first rows of every turn index: each agent of CORY is checked
        rows = batch.rollout.select(torch.cat([(turns == t).nonzero()[:VERIFY_ROWS, 0] for t in turns.unique()])).compact()
        stale = batch.version != self.version
        if stale:
            load_flat(self.params, self.flats[batch.version])
        try:
            ours = logprobs_of(rows)
        finally:
            if stale:
                load_flat(self.params, self.flats[self.version])
        theirs = rows.logprobs.to(ours.device)
        gap = float(torch.where(rows.response_mask.to(ours.device).bool(), (ours - theirs).abs(), 0.0).max()) if ours.numel() else 0.0
        if not gap <= VERIFY_ATOL:
            raise RunError(f"the rollout worker's log-probs are not those of weights version {batch.version} (gap {gap:.3g} nats): "
                           "the weights did not reach its sampler")
        return gap

    def close(self) -> None:
        """Stops the worker (it holds nothing to save: batches in flight are dropped). A worker that
        sent its last batch is idle and exits when told; one that is still sampling is terminated
        after a second."""
        if self.process is None:
            return
        try:
            self.weights.put(None)
        except (OSError, ValueError):
            pass
        self.process.join(min(self.timeout, 30.0) if self.received >= self.iterations - 1 else POLL_SECONDS)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():  # a stopped process takes no SIGTERM
            self.process.kill()
            self.process.join(5)
        self.exitcode = self.process.exitcode
        for q in (self.weights, self.batches):
            q.cancel_join_thread()
            q.close()
        self.process = None
