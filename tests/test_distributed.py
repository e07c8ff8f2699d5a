"""Data-parallel training as 2 CPU processes (gloo): both ranks end with identical parameters."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, micro_overrides


def test_two_processes_stay_identical(tmp_path, micro_lm, micro_rm):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "tests" / "dist_train.py"), str(out)] + micro_overrides(tmp_path, **{"train.iterations": 3})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d0 = (out / "digest_rank0.txt").read_text()
    d1 = (out / "digest_rank1.txt").read_text()
    assert d0 == d1
    # ... and they trained: the saved weights moved away from the initial model's.
    import torch
    from safetensors.torch import load_file

    before = load_file(Path(micro_lm) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_two_processes_give_the_gradient_of_one_on_the_whole_batch(tmp_path, micro_lm):
    # The ranks hold different numbers of tokens (15 and 13): the token-mean must use the global count.
    import torch

    from test_objective import learner_gradient, rel

    overrides = ["algo.name=grpo", "algo.ent_coef=0.01", "kl.beta=0.1", "algo.micro_batch_size=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(REPO / "tests" / "dist_objective.py"), str(tmp_path), str(micro_lm)] + overrides
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "grad.pt")
    one = learner_gradient(micro_lm, overrides)
    assert rel(two, one) < 1e-10
