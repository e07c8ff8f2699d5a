"""Broken rollout workers for tests/test_async.py: module-level, so that the worker process (which
imports what it runs by name) finds them."""

import copy
import os
import time
from pathlib import Path

import torch

from cory.rollout import Rollout
from cory.rollout_worker import AsyncRollouts, WorkerSide, worker_generators
from cory.train import rollout_side

SAMPLED_LOG = "CORY_TEST_SAMPLED_LOG"
"""Environment variable (inherited by the worker): the file where the recording sides append the
index of every batch they start to sample, one a line."""


def _record(index: int) -> None:
    with open(os.environ[SAMPLED_LOG], "a") as fh:
        fh.write(f"{index}\n")


def sampled_indices(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def side_serving_old_weights(cfg) -> WorkerSide:
    """Receives every version, but loads it into a copy of the model: the Sampler keeps the first weights."""
    side = rollout_side(cfg)
    return WorkerSide({name: copy.deepcopy(module) for name, module in side.modules.items()}, side.collect)


def side_recording_batches(cfg) -> WorkerSide:
    """The single-agent worker, recording each batch index it samples (`SAMPLED_LOG`)."""
    side = rollout_side(cfg)

    def collect(index, rng, generator):
        _record(index)
        return side.collect(index, rng, generator)

    return WorkerSide(side.modules, collect)


def side_sending_big_batches(cfg) -> WorkerSide:
    """A worker whose batches are far larger than a pipe's buffer (4 MB of prompt text each): one
    unread batch fills the queue's pipe."""
    module = torch.nn.Linear(2, 2)

    def collect(index, rng, generator):
        _record(index)
        z = torch.zeros(1, 1, dtype=torch.long)
        return Rollout(z, z.clone(), z.clone(), z.clone(), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, dtype=torch.bool),
                       z[:, 0].clone(), z[:, 0].clone(), torch.ones(1, dtype=torch.bool), z[:, 0].clone(),
                       prompts=["x" * (4 << 20)], responses=[""], infos=[{}])

    return WorkerSide({"policy": module}, collect)


def trainer_that_never_reads(cfg, pid_file: str) -> None:
    """A trainer process that starts a worker with `side_sending_big_batches`, writes the worker's
    pid to `pid_file`, and never reads a batch (until it is killed)."""
    module = torch.nn.Linear(2, 2)
    rollouts = AsyncRollouts(side_sending_big_batches, cfg, {"policy": module}, {"policy": list(module.parameters())}, 0,
                             worker_generators(cfg.train.seed), 1)
    Path(pid_file).write_text(str(rollouts.process.pid))
    time.sleep(600)


def side_falling_silent(cfg) -> WorkerSide:
    """A worker that starts and then stays silent: alive, never sending a batch."""
    side = rollout_side(cfg)

    def collect(index, rng, generator):
        time.sleep(600)

    return WorkerSide(side.modules, collect)


def side_whose_engine_is_not_told(cfg) -> WorkerSide:
    """Loads every version into the modules (its checksum is right) but never tells the backend: a
    vLLM engine keeps serving the weights it loaded first."""
    side = rollout_side(cfg)
    return WorkerSide(side.modules, side.collect)
