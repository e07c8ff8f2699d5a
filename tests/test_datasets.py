"""Prompts from datasets (task.dataset): parquet, JSONL and Arrow folders read as a stream through the
`datasets` library, answers handed to rewards, exact resume of the data order, and the refusals."""

import json
import socket

import datasets
import pytest
import torch
from safetensors.torch import load_file

from conftest import micro_overrides
from cory.cli import main
from cory.corpora import reviews
from cory.tasks.base import TaskEnv
from cory.tasks.dataset_prompts import DatasetPrompts
from cory.tasks.registry import make_task
from cory.config import TaskConfig, load_config

DEFAULT_TRAIN_PROMPTS = {"task.num_train_prompts": TaskConfig().num_train_prompts}
"""micro_overrides sets task.num_train_prompts, which task.dataset refuses: back to its default."""


@pytest.fixture(scope="module")
def table():
    """30 review openings with an answer column (the prompt's length in characters)."""
    prompts = reviews.prompts(30, seed=5)
    return datasets.Dataset.from_dict({"text": prompts, "answer": [str(len(p)) for p in prompts]})


@pytest.fixture
def parquet(tmp_path, table):
    path = tmp_path / "reviews.parquet"
    table.to_parquet(str(path))
    return path


def test_parquet_jsonl_and_arrow_folders_give_the_same_rows_in_the_same_order(tmp_path, table, parquet):
    table.to_json(str(tmp_path / "reviews.jsonl"))
    datasets.DatasetDict({"train": table, "test": table.select(range(5))}).save_to_disk(str(tmp_path / "arrow"))
    seen = []
    for spec in (parquet, tmp_path / "reviews.jsonl", tmp_path / "arrow"):
        stream = DatasetPrompts(str(spec), "train", "text", "answer", num_eval=4, seed=3)
        seen.append((stream.eval_prompts, stream.draw(40)))
    assert seen[0] == seen[1] == seen[2]
    evals, drawn = seen[0]
    assert evals == table["text"][:4]  # the first rows, in file order, held out
    # 26 training rows: the first epoch is a permutation of them, then the second epoch starts.
    assert sorted(drawn[:26]) == sorted(table["text"][4:]) and drawn[:26] != table["text"][4:]
    assert set(drawn[26:]) <= set(table["text"][4:]) and drawn[26:] != drawn[:14]


def test_answers_reach_a_function_reward_with_their_prompts(tmp_path, parquet):
    import rewards_for_tests

    cfg = load_config(None, [f"task.dataset={parquet}", "task.prompt_column=text", "task.answer_column=answer",
                             "task.reward=rewards_for_tests:record_answers", "task.num_eval_prompts=4"])
    task = make_task(cfg.task)
    rewards_for_tests.ANSWERS_SEEN.clear()
    prompts = task.sample_prompts(5, None)
    task.score(prompts, ["x"] * 5)
    task.score(task.eval_prompts, ["x"] * 4)
    for batch in rewards_for_tests.ANSWERS_SEEN:
        assert batch and all(answer == str(len(prompt)) for prompt, answer in batch)


def run_cli(out, parquet, *extra, resume=False):
    overrides = micro_overrides(out.parent, **{"task.dataset": str(parquet), "task.prompt_column": "text", "task.num_eval_prompts": 4,
                                               "train.batch_size": 6, "train.checkpoint_every": 2, **DEFAULT_TRAIN_PROMPTS})
    argv = ["train", "--output-dir", str(out), *(["--resume"] if resume else []), *overrides, *extra]
    assert main(argv) == 0


