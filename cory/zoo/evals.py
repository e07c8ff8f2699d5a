"""Corpus-specific evaluations of a freshly trained zoo causal LM, run at the end of its build.

Every causal LM gets its held-out loss (in ``train``); ``LM_EVALS`` adds, per corpus, what says
whether the model is fit for its task: for reviews, whether sampled continuations use the
grammar's words and stop; for arithmetic, how often greedy and sampled answers are right; for agent
transcripts, how often answers name a legal action and which bandit arms they pick; for
teacher-student dialogues, how the student replies to each kind of teacher turn. A corpus without
an entry gets the held-out loss only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from cory.corpora import arithmetic, dialogue, reviews
from cory.envs import transcripts
from cory.zoo.tokenizer import EOS_ID, PAD_ID

# Generation batch: a few hundred prompts at once stay well inside memory on any CPU.
BATCH = 128


@dataclass(frozen=True)
class LmEval:
    max_new_tokens: int
    """The token budget of the saved generation config (and of the evaluation's samples)."""
    run: Callable[..., tuple[dict, list[str]]]
    """``run(model, tokenizer, corpus_spec, max_new_tokens, log) -> (metrics, sample texts)``."""


def generation_config(max_new_tokens: int, greedy: bool = False) -> GenerationConfig:
    """Plain sampling from the model's own distribution (no top-k: on-policy RL that reuses the
    defaults assumes exactly this distribution), or greedy decoding; both stop at ``<eos>``."""
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "top_k": 0}
    return GenerationConfig(
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=max_new_tokens,
        **sampling,
    )


@torch.no_grad()
def complete(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str], config: GenerationConfig,
    seed: int = 0,
) -> tuple[list[str], list[bool]]:
    """The decoded continuation of each prompt (left-padded batches of BATCH) and whether it ended
    with ``<eos>`` within the budget. Sampling is seeded by ``seed``."""
    torch.manual_seed(seed)
    texts, ended = [], []
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), BATCH):
            batch = tokenizer(prompts[start : start + BATCH], return_tensors="pt", padding=True)
            response = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(response, skip_special_tokens=True)
            ended += (response == EOS_ID).any(dim=1).tolist()
    finally:
        tokenizer.padding_side = "right"
    return texts, ended


# ---------------------------------------------------------------------------------------------
# Reviews
# ---------------------------------------------------------------------------------------------


def known_word_fraction(texts: list[str]) -> float:
    """The fraction of the words of ``texts`` that the review grammar can produce."""
    vocabulary = reviews.vocabulary()
    found = [word in vocabulary for text in texts for word in reviews.words(text)]
    return sum(found) / max(len(found), 1)


def review_samples(model, tokenizer, spec, max_new_tokens, log) -> tuple[dict, list[str]]:
    """24 sampled continuations of held-out review openings: known words and the ``<eos>`` rate."""
    prompts = reviews.prompts(24, spec.eval_seed)
    responses, ended = complete(model, tokenizer, prompts, generation_config(max_new_tokens), seed=0)
    samples = [p + r for p, r in zip(prompts, responses)]
    metrics = {
        "sample_known_words": round(known_word_fraction(samples), 4),
        "sample_eos_rate": round(sum(ended) / len(ended), 4),
    }
    log(f"{len(samples)} samples: {metrics['sample_known_words']:.1%} known words, "
        f"{metrics['sample_eos_rate']:.0%} ended with <eos>")
    for text in samples[:6]:
        log(f"sample: {text}")
    return metrics, samples[:6]


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------


def accuracy(problems: list[arithmetic.Problem], responses: list[str]) -> dict:
    """Overall accuracy, by kind, and by tier (easy: one-digit operands; hard: the rest)."""
    right = [arithmetic.is_correct(r, p.truth) for p, r in zip(problems, responses)]
    groups = collections.defaultdict(list)
    for problem, ok in zip(problems, right):
        groups[problem.kind].append(ok)
        groups["easy" if problem.easy else "hard"].append(ok)
    ordered = [k for k in (*arithmetic.KINDS, "easy", "hard") if k in groups]
    return {
        "all": round(sum(right) / len(right), 4),
        **{k: round(sum(groups[k]) / len(groups[k]), 4) for k in ordered},
    }


def arithmetic_accuracy(model, tokenizer, spec, max_new_tokens, log) -> tuple[dict, list[str]]:
    """Accuracy on held-out problems with greedy decoding and with one plain sample (T=1) each,
    up to ``max_new_tokens``; the reward's rule: the last number of the answer is the truth."""
    problems = arithmetic.heldout_problems(spec.n_eval, spec.eval_seed)
    prompts = [p.prompt for p in problems]
    greedy, greedy_ended = complete(model, tokenizer, prompts, generation_config(max_new_tokens, greedy=True))
    sampled, _ = complete(model, tokenizer, prompts, generation_config(max_new_tokens), seed=0)
    by_greedy, by_sample = accuracy(problems, greedy), accuracy(problems, sampled)
    metrics = {
        "greedy_accuracy": by_greedy["all"],
        "sampled_accuracy": by_sample["all"],
        "greedy_accuracy_by_kind": by_greedy,
        "sampled_accuracy_by_kind": by_sample,
        "greedy_eos_rate": round(sum(greedy_ended) / len(greedy_ended), 4),
        "heldout_problems": len(problems),
    }
    log(f"held-out accuracy on {len(problems)} problems: greedy {by_greedy['all']:.3f}, "
        f"sampled (T=1) {by_sample['all']:.3f}; greedy ended with <eos> {metrics['greedy_eos_rate']:.0%}")
    log(f"greedy accuracy by kind: {_cells(by_greedy)}")
    log(f"sampled accuracy by kind: {_cells(by_sample)}")
    samples = [p + r for p, r in zip(prompts, sampled)]
    for problem, text in zip(problems[:6], samples):
        log(f"sample (truth {problem.truth}): {text!r}")
    return metrics, samples[:6]


