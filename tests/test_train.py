"""End-to-end training on the micro models: outputs, learning, exact resume, loading the result."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import micro_overrides
from cory.cli import main


def train_cli(out, tmp_path, *extra, resume=False):
    argv = ["train", "--output-dir", str(out)] + (["--resume"] if resume else []) + micro_overrides(tmp_path, **dict(e.split("=", 1) for e in extra))
    assert main(argv) == 0


def test_run_directory_has_everything(tmp_path, micro_lm, micro_rm):
    out = tmp_path / "run"
    train_cli(out, tmp_path, "train.iterations=3", "train.log_with=[tensorboard]")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"iteration", "reward_mean", "kl_mean", "entropy", "response_length", "beta"} <= set(r)
        assert r["logprob_gap"] < 1e-4  # behaviour log-probs agree with the trainer's recomputation
    assert list(out.glob("cory/**/events.out.tfevents*")), "TensorBoard events written through accelerate"
    assert (out / "final" / "config.json").exists() and (out / "summary.json").exists()
    assert main(["report", str(out)]) == 0
    assert (out / "plots" / "reward.png").stat().st_size > 1000 and (out / "plots" / "kl.png").exists()


def test_final_folder_loads_with_plain_transformers(tmp_path, micro_lm, micro_rm):
    out = tmp_path / "run"
    train_cli(out, tmp_path, "train.iterations=1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("the film was", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_resume_continues_exactly(tmp_path, micro_lm, micro_rm):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_cli(straight, tmp_path, "train.iterations=4", "train.checkpoint_every=2")
    train_cli(stopped, tmp_path, "train.iterations=2", "train.checkpoint_every=2")
    train_cli(stopped, tmp_path, "train.iterations=4", "train.checkpoint_every=2", resume=True)
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(stopped / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = (straight / "metrics.jsonl").read_text().splitlines()
    rows_b = (stopped / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]
    assert strip(rows_a) == strip(rows_b)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys, micro_lm, micro_rm):
    argv = ["train", "--output-dir", str(tmp_path / "empty"), "--resume"] + micro_overrides(tmp_path)
    assert main(argv) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_multi_turn_bandit_training_runs_whole_episodes(tmp_path, micro_lm, algo):
    """A review writer never answers ACTION=..., so every step is invalid: episodes still run to the
    horizon, each step executes a random arm and carries the -5 shaping penalty."""
    out = tmp_path / "run"
    extra = {"env.id": "cory/Bandit-v0", "env.kwargs": "{n_arms: 5, horizon: 4, history: 2, cot: false}",
             "env.eval_episodes": 3, "algo.name": algo, "train.batch_size": 3}
    train_cli(out, tmp_path, *[f"{k}={v}" for k, v in extra.items()])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["turns_per_episode"] == 4 for r in rows)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for e in evals:
        assert e["episode_length"] == 4 and e["valid_rate"] == 0.0
        assert abs(e["reward_mean"] - (e["env_return_mean"] - 5 * 4)) < 1e-6
        assert 0 < e["coverage_final"] <= 1 and e["regret_mean"] >= 0


def test_eval_and_zoo_list_commands(tmp_path, capsys, micro_lm, micro_rm):
    out = tmp_path / "run"
    train_cli(out, tmp_path, "train.iterations=1")
    capsys.readouterr()
    argv = ["eval", str(out / "final"), "--reference", "cory:micro-reviews", "--json"] + micro_overrides(tmp_path)
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 16 and {"reward_mean", "kl_mean", "eos_rate", "samples"} <= set(result)
    assert main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "cory:micro-reviews" in listing and "built" in listing and "cory:tiny-reviews" in listing


# -- reliability: nothing non-finite on disk, one run per directory, no pickles, checked resume ----
def cli(out, tmp_path, *extra, flags=()):
    argv = ["train", "--output-dir", str(out), *flags] + micro_overrides(tmp_path, **dict(e.split("=", 1) for e in extra))
    return main(argv)


def all_finite(folder):
    return all(torch.isfinite(t).all() for f in folder.rglob("*.safetensors") for t in load_file(f).values())


def test_overflowing_gradients_skip_the_step_and_are_counted(tmp_path, capsys, micro_lm):
    """Rewards of ~1e30 overflow the gradient norm: the step is skipped (weights unchanged, finite)
    and counted. A run whose last iteration could take no step ends with one line and exit 1, without
    a final/ (it is diverging, not done); three such iterations in a row stop the run early."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli(out, tmp_path, "task.reward=rewards_for_tests:huge", "train.iterations=2", "train.checkpoint_every=1") == 1
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("cory train: error: every optimizer step of the last iteration had non-finite gradients")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [1, 1]
    assert not (out / "final").exists()
    kept, initial = load_file(out / "checkpoints" / "iter_000001" / "model.safetensors"), load_file(micro_lm / "model.safetensors")
    assert all(torch.equal(kept[k], initial[k]) for k in initial if k in kept)
    stopped = tmp_path / "stopped"
    assert cli(stopped, tmp_path, "task.reward=rewards_for_tests:huge", "train.iterations=5") == 1
    [err] = capsys.readouterr().err.strip().splitlines()  # one line: the skipped steps print nothing on their way
    assert err.startswith("cory train: error: gradients were non-finite in every optimizer step of 3 iterations")
    assert not (stopped / "final").exists() and not (stopped / "checkpoints").exists()