def test_a_parquet_dataset_trains_and_resumes_exactly(tmp_path, parquet, micro_lm, micro_rm):
    """26 training rows, 6 prompts an iteration: the fifth iteration crosses into the second epoch,
    after the resume at iteration 2. The resumed run's weights and logs equal the uninterrupted run's,
    bit for bit, and the stream's position is in the checkpoint."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(straight, parquet, "train.iterations=6")
    run_cli(stopped, parquet, "train.iterations=2")
    state = json.loads((stopped / "checkpoints" / "iter_000002" / "run_state_rank0.json").read_text())
    assert state["task"] == {"epoch": 0, "taken": 12}
    run_cli(stopped, parquet, "train.iterations=6", resume=True)
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(stopped / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda path: [{k: v for k, v in json.loads(r).items() if not k.startswith(("time/", "tokens_per_s"))}
                          for r in path.read_text().splitlines()]
    assert strip(straight / "metrics.jsonl") == strip(stopped / "metrics.jsonl")
    final = json.loads((straight / "checkpoints" / "iter_000006" / "run_state_rank0.json").read_text())
    assert final["task"] == {"epoch": 1, "taken": 10}


def refused(tmp_path, capsys, *overrides) -> str:
    out = tmp_path / "refused"
    capsys.readouterr()  # what writing the test's data printed
    assert main(["train", "--output-dir", str(out), *micro_overrides(tmp_path, **DEFAULT_TRAIN_PROMPTS), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists(), err
    return err


def test_bad_datasets_are_refused_in_one_line(tmp_path, capsys, parquet, table, monkeypatch):
    err = refused(tmp_path, capsys, f"task.dataset={parquet}", "task.prompt_column=question")
    assert "no column 'question'" in err and "text, answer" in err
    err = refused(tmp_path, capsys, f"task.dataset={parquet}", "task.prompt_column=text", "task.split=test")
    assert "no split 'test'" in err
    table.select([]).to_parquet(str(tmp_path / "empty.parquet"))
    err = refused(tmp_path, capsys, f"task.dataset={tmp_path / 'empty.parquet'}", "task.prompt_column=text")
    assert "has no rows" in err
    err = refused(tmp_path, capsys, f"task.dataset={parquet}", "task.prompt_column=text", "task.num_eval_prompts=30")
    assert "none are left to train on" in err
    err = refused(tmp_path, capsys, f"task.dataset={tmp_path / 'missing.parquet'}")
    assert "task.dataset not found" in err

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    err = refused(tmp_path, capsys, "task.dataset=someone/reviews")
    assert "the hub cannot be reached" in err


def test_without_the_datasets_library_a_dataset_run_is_refused_in_one_line(tmp_path, capsys, parquet, monkeypatch):
    """`datasets` is an optional dependency (`cory[datasets]`): where it is not installed, a run that
    names task.dataset says what to install, in one line, and writes nothing."""
    import sys

    for name in [m for m in sys.modules if m == "datasets" or m.startswith("datasets.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    err = refused(tmp_path, capsys, f"task.dataset={parquet}", "task.prompt_column=text")
    assert "pip install 'cory[datasets]'" in err


def test_dataset_keys_that_cannot_act_are_refused(tmp_path, capsys, parquet):
    assert "only act with task.dataset" in refused(tmp_path, capsys, "task.split=test")
    err = refused(tmp_path, capsys, f"task.dataset={parquet}", "task.answer_column=answer")
    assert "module:function" in err
    assert "has no effect" in refused(tmp_path, capsys, f"task.dataset={parquet}", "task.name=arithmetic")


def test_rows_with_equal_prompts_pass_their_own_answers_to_the_reward(tmp_path):
    """Two evaluation rows and two training rows share their prompt text but not their answer: each
    answer reaches the reward with its own row, through a group of 2 samples a prompt (TaskEnv) and
    the evaluation set."""
    import rewards_for_tests

    rows = {"text": ["Twin", "Twin", "Same opening", "Same opening", "Other", "Another"],
            "answer": ["e1", "e2", "a", "b", "c", "d"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "twins.parquet"))
    task = make_task(TaskConfig(name="prompts", dataset=str(tmp_path / "twins.parquet"), prompt_column="text",
                                answer_column="answer", reward="rewards_for_tests:record_answers", num_eval_prompts=2), seed=1)
    rewards_for_tests.ANSWERS_SEEN.clear()
    env = TaskEnv(task)
    prompts = env.reset(4, None, group_size=2)  # the whole epoch of training rows
    env.step(["x"] * len(prompts))
    task.score(task.eval_prompts, ["x"] * 2)
    trained, evaluated = rewards_for_tests.ANSWERS_SEEN
    expected = sorted((p, a) for p, a in zip(rows["text"][2:], rows["answer"][2:]) for _ in range(2))
    assert sorted(trained) == expected
    assert evaluated == [("Twin", "e1"), ("Twin", "e2")]


def test_a_split_of_an_arrow_folder_without_splits_is_refused(tmp_path, capsys, table):
    """save_to_disk of one Dataset has no splits: the default split reads it, another is refused."""
    table.save_to_disk(str(tmp_path / "single"))
    assert DatasetPrompts(str(tmp_path / "single"), prompt_column="text", num_eval=4).eval_prompts == table["text"][:4]
    err = refused(tmp_path, capsys, f"task.dataset={tmp_path / 'single'}", "task.prompt_column=text", "task.split=test")
    assert "task.split=test has no effect" in err and "without splits" in err


def test_num_train_prompts_with_a_dataset_is_refused(tmp_path, capsys, parquet):
    err = refused(tmp_path, capsys, f"task.dataset={parquet}", "task.prompt_column=text", "task.num_train_prompts=100")
    assert "task.num_train_prompts has no effect with task.dataset" in err