def _cells(by_kind: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items() if k != "all")


# ---------------------------------------------------------------------------------------------
# Agent transcripts
# ---------------------------------------------------------------------------------------------


def agent_decisions(model, tokenizer, spec, max_new_tokens, log) -> tuple[dict, list[str]]:
    """Held-out decisions answered greedily and with one plain sample (T=1): valid-action rates and
    the bandit choices (`transcripts.decision_stats`), next to the same statistics of the
    transcripts' own answers."""
    decisions = transcripts.heldout_transcripts(spec.n_eval, spec.eval_seed)
    prompts = [d.prompt for d in decisions]
    greedy, _ = complete(model, tokenizer, prompts, generation_config(max_new_tokens, greedy=True))
    sampled, ended = complete(model, tokenizer, prompts, generation_config(max_new_tokens), seed=0)
    metrics = {
        "greedy": transcripts.decision_stats(decisions, greedy),
        "sampled": transcripts.decision_stats(decisions, sampled),
        "corpus": transcripts.decision_stats(decisions, [d.response for d in decisions]),
        "sampled_eos_rate": round(sum(ended) / len(ended), 4),
        "heldout_decisions": len(decisions),
    }
    for name in ("greedy", "sampled", "corpus"):
        m = metrics[name]
        log(f"{name}: valid {m['valid_rate']:.3f} (bandit {m['valid_rate_bandit']:.3f}, tic-tac-toe "
            f"{m['valid_rate_tictactoe']:.3f}); bandit picks F_f {m['F_f']:.2f} F_g {m['F_g']:.2f} "
            f"F_o {m['F_o']:.2f}, untried {m['untried']:.2f}")
    samples = [p[-160:] + r for p, r in zip(prompts, sampled)]
    for text in samples[:4]:
        log(f"sample: {text!r}")
    return metrics, samples[:6]


# ---------------------------------------------------------------------------------------------
# Teacher-student dialogues
# ---------------------------------------------------------------------------------------------

# The student's temperature in cory/TeacherStudent-v0.
STUDENT_TEMPERATURE = 0.3


def reply_stats(replies: list[str]) -> dict:
    """Shares of ``replies`` that are near-empty (at most one word of letters) and that use a
    positive or a negative word of the dialogue corpus."""
    positive, negative = set(dialogue.POSITIVE_WORDS), set(dialogue.NEGATIVE_WORDS)
    found = [set(w.lower() for w in dialogue.letter_words(r)) for r in replies]
    n = max(len(replies), 1)
    return {
        "near_empty": round(sum(dialogue.is_near_empty(r) for r in replies) / n, 4),
        "positive_word": round(sum(bool(f & positive) for f in found) / n, 4),
        "negative_word": round(sum(bool(f & negative) for f in found) / n, 4),
    }


def dialogue_replies(model, tokenizer, spec, max_new_tokens, log) -> tuple[dict, list[str]]:
    """The student's replies to held-out teacher turns of each kind (warm, harsh, plain, silent,
    odd), sampled at the environment's temperature and cut at the end of the line, next to the
    corpus's own replies to the same turns (see ``reply_stats``)."""
    prompts: dict[str, list[tuple[str, str]]] = {kind: [] for kind in dialogue.KINDS}
    for d in dialogue.heldout_dialogues(spec.n_eval, spec.eval_seed):
        context = dialogue.lesson_line(d.lesson)
        for e in d.exchanges:
            prompt = context + dialogue.teacher_line(e.teacher) + dialogue.STUDENT
            if len(prompts[e.kind]) < 64:
                prompts[e.kind].append((prompt, e.reply))
            context = prompt + e.reply + "\n"
    config = generation_config(max_new_tokens)
    config.temperature = STUDENT_TEMPERATURE
    metrics, samples = {}, []
    for kind, pairs in prompts.items():
        texts, _ = complete(model, tokenizer, [p for p, _ in pairs], config, seed=0)
        replies = [t.split("\n")[0] for t in texts]
        metrics[kind] = {"sampled": reply_stats(replies), "corpus": reply_stats([r for _, r in pairs]), "n": len(pairs)}
        m = metrics[kind]
        log(f"replies to {kind} turns ({len(pairs)}): near-empty {m['sampled']['near_empty']:.2f} "
            f"(corpus {m['corpus']['near_empty']:.2f}), positive word {m['sampled']['positive_word']:.2f} "
            f"(corpus {m['corpus']['positive_word']:.2f}), negative word {m['sampled']['negative_word']:.2f} "
            f"(corpus {m['corpus']['negative_word']:.2f})")
        samples += [pairs[0][0][-120:] + replies[0]] if pairs else []
    for text in samples:
        log(f"sample: {text!r}")
    return metrics, samples


LM_EVALS: dict[str, LmEval] = {
    "reviews": LmEval(max_new_tokens=48, run=review_samples),
    # A two-step worked answer is ~30 tokens.
    "arithmetic": LmEval(max_new_tokens=32, run=arithmetic_accuracy),
    # "\nACTION=purple" and <eos> are 5 tokens.
    "agent": LmEval(max_new_tokens=8, run=agent_decisions),
    # A student reply is at most ~20 tokens.
    "dialogue": LmEval(max_new_tokens=24, run=dialogue_replies),
}
# A corpus without its own evaluation: the held-out loss alone.
DEFAULT = LmEval(max_new_tokens=48, run=lambda *args: ({}, []))


def lm_eval(corpus: str) -> LmEval:
    """The evaluation of a causal LM pretrained on ``corpus``."""
    return LM_EVALS.get(corpus, DEFAULT)
