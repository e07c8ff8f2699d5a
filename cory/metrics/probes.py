"""Probes of how a model decides: frequency bias and the knowing-doing gap (arXiv 2504.16078).

Frequency bias: show the model a bandit history made by a random policy (2-10 steps) followed by the
last action repeated 0-100 times, score every action, and ask whether the model's top action is the
most frequent one (F_f), the greedy one with the best observed mean (F_g), or another (F_o). The
entropy of the action distribution shows how sure the model is.

Knowing-doing gap: ask the model to write the UCB value of every arm inside
`<ucb_values>...</ucb_values>` and then act. "Knowing": its top-UCB arm is the true one. "Doing":
its action is optimal (highest true UCB), greedy (best mean so far) or other.

Histories are lists of (action index, reward) pairs, oldest first.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cory.agents.bandit import ucb_index
from cory.envs.bandit import (History, arm_labels, classify_frequency_bias, counts_and_means, greedy_actions,
                              render_bandit_prompt)
from cory.envs.parsing import match_label, parse_action
from cory.envs.prompts import PromptOptions

ScoreActions = Callable[[str, list[str]], list[float]]
"""score_actions(prompt, action_texts) -> one log-likelihood per action text."""


# ---- frequency bias -----------------------------------------------------------------------------


def frequency_bias_history(
    means: Sequence[float],
    sigma: float,
    rng: np.random.Generator,
    n_random: int | None = None,
    n_repeats: int | None = None,
) -> list[tuple[int, float]]:
    """A probe history: `n_random` uniformly random pulls (default U{2..10}), then the last of them
    repeated `n_repeats` times (default U{0..100}); rewards ~ N(means[a], sigma)."""
    k = len(means)
    n_random = int(rng.integers(2, 11)) if n_random is None else n_random
    n_repeats = int(rng.integers(0, 101)) if n_repeats is None else n_repeats
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    actions = [int(a) for a in rng.integers(0, k, size=n_random)]
    actions += [actions[-1]] * n_repeats
    return [(a, float(rng.normal(means[a], sigma))) for a in actions]


def action_distribution(scores: Sequence[float]) -> np.ndarray:
    """[K] softmax of per-action log-likelihoods (the model's distribution over the action strings)."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s) | (s == -np.inf)) or np.all(s == -np.inf):
        raise ValueError(f"scores must be a non-empty list of finite log-likelihoods, got {scores!r}")
    p = np.exp(s - s.max())
    return p / p.sum()


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats (0 log 0 = 0)."""
    p = np.asarray(p, dtype=float)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def frequency_bias_rates(classes: Sequence[str]) -> dict[str, float]:
    """F_f, F_g, F_o: the fractions of probes classified frequent / greedy / other."""
    n = len(classes)
    if n == 0:
        raise ValueError("no probe results")
    return {f"F_{c[0]}": sum(x == c for x in classes) / n for c in ("frequent", "greedy", "other")}


def frequency_bias_by_repeats(
    results: Sequence[FrequencyBiasResult], edges: Sequence[int] = (0, 1, 11, 26, 51, 101)
) -> list[dict[str, float]]:
    """F_f, F_g, F_o and the mean action entropy of the probes whose repeat count lies in each bin
    [edges[i], edges[i+1]) (empty bins are left out): how the bias grows with repetition."""
    rows = []
    for lo, hi in itertools.pairwise(edges):
        mine = [r for r in results if lo <= r.n_repeats < hi]
        if mine:
            rows.append({"repeats_from": lo, "repeats_to": hi - 1, "probes": len(mine),
                         **frequency_bias_rates([r.label for r in mine]),
                         "entropy": float(np.mean([r.entropy for r in mine]))})
    return rows


@dataclass
class FrequencyBiasResult:
    n_repeats: int
    """How many times the last action was repeated."""
    chosen: int
    """The action with the highest score."""
    label: str
    """'frequent', 'greedy' or 'other'."""
    entropy: float
    """Entropy (nats) of the softmax over the action scores."""
    probs: list[float]


def run_frequency_bias_probe(
    score_actions: ScoreActions,
    n_probes: int,
    rng: np.random.Generator,
    n_arms: int = 10,
    variant: str = "button",
    sigma: float = 1.0,
    horizon: int = 200,
    options: PromptOptions = PromptOptions(cot=False),
    action_template: str = "ACTION={}",
) -> list[FrequencyBiasResult]:
    """Score `n_probes` fresh probe histories with the model and classify its top action.

    Each probe draws a new Gaussian bandit (means ~ U(0, 1)) and history, renders the bandit prompt
    (horizon large enough for 110 steps of history), and calls `score_actions(prompt, texts)` with
    one text per arm (`action_template` filled with the label). Summarise with
    `frequency_bias_rates([r.label for r in results])`.
    """
    labels = arm_labels(n_arms, variant)
    texts = [action_template.format(label) for label in labels]
    results = []
    for _ in range(n_probes):
        means = rng.uniform(0.0, 1.0, size=n_arms)
        n_random, n_repeats = int(rng.integers(2, 11)), int(rng.integers(0, 101))
        history = frequency_bias_history(means, sigma, rng, n_random, n_repeats)
        prompt = render_bandit_prompt(labels, variant, horizon, history, options)
        scores = score_actions(prompt, texts)
        if len(scores) != n_arms:
            raise ValueError(f"score_actions returned {len(scores)} scores for {n_arms} actions")
        probs = action_distribution(scores)
        chosen = int(np.argmax(probs))
        results.append(
            FrequencyBiasResult(n_repeats, chosen, classify_frequency_bias(chosen, history, n_arms), entropy(probs), probs.tolist())
        )
    return results


# ---- knowing-doing gap --------------------------------------------------------------------------

_UCB_BLOCK_RE = re.compile(r"<ucb_values>(.*?)</ucb_values>", re.IGNORECASE | re.DOTALL)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf(?:inity)?|∞"
_PAIR_RE = re.compile(rf"([A-Za-z0-9_]+)\s*[:=]\s*({_NUMBER})", re.IGNORECASE)


def _to_float(token: str) -> float:
    t = token.strip().lower().replace("∞", "inf")
    return float(t.replace("infinity", "inf"))


def parse_ucb_values(text: str, labels: Sequence[str]) -> dict[int, float] | None:
    """The per-arm numbers inside the LAST `<ucb_values>...</ucb_values>` block.

    Pairs look like `blue: 0.53`, `blue=0.53` or `3: inf`, separated by anything (commas, newlines).
    Unknown labels are skipped; a label given twice keeps its last value. Returns {arm index: value},
    or None when there is no complete block.
    """
    if not isinstance(text, str):
        return None
    blocks = _UCB_BLOCK_RE.findall(unicodedata.normalize("NFKC", text))
    if not blocks:
        return None
    values: dict[int, float] = {}
    for name, number in _PAIR_RE.findall(blocks[-1]):
        idx = match_label(name, labels)
        if idx is not None:
            values[idx] = _to_float(number)
    return values


def true_ucb_values(history: History, n_actions: int, alpha: float = 0.5) -> np.ndarray:
    """[K] the UCB index mean(a) + alpha * sqrt(ln t / N(a)) after `history` (t = its length);
    +inf for actions never taken. Same index as `cory.agents.UCB1Agent` with the same alpha."""
    counts, _ = counts_and_means(history, n_actions)
    sums = np.zeros(n_actions)
    for a, r in history:
        sums[a] += r
    return ucb_index(sums, counts.astype(float), alpha)


def knowing_doing_instructions(alpha: float = 0.5) -> str:
    """The extra instruction that asks for the UCB values before the action."""
    return (
        f"Before answering, compute the UCB value of every arm: UCB = mean reward + {alpha} * sqrt(ln(t) / n), "
        "where t is the number of steps so far and n the number of times the arm was chosen (an arm never "
        "chosen has UCB = inf). Write them as <ucb_values>arm1: value, arm2: value, ...</ucb_values>, "
        "then give your answer ACTION=X."
    )


def knowing_doing_prompt(
    labels: Sequence[str], variant: str, horizon: int, history: History, alpha: float = 0.5, cot: bool = True,
    window: int | None = None,
) -> str:
    """A bandit prompt whose closing question asks for `<ucb_values>` and then the action; `window`
    shows only the last steps of history (the per-arm summary always covers all of them)."""
    options = PromptOptions(cot=cot, history=window, summary=True, question=knowing_doing_instructions(alpha))
    return render_bandit_prompt(labels, variant, horizon, history, options)


@dataclass
class KnowingDoing:
    knowing: bool
    """The model's top-UCB arm is one of the true top-UCB arms."""
    doing: str
    """'optimal' (a true top-UCB arm), 'greedy' (a best-mean arm), 'other', or 'invalid' (no action)."""


def classify_knowing_doing(
    model_ucb: dict[int, float] | None, action: int | None, history: History, n_actions: int, alpha: float = 0.5
) -> KnowingDoing:
    """Compare a model's stated UCB values and its action with the truth after `history`.

    Knowing needs a unique top arm in the model's values (a tie names no arm). Optimal is checked
    before greedy: an arm that is both is the right choice, not a greedy slip.
    """
    true = true_ucb_values(history, n_actions, alpha)
    best = set(np.flatnonzero(true == true.max()).tolist())
    knowing = False
    if model_ucb:
        top = max(model_ucb.values())
        model_best = [a for a, v in model_ucb.items() if v == top]
        knowing = len(model_best) == 1 and model_best[0] in best
    if action is None:
        doing = "invalid"
    elif action in best:
        doing = "optimal"
    elif action in greedy_actions(history, n_actions):
        doing = "greedy"
    else:
        doing = "other"
    return KnowingDoing(knowing, doing)


def knowing_doing_rates(results: Sequence[KnowingDoing]) -> dict[str, float]:
    """The fraction of probes with a correct rationale ('knowing'), and among those the fractions of
    optimal / greedy / other / invalid actions (the paper: 87% knowing; of those 21% optimal, 58% greedy)."""
    if not results:
        raise ValueError("no probe results")
    knowing = [r for r in results if r.knowing]
    out = {"knowing": len(knowing) / len(results), "probes": len(results)}
    for c in ("optimal", "greedy", "other", "invalid"):
        out[f"{c}_given_knowing"] = sum(r.doing == c for r in knowing) / len(knowing) if knowing else math.nan
        out[c] = sum(r.doing == c for r in results) / len(results)
    return out


def run_knowing_doing_probe(
    respond: Callable[[list[str]], list[str]],
    n_probes: int,
    rng: np.random.Generator,
    n_arms: int = 10,
    variant: str = "button",
    sigma: float = 1.0,
    horizon: int = 50,
    alpha: float = 0.5,
    cot: bool = True,
    window: int | None = None,
    steps: tuple[int, int] = (5, 30),
) -> list[KnowingDoing]:
    """Ask for UCB values and an action after `n_probes` fresh histories, and classify the answers.

    Each probe draws a Gaussian bandit (means ~ U(0, 1)) and a uniformly random history of
    U{steps[0]..steps[1]} pulls, renders `knowing_doing_prompt`, and `respond(prompts)` answers all
    prompts at once (one text each). Summarise with `knowing_doing_rates`.
    """
    labels = arm_labels(n_arms, variant)
    histories, prompts = [], []
    for _ in range(n_probes):
        means = rng.uniform(0.0, 1.0, size=n_arms)
        arms = rng.integers(0, n_arms, size=int(rng.integers(steps[0], steps[1] + 1)))
        history = [(int(a), float(rng.normal(means[a], sigma))) for a in arms]
        histories.append(history)
        prompts.append(knowing_doing_prompt(labels, variant, horizon, history, alpha, cot, window))
    responses = respond(prompts)
    if len(responses) != n_probes:
        raise ValueError(f"respond returned {len(responses)} answers for {n_probes} prompts")
    return [
        classify_knowing_doing(parse_ucb_values(text, labels), parse_action(text, labels), history, n_arms, alpha)
        for text, history in zip(responses, histories)
    ]
