"""Prompts from a dataset (`task.dataset`), read as a stream through the `datasets` library.

`task.dataset` names a local parquet or JSONL file, a folder of such files (splits named by their
file names, as on the hub), an Arrow folder written by `save_to_disk`, or a hub id. Nothing is
converted or loaded whole: rows are read as the run needs them (`streaming=True`; an Arrow folder is
memory-mapped), so a dataset of any size costs the memory of a shuffle buffer.

The order of the rows:
    evaluation   the first `task.num_eval_prompts` rows of the split, in file order: the fixed
                 evaluation set, held out from training
    training     the rest, epoch after epoch; epoch e in the order of datasets' shuffle (shards in
                 a shuffled order, then a buffer of `SHUFFLE_BUFFER` rows) seeded by train.seed + e;
                 each process reads its own share of the rows (`split_dataset_by_node`)

`DatasetPrompts.state_dict` (the epoch and the rows read in it) is saved in each checkpoint, so a
resumed run reads on from the same row: its prompts are those of an uninterrupted run.

Every problem with the data (a path that does not exist, an unknown format or split, a missing
column, a split with no rows, a hub id that cannot be reached) is a one-line `TaskDataError`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from cory.paths import is_dir, is_file, shown
from cory.tasks.base import TaskDataError

if TYPE_CHECKING:
    from datasets import IterableDataset


def _library():
    """The `datasets` library: an optional dependency (`pip install 'cory[datasets]'`, in the dev extra),
    imported when a run names task.dataset."""
    try:
        import datasets
        import datasets.distributed
    except ImportError:
        raise TaskDataError("task.dataset needs the datasets library, which is not installed: "
                            "pip install 'cory[datasets]'") from None
    return datasets


FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
"""A local data file's suffix -> the `datasets` builder that reads it."""

SHUFFLE_BUFFER = 1000
"""Rows in the shuffle buffer of each training epoch."""

HUB_TIMEOUT = 10.0
"""Seconds to wait for the hub's answer about a dataset id."""

DEFAULT_SPLIT = "train"
"""The split read unless task.split names another (that of a single data file, as `datasets` names it)."""


class Row(str):
    """A prompt drawn from a dataset, carrying its row's answer (task.answer_column): prompts pass
    through the run as these very objects (repeated for a group, handed to the reward), so two rows
    with the same prompt text keep their own answers."""

    answer: object

    def __new__(cls, text: str, answer: object):
        row = super().__new__(cls, text)
        row.answer = answer
        return row

    def __reduce__(self):
        return Row, (str(self), self.answer)


def _reason(e: BaseException) -> str:
    return shown((str(e).splitlines() or [type(e).__name__])[0][:160])


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_FORMATS or spec.count("/") > 1


def open_split(spec: str, split: str = DEFAULT_SPLIT) -> IterableDataset:
    """The split `split` of the dataset `spec` as a stream (see the module docstring). An Arrow
    folder that holds one Dataset has no splits: another split than the default is refused."""
    path = Path(spec).expanduser()
    if is_file(path):
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise TaskDataError(f"task.dataset {shown(spec)}: a {path.suffix or 'suffix-less'} file is not a dataset; "
                                f"use {', '.join(FILE_FORMATS)}, a folder of them or an Arrow folder")
        return _split(_load(lambda: _library().load_dataset(builder, data_files=str(path), streaming=True), spec), spec, split)
    if is_dir(path):
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
            saved = _load(lambda: _library().load_from_disk(str(path)), spec)
            if isinstance(saved, _library().Dataset):
                if split != DEFAULT_SPLIT:
                    raise TaskDataError(f"task.split={shown(split)} has no effect: task.dataset {shown(spec)} holds one Dataset "
                                        f"without splits (saved by save_to_disk); leave task.split unset")
                return saved.to_iterable_dataset()
            return _split(saved, spec, split).to_iterable_dataset()
        return _split(_load(lambda: _library().load_dataset(str(path), streaming=True), spec), spec, split)
    if _looks_local(spec):
        raise TaskDataError(f"task.dataset not found: {shown(spec)}")
    # One request first: without a network the library would retry for half a minute.
    try:
        HfApi().dataset_info(spec, timeout=HUB_TIMEOUT)
    except RepositoryNotFoundError:
        raise TaskDataError(f"task.dataset '{shown(spec)}' is no local file or folder, nor a dataset on the hub") from None
    except Exception as e:  # noqa: BLE001  (no network, offline mode, a refused request: the library's own message)
        raise TaskDataError(f"task.dataset '{shown(spec)}' is no local file or folder, and the hub cannot be reached "
                            f"to read it ({_reason(e)})") from None
    return _split(_load(lambda: _library().load_dataset(spec, streaming=True), spec), spec, split)


