"""Asynchronous rollouts (train.max_staleness): a worker process samples while the trainer updates.

Each run here starts a worker process (a few seconds on the micro models)."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import async_faults
from conftest import micro_overrides
from cory import rollout_worker
from cory import train as train_module
from cory.cli import main
from cory.config import load_config
from cory.errors import UsageError
from cory.learner import Learner
from cory.rollout import Sampler
from cory.rollout_worker import AsyncRollouts
from cory.run import RunState


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


@pytest.fixture
def workers(monkeypatch):
    """Every AsyncRollouts (the trainer's side of a worker) started in this process."""
    started = []
    init = AsyncRollouts.__init__

    def recording(self, *args, **kwargs):
        started.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(AsyncRollouts, "__init__", recording)
    return started


def rollout_workers() -> list:
    """The live rollout worker processes of this process (other tests may leave other children)."""
    return [p for p in multiprocessing.active_children() if p.name == "cory-rollout-worker"]


def test_max_staleness_0_starts_no_worker_and_is_the_synchronous_loop_bit_for_bit(tmp_path, micro_lm, micro_rm, trained,
                                                                                monkeypatch):
    """k = 0 against a run whose trainer never enters cory.rollout_worker (start_worker replaced by
    None): the same metrics and weights, and no worker process at any step of either (a worker's
    start raises)."""
    def no_worker(*args, **kwargs):
        raise AssertionError("a rollout worker was started")

    monkeypatch.setattr(AsyncRollouts, "__init__", no_worker)
    workers_seen = []
    step = Learner.step

    def watching(self, rollout, iteration=0, generator=None):
        workers_seen.append(rollout_workers())
        return step(self, rollout, iteration, generator)

    monkeypatch.setattr(Learner, "step", watching)
    assert run(tmp_path, tmp_path / "k0", **{"train.max_staleness": 0}) == 0
    monkeypatch.setattr(train_module, "start_worker", lambda *args, **kwargs: None)  # nothing of cory.rollout_worker runs
    assert run(tmp_path, tmp_path / "sync") == 0
    assert len(trained) == 4 and all(versions is None for _, versions in trained)  # sampled by the trainer itself
    assert workers_seen == [[]] * 4
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


def test_a_silent_worker_stops_the_run_after_train_worker_timeout(tmp_path, capsys, micro_lm, micro_rm, monkeypatch, workers):
    """A worker that lives but sends nothing: the run stops with one line naming the key, exit 1,
    after train.worker_timeout (here 3 s, not the default 300 s), and the worker is stopped."""
    monkeypatch.setattr(train_module, "rollout_side", async_faults.side_falling_silent)
    capsys.readouterr()
    t0 = time.monotonic()
    assert run(tmp_path, tmp_path / "run", **{"train.max_staleness": 1, "train.iterations": 4, "train.worker_timeout": 3}) == 1
    waited = time.monotonic() - t0
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "sent no batch 0 within train.worker_timeout=3 s" in err and "--resume" in err
    assert 3 <= waited < 120 and not rollout_workers()


def test_killing_the_worker_stops_the_run_in_one_line_and_it_resumes(tmp_path, capsys, micro_lm, micro_rm, monkeypatch, trained,
                                                                      workers):
    """The worker is killed while batch 2 trains; it may or may not have sent batch 3 (whose tensors
    die with it: the trainer cannot read them) - either way the run stops with the same line."""
    step = Learner.step

    def kill_at_2(self, rollout, iteration=0, generator=None):
        if iteration == 2:
            os.kill(workers[-1].process.pid, signal.SIGKILL)
        return step(self, rollout, iteration, generator)

    monkeypatch.setattr(Learner, "step", kill_at_2)
    out = tmp_path / "run"
    settings = {"train.max_staleness": 1, "train.iterations": 5, "train.checkpoint_every": 1, "train.keep_checkpoints": 10}
    capsys.readouterr()
    assert run(tmp_path, out, **settings) == 1
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "the rollout worker died (exit code -9)" in err and "--resume" in err
    assert workers[-1].exitcode == -signal.SIGKILL
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


def test_the_worker_waits_for_weights_while_the_trainer_is_busy_longer_than_the_timeout(tmp_path, micro_lm, micro_rm,
                                                                                         monkeypatch, trained, workers):
    """The initial evaluation keeps the trainer busy for 3 x train.worker_timeout after the worker
    (k = 1) sent batches 0 and 1 and started to wait for version 1 (which follows iteration 0): the
    worker keeps waiting, and the run ends normally."""
    timeout = 1.0
    taken = {}
    next_batch = AsyncRollouts.next
    monkeypatch.setattr(AsyncRollouts, "next", lambda self, index: taken.pop(index) if index in taken else next_batch(self, index))
    evaluate = train_module.TrainingRun.evaluate_all

    def busy_first_evaluation(self):
        if self.state.iteration == 0:
            # The trainer's own patience is not under test (nor the worker's start-up time): only the
            # worker's, which got train.worker_timeout = 1 s before the fix.
            self.rollouts.timeout = 120.0
            taken.update({i: next_batch(self.rollouts, i) for i in (0, 1)})  # the worker now waits for version 1
            time.sleep(3 * timeout)  # the trainer is busy (a long evaluation or checkpoint)
        return evaluate(self)

    monkeypatch.setattr(train_module.TrainingRun, "evaluate_all", busy_first_evaluation)
    out = tmp_path / "run"
    assert run(tmp_path, out, **{"train.max_staleness": 1, "train.iterations": 3, "train.worker_timeout": timeout}) == 0
    assert [i for i, _ in trained] == [0, 1, 2] and not taken
    assert [int(v.max()) for _, v in trained][:2] == [0, 0] and int(trained[2][1].min()) >= 1  # batch 2 waited for version 1
    assert workers[-1].exitcode == 0


def test_the_worker_samples_only_the_batches_the_trainer_takes_and_stops_when_closed(tmp_path, micro_lm, micro_rm, monkeypatch,
                                                                                    trained, workers):
    """k = 2: no batch after the last iteration's is sampled, and the worker, idle once it sent the
    last one, exits by itself when the run closes it (exit code 0, not a signal)."""
    log = tmp_path / "sampled"
    monkeypatch.setenv(async_faults.SAMPLED_LOG, str(log))
    monkeypatch.setattr(train_module, "rollout_side", async_faults.side_recording_batches)
    assert run(tmp_path, tmp_path / "run", **{"train.max_staleness": 2, "train.iterations": 3}) == 0
    assert [i for i, _ in trained] == [0, 1, 2]
    assert async_faults.sampled_indices(log) == [0, 1, 2]
    assert workers[-1].exitcode == 0 and not rollout_workers()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie that its new parent did not reap yet counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_worker_exits_when_its_trainer_is_killed_with_a_batch_unread(tmp_path, monkeypatch):
    """A trainer process that never reads is SIGKILLed once its worker samples a batch larger than
    the pipe's buffer: the worker exits on its own (its queue does not hold up its exit)."""
    log, pid_file = tmp_path / "sampled", tmp_path / "worker.pid"
    monkeypatch.setenv(async_faults.SAMPLED_LOG, str(log))
    cfg = load_config(None, ["train.max_staleness=1", "train.iterations=4"])
    trainer = multiprocessing.get_context("spawn").Process(target=async_faults.trainer_that_never_reads, args=(cfg, str(pid_file)))
    trainer.start()
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not async_faults.sampled_indices(log):  # the worker is sampling batch 0
            assert trainer.is_alive() and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.join()
        deadline = time.monotonic() + 30
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker), "the orphaned rollout worker is still running"
    finally:
        if trainer.is_alive():
            trainer.kill()
            trainer.join()
        if worker is not None and not _gone(worker):
            os.kill(worker, signal.SIGKILL)