def test_non_finite_weights_are_never_written(tmp_path, capsys, monkeypatch, micro_lm, micro_rm):
    """An optimizer step that leaves a NaN in the weights: the run stops with one line and exit 1
    before any checkpoint or final/ is written from them; the checkpoints before stay and resume."""
    out = tmp_path / "run"
    assert cli(out, tmp_path, "train.iterations=2", "train.checkpoint_every=1") == 0
    step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    capsys.readouterr()
    rc = cli(out, tmp_path, "train.iterations=3", "train.checkpoint_every=1", flags=["--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("cory train: error: weights of 'policy' became non-finite") and len(err.splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert all_finite(out / "checkpoints") and all_finite(out / "final")
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert cli(out, tmp_path, "train.iterations=3", "train.checkpoint_every=1", flags=["--resume"]) == 0
    assert all_finite(out / "final") and (out / "checkpoints" / "iter_000003" / "DONE").exists()


def test_a_fresh_run_refuses_another_runs_directory(tmp_path, capsys, micro_lm, micro_rm):
    out = tmp_path / "run"
    assert cli(out, tmp_path, "train.iterations=1") == 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli(out, tmp_path, "train.iterations=2") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cory train: error: output directory {out} holds a run ({run_id}): continue it with --resume, or replace it with --overwrite"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "the refused run touched nothing"
    assert cli(out, tmp_path, "train.iterations=2", "train.checkpoint_every=1", flags=["--overwrite"]) == 0
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != run_id
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    for ckpt in (out / "checkpoints").iterdir():
        assert json.loads((ckpt / "run_state_rank0.json").read_text())["run_id"] == new_id


class Planted:
    """Unpickling this runs code: it creates the file named in `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_runs_no_code_from_planted_pickles_and_falls_back(tmp_path, capsys, micro_lm, micro_rm):
    """Every pickle-format file of the latest checkpoint is replaced by a pickle that would create a
    marker file when loaded: resume runs none of them, warns, and continues from the checkpoint before."""
    import pickle

    out, marker = tmp_path / "run", tmp_path / "PWNED"
    assert cli(out, tmp_path, "train.iterations=2", "train.checkpoint_every=1") == 0
    latest = out / "checkpoints" / "iter_000002"
    planted = [p for p in latest.iterdir() if p.suffix in (".bin", ".pkl", ".pt")] + [latest / "run_state_rank0.pt"]
    assert len(planted) >= 3  # optimizer.bin, random_states_0.pkl, and the old run-state name
    for p in planted:
        p.write_bytes(pickle.dumps(Planted(marker)))
    capsys.readouterr()
    assert cli(out, tmp_path, "train.iterations=3", "train.checkpoint_every=1", flags=["--resume"]) == 0
    err = capsys.readouterr().err
    assert not marker.exists(), "code ran from a planted file"
    assert "warning: checkpoint iter_000002 cannot be loaded" in err and "resuming from iter_000001" in err
    assert (out / "checkpoints" / "iter_000002.unloadable").is_dir()
    assert [json.loads(r)["iteration"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_from_a_truncated_checkpoint_falls_back_and_ends_exactly(tmp_path, capsys, micro_lm, micro_rm):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert cli(straight, tmp_path, "train.iterations=3") == 0
    assert cli(broken, tmp_path, "train.iterations=3", "train.checkpoint_every=1", "train.keep_checkpoints=3") == 0
    weights = broken / "checkpoints" / "iter_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert cli(broken, tmp_path, "train.iterations=3", "train.checkpoint_every=1", "train.keep_checkpoints=3",
               flags=["--resume"]) == 0
    assert "resuming from iter_000002" in capsys.readouterr().err
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(broken / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config_unless_forced_and_records_changes(tmp_path, capsys, micro_lm, micro_rm):
    out = tmp_path / "run"
    assert cli(out, tmp_path, "train.iterations=1") == 0
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli(out, tmp_path, "train.iterations=2", "algo.lr=0.001", "train.seed=3", flags=["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "algo.lr (0.0001 -> 0.001)" in err and "train.seed (0 -> 3)" in err
    assert "--force" in err and (out / "metrics.jsonl").read_text() == metrics
    # Allowed keys (iterations, cadences, logging) change freely and are recorded.
    assert cli(out, tmp_path, "train.iterations=2", "train.checkpoint_every=1", flags=["--resume"]) == 0
    assert cli(out, tmp_path, "train.iterations=3", "algo.lr=0.001", "train.checkpoint_every=1", flags=["--resume", "--force"]) == 0
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["iteration"] == 0 and history[0]["config"]["algo.lr"] == 0.0001
    assert history[1]["changed"] == {"train.iterations": [1, 2], "train.checkpoint_every": [0, 1]} and not history[1]["forced"]
    assert history[2]["iteration"] == 2 and history[2]["changed"] == {"train.iterations": [2, 3], "algo.lr": [0.0001, 0.001]}
    assert history[2]["forced"]
    assert "lr: 0.001" in (out / "config.yaml").read_text()


N_KILLS = 3


@pytest.mark.timeout(900)  # a few process starts: slow only on a machine loaded by other work
def test_kill_9_at_random_moments_then_resume_ends_bit_identical(tmp_path, micro_lm, micro_rm):
    """A short run is killed with SIGKILL at random moments (iterations, evaluations, checkpoint
    writes, the final save) N times, each time restarted (--resume once a complete checkpoint exists,
    else afresh with --overwrite); its final weights equal an uninterrupted run's bit for bit."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from cory.run import latest_checkpoint

    overrides = micro_overrides(tmp_path, **{"train.iterations": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 2})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    straight = tmp_path / "straight"
    t0 = time.perf_counter()
    assert main(["train", "--output-dir", str(straight)] + overrides) == 0
    work = time.perf_counter() - t0  # the run's own work, without a process start

    killed, rng, kills = tmp_path / "killed", random.Random(13), 0
    config = killed / "config.yaml"
    while True:
        before = config.stat().st_mtime_ns if config.exists() else None
        flag = "--resume" if latest_checkpoint(killed) is not None else "--overwrite"
        proc = subprocess.Popen([sys.executable, "-m", "cory", "train", "--output-dir", str(killed), flag, *overrides],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills == N_KILLS:
            assert proc.wait(timeout=600) == 0, proc.stderr.read()
            break
        # The kill moment is drawn over the run's work: from when it has taken its directory (it
        # writes config.yaml once it has claimed it or loaded its checkpoint) to its end.
        while proc.poll() is None and (not config.exists() or config.stat().st_mtime_ns == before):
            time.sleep(0.02)
        try:
            assert proc.wait(timeout=rng.uniform(0.0, work)) == 0, proc.stderr.read()
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shared_prefix_training_acts_and_ends_where_the_full_passes_end(tmp_path, monkeypatch, micro_lm, micro_rm):
    """train.shared_prefix: with prompts sharing a long instruction, every scoring, update and
    evaluation pass runs the prefix once (counted), and the run's figures and final weights equal
    the full passes' up to float rounding; refused in one line with gradient checkpointing and with several processes."""
    import cory.scoring

    path = tmp_path / "prompts.jsonl"
    lead = "Write one more sentence of this movie review, in the same voice, and keep it short: "
    path.write_text("".join(json.dumps({"prompt": lead + s}) + "\n" for s in ("the film was", "i loved the", "a dull", "the cast")))
    calls = []
    lay_out = cory.scoring.lay_out_prefix
    monkeypatch.setattr(cory.scoring, "lay_out_prefix", lambda *a, **k: calls.append(1) or lay_out(*a, **k))
    runs = {}
    for shared in (False, True):
        calls.clear()
        out = tmp_path / f"run-{shared}"
        train_cli(out, tmp_path, "algo.name=ppo", "algo.epochs=2", "algo.minibatch_size=4", "train.iterations=1", f"task.prompt_file={path}",
                  "task.num_eval_prompts=4", f"train.shared_prefix={shared}")
        runs[shared] = (out, len(calls))
    assert runs[False][1] == 0
    # reference and policy scoring, 2 epochs x 2 minibatches; per evaluation (2): the reference, and the
    # policy's whole distributions for the exact episode KL (kl.exact_accounting, on by default)
    assert runs[True][1] == 2 + 2 * 2 + 2 * 2
    plain, cached = ([json.loads(r) for r in (runs[s][0] / "metrics.jsonl").read_text().splitlines()] for s in (False, True))
    for a, b in zip(plain, cached):
        for key in ("reward_mean", "kl_mean", "loss/policy", "loss/value", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    a, b = (load_file(runs[s][0] / "final" / "model.safetensors") for s in (False, True))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    from types import SimpleNamespace

    from cory.config import load_config
    from cory.errors import UsageError
    from cory.learner import Learner

    with pytest.raises(UsageError, match="one process"):  # several processes (DDP/FSDP): refused before any work
        Learner(None, None, None, load_config(overrides=["train.shared_prefix=true"]), SimpleNamespace(num_processes=2))
    argv = micro_overrides(tmp_path, **{"train.shared_prefix": "true", "train.gradient_checkpointing": "true"})
    assert main(["train", "--output-dir", str(tmp_path / "refused")] + argv) == 2
    assert not (tmp_path / "refused").exists()