def _load(load, spec: str):
    try:
        return load()
    except Exception as e:  # noqa: BLE001  (a damaged or unreadable file: the library's own message)
        raise TaskDataError(f"task.dataset {shown(spec)} cannot be read: {_reason(e)}") from None


def _split(splits, spec: str, split: str):
    if not isinstance(splits, (_library().DatasetDict, _library().IterableDatasetDict)):
        return splits
    if split not in splits:
        raise TaskDataError(f"task.dataset {shown(spec)} has no split '{shown(split)}' (splits: {', '.join(splits)}; task.split)")
    return splits[split]


class DatasetPrompts:
    """The prompts (and answers) of one split of a dataset: a fixed evaluation set and a stream of
    training rows in the run's order (module docstring). `draw(n)` reads the next n training
    prompts; `answers(prompts)` gives the answer column's value of prompts drawn in the latest batch
    or in the evaluation set. With an answer column, prompts are `Row`s that carry their own row's
    answer, so rows with equal prompts and different answers each pass on their own."""

    def __init__(self, spec: str, split: str = DEFAULT_SPLIT, prompt_column: str = "prompt", answer_column: str = "",
                 num_eval: int = 0, seed: int = 0, rank: int = 0, world: int = 1):
        self.spec, self.split, self.prompt_column, self.answer_column = spec, split, prompt_column, answer_column
        stream = open_split(spec, split)
        head = list(itertools.islice(stream, num_eval + 1))
        if not head:
            raise TaskDataError(f"task.dataset {shown(spec)}: split '{shown(split)}' has no rows")
        for column in filter(None, (prompt_column, answer_column)):
            if column not in head[0]:
                key = "task.prompt_column" if column == prompt_column else "task.answer_column"
                raise TaskDataError(f"task.dataset {shown(spec)}: no column '{shown(column)}' in split '{shown(split)}' "
                                    f"({key}; columns: {', '.join(map(str, head[0]))})")
        if len(head) <= num_eval:
            raise TaskDataError(f"task.dataset {shown(spec)}: split '{shown(split)}' has {len(head)} rows, all held out as the "
                                f"evaluation set (task.num_eval_prompts={num_eval}): none are left to train on")
        evals = [self._row(r) for r in head[:num_eval]]
        self.eval_prompts = [p for p, _ in evals]
        self.eval_answers = dict(evals)  # by text: only for a prompt passed as plain text
        train = stream.skip(num_eval)
        if world > 1:
            train = _library().distributed.split_dataset_by_node(train, rank=rank, world_size=world)
        self.train = train.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        self.epoch, self.taken = 0, 0
        self._rows = self._open()
        self.latest: dict[str, object] = {}

    def _row(self, row: dict) -> tuple[str, object]:
        """(prompt, answer) of a row; with an answer column the prompt is a `Row` carrying the answer."""
        prompt = row[self.prompt_column]
        if not isinstance(prompt, str):
            raise TaskDataError(f"task.dataset {shown(self.spec)}: column '{shown(self.prompt_column)}' holds "
                                f"{type(prompt).__name__} values, not text")
        if not self.answer_column:
            return prompt, None
        answer = row[self.answer_column]
        return Row(prompt, answer), answer

    def _open(self):
        """The training rows of the current epoch from row `taken` on."""
        self.train.set_epoch(self.epoch)
        return itertools.islice(iter(self.train), self.taken, None)

    def draw(self, n: int) -> list[str]:
        """The next n training prompts (a new epoch starts where one ends); rows with blank prompts
        are passed over."""
        out: list[tuple[str, object]] = []
        empty_epochs = 0  # epochs ended since the latest prompt: two in a row hold no prompt at all
        while len(out) < n:
            row = next(self._rows, None)
            if row is None:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise TaskDataError(f"task.dataset {shown(self.spec)}: this process's share of split '{shown(self.split)}' "
                                        "holds no training prompts")
                self.epoch, self.taken = self.epoch + 1, 0
                self._rows = self._open()
                continue
            self.taken += 1
            prompt, answer = self._row(row)
            if prompt.strip():
                out.append((prompt, answer))
                empty_epochs = 0
        self.latest = dict(out)
        return [p for p, _ in out]

    def answers(self, prompts: list[str]) -> list:
        """The answer column's value for each prompt (of the latest batch or the evaluation set): a
        `Row`'s own answer; a prompt passed as plain text is looked up by its text."""
        return [p.answer if isinstance(p, Row) else self.latest[p] if p in self.latest else self.eval_answers[p]
                for p in prompts]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self._rows = self._open()
