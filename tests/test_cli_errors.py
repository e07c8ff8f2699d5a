"""Every bad input named by the CLI contract fails before any work: one line, exit 2, no traceback."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import micro_overrides
from cory.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.iteratons=3"], "unknown config key 'train.iteratons'; valid keys in 'train': iterations"),
        (["train.iterations=lots"], "bad value for config key 'train.iterations'"),
        (["algo.name=ppo9"], "bad value for config key 'algo.name'"),
        (["model.name=cory:nope"], "unknown model 'cory:nope'; the zoo has: cory:"),
        (["model.name=./no/such/folder"], "model folder not found: ./no/such/folder"),
        (["task.prompt_file=/no/such/prompts.jsonl"], "prompt file not found: /no/such/prompts.jsonl"),
        (["task.reward=cory:not-a-model"], "unknown model 'cory:not-a-model'"),
        (["task.reward=no_such_module_xyz:score"], "cannot import module 'no_such_module_xyz'"),
        (["oops"], "override 'oops' is not of the form section.key=value"),
    ],
)
def test_train_bad_input_is_one_clear_line(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--output-dir", str(out), *overrides)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "no work may start on bad input"


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "r"))
    assert code == 2 and "config file not found" in err and len(err.splitlines()) == 1


def test_unknown_zoo_name(capsys):
    code, err = run_cli(capsys, "zoo", "build", "cory:nope")
    assert code == 2 and "unknown model 'cory:nope'" in err


def test_report_on_missing_dir(tmp_path, capsys):
    code, err = run_cli(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "run directory not found" in err


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cory", "train", "--output-dir", str(tmp_path / "r"), "train.batchsize=4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]
    ] and "unknown config key 'train.batchsize'" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- every class of bad input a user controls: one line, exit 2, no traceback, nothing written -----
def broken_folder(tmp_path, micro_lm, how):
    folder = tmp_path / f"model-{how}"
    if how == "empty":
        folder.mkdir()
        return folder
    shutil.copytree(micro_lm, folder)
    if how == "no-config":
        (folder / "config.json").unlink()
    elif how == "corrupt-config":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif how == "unknown-type":
        conf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**conf, "model_type": "no-such-architecture"}))
    elif how == "truncated-weights":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how == "pickled-weights":  # a torch.save pickle: loading it could run any code, so it is never loaded
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


def prompt_file(tmp_path, how):
    path = tmp_path / f"prompts-{how}.jsonl"
    if how == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    elif how == "latin-1":
        path.write_bytes('{"prompt": "Un film tr\u00e8s \u00e9mouvant"}\n'.encode("latin-1"))
    elif how == "too-long":
        path.write_text(json.dumps({"prompt": "the film was good and " * 80}) + "\n")
    elif how == "not-json":
        path.write_text("the film was\n")
    return path


BAD_INPUTS = {
    # numbers out of range
    "lr-nan": (["algo.lr=nan"], "'algo.lr': nan; must be a finite number"),
    "lr-negative": (["algo.lr=-0.001"], "'algo.lr': -0.001; must be > 0"),
    "lr-inf": (["algo.lr=inf"], "'algo.lr': inf; must be a finite number"),
    "temperature-0": (["generation.temperature=0"], "'generation.temperature': 0.0; must be > 0"),
    "temperature-nan": (["generation.temperature=nan"], "'generation.temperature': nan"),
    "top-k-negative": (["generation.top_k=-1"], "'generation.top_k': -1; must be >= 0"),
    "beta-negative": (["kl.beta=-0.1"], "'kl.beta': -0.1; must be >= 0"),
    "clip-range-negative": (["algo.name=ppo", "algo.clip_range=-0.2"], "'algo.clip_range': -0.2; must be > 0"),
    "gamma-negative": (["algo.gamma=-1"], "'algo.gamma': -1.0; must be in [0, 1]"),
    "lambda-above-1": (["algo.name=ppo", "algo.lam=1.5"], "'algo.lam': 1.5; must be in [0, 1]"),
    "checkpoint-every-negative": (["train.checkpoint_every=-2"], "'train.checkpoint_every': -2; must be >= 0"),
    "micro-batch-negative": (["algo.micro_batch_size=-1"], "'algo.micro_batch_size': -1; must be >= 0"),
    "group-size-0": (["algo.name=grpo", "algo.group_size=0"], "algo.group_size must be at least 2 for grpo"),
    "group-size-1-grpo": (["algo.name=grpo", "algo.group_size=1"], "algo.group_size must be at least 2 for grpo"),
    "eval-samples-0": (["eval.samples_per_prompt=0"], "'eval.samples_per_prompt': 0; must be at least 1"),
    "seed-negative": (["train.seed=-1"], "'train.seed': -1; must be >= 0"),
    "reward-timeout-0": (["task.reward_timeout=0"], "'task.reward_timeout': 0.0; must be > 0"),
    # YAML booleans for text keys
    "mixed-precision-yes": (["train.mixed_precision=yes"], "'train.mixed_precision': YAML reads it as the boolean True; choose one of: no"),
    "dtype-no": (["model.dtype=no"], "'model.dtype': YAML reads it as the boolean False; choose one of: float32"),
    # the wrong kind of model
    "classifier-as-policy-zoo": (["model.name=cory:micro-sentiment"], "model 'cory:micro-sentiment' is a classifier, not a causal-lm"),
    "causal-lm-as-reward-zoo": (["task.reward=cory:micro-reviews"], "model 'cory:micro-reviews' is a causal-lm, not a classifier"),
    "unknown-reward-label": (["task.reward_label=joy"], "reward label 'joy' is not one of"),
    # reward functions
    "reward-raises": (["task.reward=rewards_for_tests:raises"], "reward 'rewards_for_tests:raises' raised KeyError: 'label'"),
    "reward-none": (["task.reward=rewards_for_tests:returns_none"], "returned NoneType; it must return a list of one number per response"),
    "reward-strings": (["task.reward=rewards_for_tests:returns_strings"], "returned str values; it must return one number per response"),
    "reward-2d": (["task.reward=rewards_for_tests:returns_2d"], "returned an array of shape (2, 2)"),
    "reward-wrong-length": (["task.reward=rewards_for_tests:wrong_length"], "returned 1 values for 2 responses"),
    "reward-nan": (["task.reward=rewards_for_tests:returns_nan"], "returned a non-finite value"),
    "reward-never-returns": (["task.reward=rewards_for_tests:never_returns", "task.reward_timeout=1"],
                             "did not return within 1 s (task.reward_timeout)"),
    "reward-not-callable": (["task.reward=rewards_for_tests:nothing_here"], "has no function 'nothing_here'"),
    # environments
    "env-not-cory": (["env.id=CartPole-v1"], "bad value for config key 'env.id': 'CartPole-v1'; cory environments: cory/"),
    "env-kwargs-unknown-key": (["env.id=cory/Bandit-v0", "env.kwargs={arms: 5}"], "bad env.kwargs for cory/Bandit-v0"),
    "env-kwargs-bad-value": (["env.id=cory/Bandit-v0", "env.kwargs={n_arms: 0}"], "bad env.kwargs for cory/Bandit-v0"),
    "env-with-cory": (["env.id=cory/Bandit-v0", "cory.enabled=true"], "env.id and cory.enabled cannot be combined"),
    "env-kwargs-a-string": (["env.id=cory/Bandit-v0", "env.kwargs=abc"], "'env.kwargs': 'abc'; must be a mapping"),
    "env-kwargs-a-list": (["env.id=cory/Bandit-v0", "env.kwargs=[5]"], "'env.kwargs': [5]; must be a mapping"),
    "env-kwargs-wrong-type": (["env.id=cory/Bandit-v0", 'env.kwargs={n_arms: "<"}'], "n_arms must be int, got '<'"),
    # names longer than a file system allows (Path.is_dir would raise "File name too long")
    "model-name-too-long": (["model.name=" + "m" * 10_000], "model folder not found: mmm"),
    "reward-too-long": (["task.reward=" + "r" * 10_000], "(10000 characters)' is neither vader"),
    "reward-function-too-long": (["task.reward=" + "r" * 10_000 + ":f"], "cannot import module"),
    # minibatches that would silently be unequal or capped (train.batch_size=8 here)
    "minibatch-not-dividing": (["algo.minibatch_size=3"], "algo.minibatch_size=3 does not divide the 8 episodes"),
    "minibatch-too-large": (["algo.minibatch_size=100"], "algo.minibatch_size=100 is more than the 8 episodes"),
    # keys
    "empty-key": (["train.=3"], "override 'train.=3' is not of the form section.key=value"),
    "moved-key": (["cory.shared_base=true"], "config key 'cory.shared_base' is gone: use model.lora.r"),
}


def expect_one_line_error(capsys, argv, expected):
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert expected in err, err
    assert len(err.splitlines()) == 1 and err.startswith("cory train: error: ") and "Traceback" not in err


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_value_is_one_line_and_writes_nothing(tmp_path, capsys, micro_lm, micro_rm, case):
    overrides, expected = BAD_INPUTS[case]
    out = tmp_path / "run"
    extra = dict(o.split("=", 1) for o in overrides)
    expect_one_line_error(capsys, ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **extra), expected)
    assert not out.exists(), "nothing may be written on bad input"


@pytest.mark.parametrize("how, role, expected", [
    ("empty", "model.name", "has no config.json"),
    ("no-config", "model.name", "has no config.json"),
    ("corrupt-config", "model.name", "config.json cannot be read"),
    ("unknown-type", "model.name", "config.json cannot be read"),
    ("truncated-weights", "model.name", "model.safetensors is damaged or truncated"),
    ("no-weights", "model.name", "holds no weights"),
    ("pickled-weights", "model.name", "holds only pickled weights (*.bin), which cory never loads"),
    ("pickled-weights", "task.reward", "holds only pickled weights (*.bin), which cory never loads"),
    ("truncated-weights", "model.reference", "model.safetensors is damaged or truncated"),
    ("truncated-weights", "task.reward", "model.safetensors is damaged or truncated"),
])
def test_broken_model_folder_is_one_line(tmp_path, capsys, micro_lm, micro_rm, how, role, expected):
    folder = broken_folder(tmp_path, micro_lm, how)
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{role: str(folder)})
    expect_one_line_error(capsys, argv, expected)
    assert not out.exists()


def test_wrong_kind_of_model_folder(tmp_path, capsys, micro_lm, micro_rm):
    out = tmp_path / "run"
    expect_one_line_error(capsys, ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"model.name": str(micro_rm)}),
                          "is a LlamaForSequenceClassification, not a causal language model: it cannot be the policy")
    expect_one_line_error(capsys, ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"task.reward": str(micro_lm)}),
                          "is a LlamaForCausalLM, not a sequence classifier: it cannot be the reward")
    assert not out.exists()


@pytest.mark.parametrize("how, expected", [
    ("binary", "is binary, not JSONL or CSV text"),
    ("latin-1", "is not UTF-8 text"),
    ("not-json", ":1: not valid JSON"),
    ("too-long", "does not fit the policy's context (256 tokens)"),
])
def test_bad_prompt_file_is_one_line(tmp_path, capsys, micro_lm, micro_rm, how, expected):
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"task.prompt_file": str(prompt_file(tmp_path, how))})
    expect_one_line_error(capsys, argv, expected)
    assert not out.exists()


def test_prompt_longer_than_the_classifier_window_is_refused(tmp_path, capsys, micro_lm, micro_rm, monkeypatch):
    """A classifier that cuts prompt+response at its window never sees the response: refused."""
    import cory.preflight

    monkeypatch.setattr(cory.preflight, "CLASSIFIER_MAX_TOKENS", 16)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "the film was good and the actors were great"}) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"task.prompt_file": str(path)})
    expect_one_line_error(capsys, argv, "does not fit the reward classifier's window (16 tokens)")
    assert not out.exists()


def test_output_directory_that_is_a_file_or_unwritable(tmp_path, capsys, micro_lm, micro_rm):
    import os

    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    expect_one_line_error(capsys, ["train", "--output-dir", str(a_file)] + micro_overrides(tmp_path), "is a file")
    assert a_file.read_text() == "not a directory"
    # /sys refuses new entries even to root; elsewhere a read-only folder does.
    if os.geteuid() == 0:
        target = "/sys/cory-test-run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = str(locked / "run")
    expect_one_line_error(capsys, ["train", "--output-dir", target] + micro_overrides(tmp_path), "is not writable")


def test_yaml_no_means_the_choice_no(tmp_path):
    from cory.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_full_disk_during_a_checkpoint_stops_with_one_line(tmp_path, capsys, monkeypatch, micro_lm, micro_rm):
    """ENOSPC while a checkpoint is written: one line, exit 1, the partial checkpoint removed and the
    previous complete one kept (a resume continues from it)."""
    import errno

    from accelerate import Accelerator

    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"train.iterations": 3, "train.checkpoint_every": 1})
    save = Accelerator.save_state

    def fill_disk_at_second(self, path, *args, **kwargs):
        if path.endswith("iter_000002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fill_disk_at_second)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cory train: error: cannot write checkpoint") and "No space left on device" in err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000001"]
    monkeypatch.setattr(Accelerator, "save_state", save)
    assert main(argv[:3] + ["--resume"] + argv[3:]) == 0


def test_a_folder_without_architectures_loaded_as_reward_is_refused(tmp_path, capsys, micro_lm, micro_rm):
    """transformers only warns (muted by the CLI) when it gives a causal LM a random classifier head:
    that warning becomes the one-line error, before anything is written."""
    folder = tmp_path / "lm-no-arch"
    shutil.copytree(micro_lm, folder)
    conf = json.loads((folder / "config.json").read_text())
    conf.pop("architectures")
    (folder / "config.json").write_text(json.dumps(conf))
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"task.reward": str(folder)})
    expect_one_line_error(capsys, argv, "is not a trained sequence classifier: it lacks score.weight")
    assert not out.exists()


def strict_json_rows(path):
    """The rows of a JSONL file, refusing NaN and Infinity (which are not JSON)."""
    def refuse(token):
        raise ValueError(f"{path.name} holds {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_ends_with_one_line_and_no_final(tmp_path, capsys, micro_lm, micro_rm):
    """algo.lr=1e6: the first step throws the weights far off and every later step's gradients are
    non-finite. The run stops at the end with exit 1 and one line instead of writing a final/ from
    broken weights; a huge coefficient prints that one line too (no line per skipped step), and the
    logs stay valid JSON."""
    for name, setting in (("lr", {"algo.lr": 1e6}), ("beta", {"kl.beta": 1e30})):
        out = tmp_path / name
        code = main(["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **setting))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith("cory train: error: every optimizer step of the last iteration had non-finite gradients")
        assert not (out / "final").exists()
        assert [r["skipped_updates"] for r in strict_json_rows(out / "metrics.jsonl")][-1] >= 1
        strict_json_rows(out / "eval.jsonl")


def run_with_file_size_limit(argv, limit: int) -> subprocess.CompletedProcess:
    """`cory` in a process that may write no file larger than `limit` bytes (writes beyond it fail
    with EFBIG, as on a full disk)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["tests", os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "cory", *argv], preexec_fn=limited, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_full_disk_stops_the_run_with_one_line_and_leaves_nothing_that_blocks_the_next(tmp_path, micro_lm, micro_rm):
    """Writes that fail (a file-size limit stands in for a full disk): when the run directory is
    claimed, nothing is left (no empty run.json that would make it "hold a run"); during a
    checkpoint (safetensors raises its own error, not an OSError), the half-written checkpoint is
    removed, and the next run starts with --overwrite (or says so on --resume)."""
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out)] + micro_overrides(tmp_path, **{"train.iterations": 2, "train.checkpoint_every": 1})
    claimed = run_with_file_size_limit(argv, 16)
    assert claimed.returncode == 1, claimed.stderr[-2000:]
    [line] = claimed.stderr.strip().splitlines()
    assert line.startswith(f"cory train: error: cannot write the run directory {out}") and "nothing was written" in line
    assert not out.exists()
    checkpoint = run_with_file_size_limit(argv, 64 * 1024)  # logs fit; the weights do not
    assert checkpoint.returncode == 1, checkpoint.stderr[-2000:]
    [line] = checkpoint.stderr.strip().splitlines()
    assert line.startswith("cory train: error: cannot write checkpoint") and "the previous complete checkpoint is kept" in line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    resumed = subprocess.run([sys.executable, "-m", "cory", *argv, "--resume"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": "tests"})
    assert resumed.returncode == 2 and "start it again with --overwrite" in resumed.stderr
    assert main(argv + ["--overwrite"]) == 0 and (out / "final" / "config.json").exists()
