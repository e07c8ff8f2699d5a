"""Asynchronous rollouts (train.max_staleness): a worker process samples while the trainer updates.

Each run here starts a worker process (a few seconds on the micro models)."""

import json
import multiprocessing
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import async_faults
from conftest import micro_overrides
from cory import train as train_module
from cory.cli import main
from cory.config import load_config
from cory.errors import UsageError
from cory.learner import Learner
from cory.rollout_worker import AsyncRollouts


def run(tmp_path, out, *flags, **extra):
    return main(["train", "--output-dir", str(out), *flags] + micro_overrides(tmp_path, **extra))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def trained(monkeypatch):
    """(iteration, versions of the rows) of every rollout the Learner trains on, in this process."""
    seen = []
    step = Learner.step

    def recording(self, rollout, iteration=0, generator=None):
        seen.append((iteration, rollout.policy_version))
        return step(self, rollout, iteration, generator)

    monkeypatch.setattr(Learner, "step", recording)
    return seen


def test_max_staleness_0_is_the_synchronous_loop_bit_for_bit(tmp_path, micro_lm, micro_rm, trained):
    run(tmp_path, tmp_path / "sync")
    assert run(tmp_path, tmp_path / "k0", **{"train.max_staleness": 0}) == 0
    assert all(versions is None for _, versions in trained)  # sampled by the trainer itself: no worker
    a, b = rows(tmp_path / "sync"), rows(tmp_path / "k0")
    drop = ("time/", "tokens_per_s/")
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in a] == \
           [{k: v for k, v in r.items() if not k.startswith(drop)} for r in b]
    wa, wb = (load_file(p / "final" / "model.safetensors") for p in (tmp_path / "sync", tmp_path / "k0"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_with_max_staleness_1_every_trained_sample_is_at_most_one_version_old(tmp_path, micro_lm, micro_rm, trained):
    out = tmp_path / "k1"
    assert run(tmp_path, out, **{"train.max_staleness": 1, "train.iterations": 4, "algo.is_correction": "icepop"}) == 0
    assert [i for i, _ in trained] == [0, 1, 2, 3]
    for iteration, versions in trained:
        assert versions is not None and len(versions) == 8
        assert ((iteration - versions) <= 1).all() and (versions <= iteration).all()
    # The versions advance: the weights of later iterations reached the worker (their checksums matched).
    assert max(int(v.max()) for _, v in trained) >= 2
    log = rows(out)
    assert [r["async/staleness_max"] for r in log] == [int(i - v.min()) for i, v in trained]
    # Batch 0 was sampled by version 0, the weights the trainer scores it with: the worker's
    # behaviour log-probs are the trainer's (the measured mismatch is rounding).
    assert log[0]["async/staleness_max"] == 0 and log[0]["is/log_ratio_abs_mean"] < 1e-5
    assert all("is/masked_tokens" in r for r in log)
    assert all(r["async/behaviour_gap"] < 1e-4 for r in log)  # each batch's log-probs are its version's
    assert not multiprocessing.active_children()  # the worker was stopped with the run


def test_a_multi_turn_environment_runs_asynchronously(tmp_path, micro_lm, trained):
    from cory import zoo

    zoo.build("cory:micro-agent", progress=False)
    out = tmp_path / "bandit"
    assert main(["train", "--output-dir", str(out), "model.name=cory:micro-agent", "env.id=cory/Bandit-v0",
                 "env.kwargs={n_arms: 10, horizon: 2, cot: false, history: 10}", "env.eval_episodes=2", "algo.name=reinforce",
                 "generation.max_new_tokens=6", "train.batch_size=2", "train.iterations=3", "train.max_staleness=1",
                 "train.log_with=[]", "train.progress=false"]) == 0
    assert all(((i - v) <= 1).all() for i, v in trained) and {int(v.max()) for _, v in trained} >= {0, 1}
    assert all(len(v) == 4 for _, v in trained)  # 2 episodes of 2 turns, each row with its version


def test_cory_runs_asynchronously_with_both_agents_weights_in_the_worker(tmp_path, micro_lm, micro_rm, trained):
    """Roles swap every iteration; each batch's rows of both turns (pioneer and observer) are checked
    against their agent's log-probs at the batch's version (async/behaviour_gap)."""
    out = tmp_path / "cory"
    assert run(tmp_path, out, **{"cory.enabled": "true", "cory.swap_every": 1, "train.max_staleness": 1,
                                 "train.iterations": 3, "train.batch_size": 4}) == 0
    assert [i for i, _ in trained] == [0, 0, 1, 1, 2, 2]  # each agent's Learner trains on its own turn
    assert all(v is not None and len(v) == 4 and ((i - v) <= 1).all() for i, v in trained)
    log = rows(out)
    assert [r["pioneer_is_a"] for r in log] == [1.0, 0.0, 1.0]
    assert all(r["async/behaviour_gap"] < 1e-4 for r in log) and max(r["async/version_max"] for r in log) >= 1


def test_a_worker_that_never_gets_new_weights_stops_the_run(tmp_path, capsys, micro_lm, micro_rm, monkeypatch):
    """The channel delivers the first weights again under each new version number: the checksum of
    what the worker's sampler holds is not the version's."""
    publish = AsyncRollouts.publish

    def stale_publish(self, version):
        if not self.sent:  # the first version goes through; later ones carry its tensor again
            put, first = self.weights.put, []

            def put_first_weights(message):
                if message is not None:
                    first.append(message[1])
                    message = (message[0], first[0])
                put(message)

            self.weights.put = put_first_weights
        return publish(self, version)

    monkeypatch.setattr(AsyncRollouts, "publish", stale_publish)
    capsys.readouterr()
    assert run(tmp_path, tmp_path / "run", **{"train.max_staleness": 1, "train.iterations": 3}) == 1
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "does not hold the weights of version 1" in err
    assert not multiprocessing.active_children()


def test_a_worker_that_keeps_serving_old_weights_stops_the_run(tmp_path, capsys, micro_lm, micro_rm, monkeypatch):
    """The worker loads every version it is sent (its checksum is right), into a copy of the model
    that its Sampler does not use: its log-probs are not those of the version it reports."""
    monkeypatch.setattr(train_module, "rollout_side", async_faults.side_serving_old_weights)
    capsys.readouterr()
    assert run(tmp_path, tmp_path / "run", **{"train.max_staleness": 1, "train.iterations": 3}) == 1
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "log-probs are not those of weights version 1" in err


def test_killing_the_worker_stops_the_run_in_one_line_and_it_resumes(tmp_path, capsys, micro_lm, micro_rm, monkeypatch, trained):
    step = Learner.step

    def kill_at_2(self, rollout, iteration=0, generator=None):
        if iteration == 2:
            [worker] = multiprocessing.active_children()
            os.kill(worker.pid, signal.SIGKILL)
        return step(self, rollout, iteration, generator)

    monkeypatch.setattr(Learner, "step", kill_at_2)
    out = tmp_path / "run"
    settings = {"train.max_staleness": 1, "train.iterations": 5, "train.checkpoint_every": 1, "train.keep_checkpoints": 10}
    capsys.readouterr()
    assert run(tmp_path, out, **settings) == 1
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "the rollout worker died (exit code -9)" in err and "--resume" in err
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "DONE").exists())
    assert done[-1] in ("iter_000003", "iter_000004")  # batch 3 may have been sent before the kill
    last = out / "checkpoints" / done[-1]
    state = json.loads((last / "run_state_rank0.json").read_text())
    assert set(state["sampler"]) == {"rng", "generator"}
    assert all(torch.isfinite(t).all() for t in load_file(last / "model.safetensors").values())
    monkeypatch.setattr(Learner, "step", step)
    trained.clear()
    resumed_at = state["iteration"]
    assert run(tmp_path, out, "--resume", **settings) == 0
    assert [r["iteration"] for r in rows(out)] == list(range(1, 6))  # each iteration once
    # The resumed worker starts from the checkpoint's weights: its first batch is version `resumed_at`.
    first_iteration, first_versions = trained[0]
    assert first_iteration == resumed_at and (first_versions == resumed_at).all()
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("overrides,message", [
    (["train.max_staleness=1", "generation.backend=vllm"], "vLLM engine in the worker is not implemented"),
    (["train.worker_timeout=5"], "no effect unless train.max_staleness > 0"),
    (["train.max_staleness=-1"], "must be >= 0"),
])
def test_what_asynchronous_rollouts_cannot_do_is_refused_in_one_line(overrides, message):
    with pytest.raises(UsageError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
