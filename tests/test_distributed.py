"""Data-parallel training as 2 CPU processes (gloo): both ranks end with identical parameters."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, micro_overrides


def free_port() -> str:
    """A port nobody listens on now: two test runs on one machine must not collide on a fixed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_env(tmp_path: Path) -> dict:
    """The launched processes' environment: one thread each, the repository importable, and their
    temporary files (torchrun leaves a torchelastic_* folder per launch) under the test's own folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "TMPDIR": str(tmp)}


@pytest.mark.parametrize("top", [0, 1], ids=["every-layer", "top-layer-on-a-trunk"])
def test_two_processes_stay_identical(tmp_path, micro_lm, micro_rm, top):
    """DDP in 2 processes keeps the ranks identical, training every layer or only the top one
    (`model.trainable_layers`: the trunk's output kept from sampling, the reference `FrozenTop`)."""
    out = tmp_path / "dist"
    env = launch_env(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(REPO / "tests" / "dist_train.py"), str(out)] + micro_overrides(
        tmp_path, **{"train.iterations": 3, "model.trainable_layers": top})
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
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved
    if top:  # only the top layer trained
        assert all(".layers.1." in k for k in moved), sorted(moved)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_two_processes_give_the_gradient_of_one_on_the_whole_batch(tmp_path, micro_lm):
    # The ranks hold different numbers of tokens (15 and 13): the token-mean must use the global count.
    import torch

    from test_objective import learner_gradient, rel

    overrides = ["algo.name=grpo", "algo.ent_coef=0.01", "kl.beta=0.1", "algo.micro_batch_size=3"]
    env = launch_env(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(REPO / "tests" / "dist_objective.py"), str(tmp_path), str(micro_lm)] + overrides
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "grad.pt")
    one = learner_gradient(micro_lm, overrides)
    assert rel(two, one) < 1e-10


def test_fsdp_learner_two_processes_match_one(tmp_path, micro_lm):
    """FSDP2 (torch fully_shard) on CPU with gloo: after a learner update (2 epochs x 2 micro-batches,
    clipping), both ranks hold identical full parameters, equal to one process updating the
    unsharded policy on the union of their rollouts."""
    import torch
    from safetensors.torch import load_file

    env = launch_env(tmp_path)
    script = str(REPO / "tests" / "fsdp_learner.py")
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
            script, str(tmp_path), "fsdp", str(micro_lm)]
    for cmd in (fsdp, [sys.executable, script, str(tmp_path), "single", str(micro_lm)]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "digest_fsdp_rank0.txt").read_text() == (tmp_path / "digest_fsdp_rank1.txt").read_text()
    sharded, single = load_file(tmp_path / "fsdp.safetensors"), load_file(tmp_path / "single.safetensors")
    before = load_file(Path(micro_lm) / "model.safetensors")
    assert sharded.keys() == single.keys()
    for k in sharded:
        torch.testing.assert_close(sharded[k], single[k], rtol=0, atol=2e-5, msg=k)
    moved = [k for k in before if not torch.equal(before[k], single["lm." + k])]
    assert len(moved) > len(before) // 2


def test_fsdp_run_two_processes_agree_and_resume_exactly(tmp_path, micro_lm, micro_rm):
    """`cory train` with train.fsdp=true in 2 CPU processes: the ranks end with identical weights,
    and a run stopped after 2 iterations and resumed from its sharded checkpoint ends where an
    uninterrupted one does."""
    import torch
    from safetensors.torch import load_file

    env = launch_env(tmp_path)

    def launch(out, iterations, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               str(REPO / "tests" / "dist_train.py"), str(out), *extra] + micro_overrides(
            tmp_path, **{"train.fsdp": True, "train.checkpoint_every": 1, "train.iterations": iterations, "algo.lr": 1e-3})
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch(straight, 3)
    launch(stopped, 2)
    launch(stopped, 3, "--resume")
    for out in (straight, stopped):
        assert (out / "digest_rank0.txt").read_text() == (out / "digest_rank1.txt").read_text()
        assert sorted(p.name for p in (out / "checkpoints").glob("*/fsdp/*")) == ["rank0.safetensors"] * 2 + ["rank1.safetensors"] * 2
    assert (straight / "digest_rank0.txt").read_text() == (stopped / "digest_rank0.txt").read_text()
    a, before = load_file(straight / "final" / "model.safetensors"), load_file(Path(micro_lm) / "model.safetensors")
    b = load_file(stopped / "final" / "model.safetensors")
    assert a.keys() == b.keys() >= before.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], before[k]) for k in before)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in before)


def test_accelerate_configs_parse_and_deepspeed_limits_are_refused():
    """examples/accelerate/*.yaml load as accelerate cluster configs; under DeepSpeed, ZeRO-3 and
    micro-batch accumulation (which cory's loop cannot drive there) are refused in one line."""
    from types import SimpleNamespace

    import pytest
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    from cory.config import load_config
    from cory.errors import UsageError
    from cory.learner import check_engine

    folder = REPO / "examples" / "accelerate"
    loaded = {p.stem: ClusterConfig.from_yaml_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert loaded["fsdp2"].distributed_type == DistributedType.FSDP and loaded["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert [loaded[f"deepspeed_zero{s}"].deepspeed_config["zero_stage"] for s in (2, 3)] == [2, 3]

    def engine(stage):
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    check_engine(engine(2), load_config(None, []))
    with pytest.raises(UsageError, match="ZeRO-3"):
        check_engine(engine(3), load_config(None, []))
    with pytest.raises(UsageError, match="micro_batch_size=0"):
        check_engine(engine(2), load_config(None, ["algo.minibatch_size=8", "algo.micro_batch_size=4"]))
