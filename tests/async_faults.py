"""Broken rollout workers for tests/test_async.py: module-level, so that the worker process (which
imports what it runs by name) finds them."""

import copy

from cory.rollout_worker import WorkerSide
from cory.train import rollout_side


def side_serving_old_weights(cfg) -> WorkerSide:
    """Receives every version, but loads it into a copy of the model: the Sampler keeps the first weights."""
    side = rollout_side(cfg)
    return WorkerSide({name: copy.deepcopy(module) for name, module in side.modules.items()}, side.collect)