def _draws(sampler: dict, n: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng()
    rng.bit_generator.state = sampler["rng"]
    generator = torch.Generator()
    generator.set_state(torch.tensor(sampler["generator"], dtype=torch.uint8))
    return rng.random(n), torch.rand(n, generator=generator)


def test_a_fresh_worker_draws_from_a_random_stream_of_its_own(monkeypatch):
    """Not a copy of the trainer's generators (whose torch generator shuffles minibatches): distinct
    streams, the same for the same seed, another for another seed; a saved one is continued."""
    started = []
    monkeypatch.setattr(rollout_worker, "AsyncRollouts", lambda *args: started.append(args) or args)
    module = torch.nn.Linear(2, 2)
    learner = SimpleNamespace(optimizer=torch.optim.SGD(module.parameters(), lr=0.1))

    def worker_streams(seed, state=None):
        cfg = load_config(None, ["train.max_staleness=1", f"train.seed={seed}"])
        state = state or RunState.fresh(seed, 0)
        before = json.dumps(state.state_dict())
        rollout_worker.start_worker(None, cfg, state, {"policy": module}, {"policy": learner}, 1)
        assert json.dumps(state.state_dict()) == before  # the trainer's generators are left as they were
        return started[-1][5]

    trainer = _draws(RunState.fresh(3, 0).state_dict())
    worker = _draws(worker_streams(3))
    assert not np.isin(worker[0], trainer[0]).any() and not torch.isin(worker[1], trainer[1]).any()
    again, other = _draws(worker_streams(3)), _draws(worker_streams(4))
    assert np.array_equal(again[0], worker[0]) and torch.equal(again[1], worker[1])
    assert not np.isin(other[0], worker[0]).any() and not torch.isin(other[1], worker[1]).any()
    resumed = RunState.fresh(3, 0)
    resumed.sampler = worker_streams(4)
    assert worker_streams(3, resumed) is resumed.sampler  # a resumed worker continues the saved generators


def test_max_staleness_cannot_change_on_resume_and_forced_to_0_the_trainer_continues_the_workers_streams(
        tmp_path, capsys, micro_lm, micro_rm, monkeypatch, trained):
    out = tmp_path / "run"
    assert run(tmp_path, out, **{"train.max_staleness": 1, "train.iterations": 2}) == 0
    for k, shown in ((0, "train.max_staleness (1 -> 0)"), (2, "train.max_staleness (1 -> 2)")):
        capsys.readouterr()
        assert run(tmp_path, out, "--resume", **{"train.max_staleness": k, "train.iterations": 3}) == 2
        [err] = capsys.readouterr().err.strip().splitlines()
        assert shown in err and "--force" in err
    saved = json.loads((out / "checkpoints" / "iter_000002" / "run_state_rank0.json").read_text())["sampler"]
    drawn = []
    collect = Sampler.collect

    def recording(self, n, rng, generator=None, group_size=1):
        drawn.append((rng.bit_generator.state, generator.get_state().tolist()))
        return collect(self, n, rng, generator, group_size)

    monkeypatch.setattr(Sampler, "collect", recording)
    trained.clear()
    assert run(tmp_path, out, "--resume", "--force", **{"train.max_staleness": 0, "train.iterations": 3}) == 0
    # The synchronous trainer samples batch 2 where the worker would have: with its generators.
    assert drawn[0] == (saved["rng"], saved["generator"])
    assert [(i, v) for i, v in trained] == [(2, None)]
    assert [r["iteration"] for r in rows(out)] == [1, 2, 3]
    assert "sampler" not in json.loads((out / "checkpoints" / "iter_000003" / "run_state_rank0.json").read_text())
    last = json.loads((out / "config_history.jsonl").read_text().splitlines()[-1])
    assert last["forced"] and last["changed"]["train.max_staleness"] == [1, 0]


@pytest.mark.parametrize("overrides,message", [
    (["train.worker_timeout=5"], "no effect unless train.max_staleness > 0"),
    (["train.max_staleness=-1"], "must be >= 0"),
])
def test_what_asynchronous_rollouts_cannot_do_is_refused_in_one_line(overrides, message):
    with pytest.raises(UsageError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
