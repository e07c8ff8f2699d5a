"""Launched by test_distributed.py under torchrun (2 processes): each rank steps a Learner on its half
of test_objective's synthetic rollout (one prompt group each, different token counts) and rank 0
writes the resulting (all-reduced) gradient, for comparison with one process on the whole rollout."""

import sys
from pathlib import Path

import torch

from test_objective import make_learner, synthetic_rollout

if __name__ == "__main__":
    out, path, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    learner, grads = make_learner(path, overrides)
    rank = learner.accelerator.process_index
    rollout = synthetic_rollout(learner)
    learner.step(rollout.select(list(range(4 * rank, 4 * rank + 4))))
    if rank == 0:
        torch.save(grads[0], out / "grad.pt")
    # An orderly teardown: a rank that exits with gloo's threads still running can abort
    # ("terminate called without an active exception", SIGABRT) and fail the launch.
    learner.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
