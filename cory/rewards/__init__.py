"""Rewards: HF sequence classifiers (reward models, sentiment classifiers) and Python functions.

A reward is a callable `(prompts: list[str], responses: list[str]) -> list[float]`. `load_reward`
builds one from a spec string:
  - `cory:NAME`, a local folder: an `AutoModelForSequenceClassification`; the reward is the logit of
    the chosen label (a one-logit reward model: that logit);
  - `vader`: the VADER compound sentiment score in [-1, 1] (the `vaderSentiment` package: a
    lexicon-and-rules analyzer of English text; any tokenizer's text, no model);
  - `module:function`: a Python function with the reward signature (imported by name); with
    task.answer_column it is also given `answers=` (each prompt's reference answer, a list).
"""

from __future__ import annotations

import importlib
import math
import threading
from typing import Callable

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from cory import zoo
from cory.errors import UsageError
from cory.paths import is_dir, shown

RewardFn = Callable[[list[str], list[str]], list[float]]
CLASSIFIER_MAX_TOKENS = 512
"""A classifier scores at most this many tokens of a text (longer texts are cut at the end)."""


class RewardError(UsageError):
    """A reward spec that cannot be loaded, or a reward function that misbehaves."""


class ClassifierReward:
    """Scores texts with a sequence classifier; batched, no gradients."""

    def __init__(self, path: str, label: str = "positive", on: str = "prompt+response", batch_size: int = 64, device=None):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # transformers only warns (a warning the CLI mutes) when a folder lacks the classifier's
        # weights and initialises them at random: that is a wrong model, not a reward.
        self.model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        self.model.eval()
        if info.get("missing_keys"):
            raise RewardError(f"reward model {path} is not a trained sequence classifier: it lacks {sorted(info['missing_keys'])[0]}")
        if device is not None:
            self.model.to(device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = {k.lower(): v for k, v in (self.model.config.label2id or {}).items()}
        n = self.model.config.num_labels
        if n == 1:
            self.index = 0
        elif label.lower() in labels:
            self.index = int(labels[label.lower()])
        else:
            raise RewardError(f"reward label '{label}' is not one of {path}'s labels: {', '.join(labels)} (task.reward_label)")
        self.on = on
        self.batch_size = batch_size
        # Texts come from any policy's tokenizer and may be longer than this classifier ever saw:
        # keep their end (the response, and the last token a causal classifier reads), and no more
        # positions than it was trained on.
        self.tokenizer.truncation_side = "left"
        self.max_length = min(512, getattr(self.model.config, "max_position_embeddings", 512) or 512)

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """[N, num_labels] classifier logits."""
        out = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length)
            out.append(self.model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [p + r for p, r in zip(prompts, responses)] if self.on == "prompt+response" else list(responses)
        return self.logits(texts)[:, self.index].tolist()


class VaderReward:
    """The VADER compound score of each text: -1 (most negative) to 1 (most positive)."""

    def __init__(self, on: str = "prompt+response"):
        self.analyzer = SentimentIntensityAnalyzer()
        self.on = on

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [p + r for p, r in zip(prompts, responses)] if self.on == "prompt+response" else list(responses)
        return [float(self.analyzer.polarity_scores(t)["compound"]) for t in texts]


BUILTIN_REWARDS = {"vader": VaderReward}
"""Rewards named by a word: name -> class taking `on` (what text to score)."""


def _import_function(spec: str) -> RewardFn:
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward '{shown(spec)}': cannot import module '{shown(module_name)}' ({shown(str(e))})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward '{shown(spec)}': module '{shown(module_name)}' has no function '{shown(fn_name)}'")
    return fn


def _number(value, name: str) -> float:
    if isinstance(value, (str, bytes)) or value is None:
        raise RewardError(f"reward '{name}' returned {type(value).__name__} values; it must return one number per response")
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "biuf":
        raise RewardError(f"reward '{name}' returned a value of shape {array.shape} and type {array.dtype}; it must return one number per response")
    return float(array)


def call_with_timeout(fn, args: tuple, timeout: float, name: str):
    """fn(*args) in a daemon thread; a call that does not return within `timeout` seconds (0 = no
    limit) raises RewardError (the thread cannot be stopped; the process ends with the error)."""
    if not timeout:
        return fn(*args)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardError(f"reward '{name}' did not return within {timeout:g} s (task.reward_timeout)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def checked(fn: RewardFn, name: str, timeout: float = 0.0) -> RewardFn:
    """Wraps a reward so that an exception, a time-out, a wrong type or length, or a non-finite
    value fails with one line naming the reward."""

    def call(prompts: list[str], responses: list[str]) -> list[float]:
        try:
            result = call_with_timeout(fn, (prompts, responses), timeout, name)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001  (the user's function: any failure is reported in one line)
            raise RewardError(f"reward '{name}' raised {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
        if result is None or isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
            raise RewardError(f"reward '{name}' returned {type(result).__name__}; it must return a list of one number per response")
        if getattr(result, "ndim", 1) != 1:
            raise RewardError(f"reward '{name}' returned an array of shape {tuple(result.shape)}; it must return one number per response")
        values = [_number(v, name) for v in result]
        if len(values) != len(responses):
            raise RewardError(f"reward '{name}' returned {len(values)} values for {len(responses)} responses")
        if not all(math.isfinite(v) for v in values):
            raise RewardError(f"reward '{name}' returned a non-finite value")
        return values

    call.__wrapped__ = fn  # the reward object itself, for inspection
    return call


def is_function_spec(spec: str) -> bool:
    """Whether a reward spec names a Python `module:function` (not a cory: model or a folder)."""
    return not zoo.is_zoo_name(spec) and not is_dir(spec) and ":" in spec and not spec.startswith((".", "/"))


def dry_run(spec: str, prompts: list[str], timeout: float, answers: list | None = None) -> None:
    """Calls a reward function once on a dry sample (two prompts, two made-up responses; with
    `answers`, the prompts' answers too), so that a function that fails, hangs or returns the wrong
    thing stops the command before any work."""
    fn = _import_function(spec)
    prompts = (list(prompts) * 2)[:2]
    if answers is not None:
        given = dict(zip(prompts, (list(answers) * 2)[:2]))
        fn = with_answers(fn, lambda ps: [given[p] for p in ps])
    checked(fn, spec, timeout)(prompts, [" and it was good.", ""])


def with_answers(fn, answers: Callable[[list[str]], list]) -> RewardFn:
    """A reward `fn(prompts, responses, answers=...)` as a `RewardFn`: `answers(prompts)` gives each
    prompt's reference answer (task.answer_column)."""

    def call(prompts: list[str], responses: list[str]) -> list[float]:
        return fn(prompts, responses, answers=answers(prompts))

    return call


def load_reward(spec: str, label: str = "positive", on: str = "prompt+response", device=None, timeout: float = 0.0,
                answers: Callable[[list[str]], list] | None = None) -> RewardFn:
    """A checked reward callable from a spec (see the module docstring). `answers`: for a
    `module:function` reward, the function is called with `answers=answers(prompts)` too."""
    if answers is not None and not is_function_spec(spec):
        raise RewardError(f"reward '{shown(spec)}' takes no answers: task.answer_column needs a module:function reward")
    if spec in BUILTIN_REWARDS:
        return checked(BUILTIN_REWARDS[spec](on), spec)
    if zoo.is_zoo_name(spec):
        return checked(ClassifierReward(zoo.resolve(spec), label, on, device=device), spec)
    if is_dir(spec):
        return checked(ClassifierReward(spec, label, on, device=device), spec)
    if ":" in spec and not spec.startswith((".", "/")):
        fn = _import_function(spec)
        return checked(with_answers(fn, answers) if answers is not None else fn, spec, timeout)
    raise RewardError(f"reward '{shown(spec)}' is neither {', '.join(BUILTIN_REWARDS)}, a classifier folder, a cory: model, nor a module:function")


def validate_spec(spec: str) -> None:
    """Cheap checks before any work: the folder exists, the zoo name is known, the function imports."""
    if spec in BUILTIN_REWARDS:
        return
    if zoo.is_zoo_name(spec):
        if spec not in {m["name"] for m in zoo.list_models()}:
            raise zoo.UnknownModelError(spec)
        return
    if is_dir(spec):
        return
    if ":" in spec and not spec.startswith((".", "/")):
        _import_function(spec)
        return
    raise RewardError(f"reward '{shown(spec)}' is neither {', '.join(BUILTIN_REWARDS)}, a classifier folder, a cory: model, nor a module:function")
