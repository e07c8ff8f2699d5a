"""Turning a zoo recipe into an HF model folder: corpus, tokenizer, Llama model, training, eval.

Everything is seeded from the recipe and runs on the CPU with a fixed data order, so a recipe
builds the same weights each time on a given machine, torch version and thread count.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from cory import corpora
from cory.zoo import evals, registry
from cory.corpora import reviews
from cory.zoo.tokenizer import EOS_ID, PAD_ID, train_tokenizer

logger = logging.getLogger("cory.zoo")

ID2LABEL = {0: "negative", 1: "positive"}
# Soft targets [p(negative), p(positive)] per corpus label.
SOFT_TARGETS = {"negative": (1.0, 0.0), "neutral": (0.5, 0.5), "positive": (0.0, 1.0)}


class BuildLog:
    """Collects the build's report lines: to the logger, to the console (when showing progress),
    and to ``build.log`` in the folder."""

    def __init__(self, name: str, echo: bool):
        self.name, self.echo, self.lines = name, echo, []

    def __call__(self, message: str) -> None:
        line = f"{self.name}: {message}"
        self.lines.append(line)
        logger.info(line)
        if self.echo:  # on stderr with the progress bars: stdout stays the command's own (`cory eval --json`)
            tqdm.write(line, file=sys.stderr)


def write_model(entry: registry.ZooEntry, folder: pathlib.Path, progress: bool) -> None:
    """Builds ``entry`` into the empty ``folder``: weights, config, tokenizer, zoo_info.json."""
    start = time.perf_counter()
    recipe = entry.recipe
    log = BuildLog(entry.name, echo=progress)
    with _build_context(recipe.train.seed):
        texts, labels = training_data(recipe)
        tokenizer = build_tokenizer(recipe)
        # Saved before any use: encoding with padding leaves padding state in the backend.
        tokenizer.save_pretrained(folder)
        token_lists = tokenizer(texts)["input_ids"]
        if recipe.kind == "causal-lm":
            model, info = _build_causal_lm(entry, tokenizer, token_lists, log, progress)
        else:
            model, info = _build_classifier(entry, tokenizer, token_lists, labels, log, progress)
    model.save_pretrained(folder)
    info.update(registry.build_info(entry, model, time.perf_counter() - start, corpus=corpus_stats(texts, labels, token_lists)))
    log(f"built in {info['build_seconds']:.1f} s ({info['params']:,} params)")
    (folder / "build.log").write_text("\n".join(log.lines) + "\n")
    (folder / "zoo_info.json").write_text(json.dumps(info, indent=2) + "\n")


BUILD_THREADS = 1


def build_threads() -> int:
    """Torch threads for a build: always one.

    Float reductions are summed in a different order with a different thread count, so a fixed
    count is what makes a build bit-reproducible on every machine. One thread also avoids the
    spin-waiting of oversubscribed OpenMP threads on a busy machine (a 2-thread build on a 2-core
    machine that is already running a job stepped up to 10x slower), and these models are small.
    """
    return BUILD_THREADS


@contextlib.contextmanager
def _build_context(seed: int) -> Iterator[None]:
    """Seeds torch and sets its threads for the build, restoring the caller's RNG and threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(build_threads())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def training_data(recipe: registry.Recipe) -> tuple[list[str], list[str] | None]:
    """The recipe's training texts, and their labels for a classifier (None for a causal LM)."""
    spec = recipe.corpus
    corpus = registry.corpus_module(spec.name)
    if recipe.kind == "classifier":
        pairs = corpus.generate(spec.n_train, spec.seed)  # a labelled corpus: (text, label) pairs
        return [text for text, _ in pairs], [label for _, label in pairs]
    return corpus.pretraining_texts(spec.n_train, spec.seed), None


def build_tokenizer(recipe: registry.Recipe) -> PreTrainedTokenizerFast:
    """The recipe's tokenizer, trained on the first ``tokenizer.n_texts`` pretraining texts of its
    corpus."""
    spec = recipe.tokenizer
    texts = registry.corpus_module(recipe.corpus.name).pretraining_texts(spec.n_texts, recipe.corpus.seed)
    return train_tokenizer(texts, spec.vocab_size, recipe.model.max_positions)


def corpus_stats(texts: list[str], labels: list[str] | None, token_lists: list[list[int]]) -> dict:
    """Sizes of the training corpus (``token_lists``: its tokenized texts): texts, words, distinct
    words, tokens, and labels for a labelled corpus."""
    n_tokens = [len(ids) for ids in token_lists]
    distinct = set()
    for text in texts:
        distinct.update(corpora.words(text))
    stats = {
        "texts": len(texts),
        "words": sum(len(text.split()) for text in texts),
        "distinct_words": len(distinct),
        "tokens": sum(n_tokens),
        "mean_tokens_per_text": round(statistics.mean(n_tokens), 2),
        "max_tokens_per_text": max(n_tokens),
    }
    if labels is not None:
        stats["labels"] = dict(sorted(collections.Counter(labels).items()))
    return stats


def llama_config(recipe: registry.Recipe, tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    """The LlamaConfig of the recipe's shape, with the tokenizer's special-token ids."""
    shape = recipe.model
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        **extra,
    )


def train_steps(
    model: PreTrainedModel,
    batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor],
    spec: registry.TrainSpec,
    desc: str,
    progress: bool,
) -> list[float]:
    """``spec.steps`` AdamW steps (warmup, then cosine decay to 0) over ``batches``; the losses."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: decaying them only hurts
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, spec.warmup_steps, spec.steps)
    model.train()
    losses = []
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False, unit="step")
    for step in bar:
        loss = loss_fn(model, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{statistics.mean(losses[-10:]):.3f}")
    model.eval()
    return losses


def train_summary(losses: list[float], seconds: float) -> dict:
    """What the build records about training: steps, final loss (last 20 steps), time."""
    return {
        "steps": len(losses),
        "final_loss": round(statistics.mean(losses[-20:]), 4),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / len(losses), 4),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------------------------


def pack_rows(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    """Packs ``ids + [<eos>]`` of each text into rows of ``seq_len`` tokens.

    A row takes whole texts and then the start of the next one, cut at the row's end (that
    text's rest is dropped, and the next row starts with the text after it). So no compute
    goes to padding, and every row starts at the start of a text: the model learns to open a
    text both with no context and right after an ``<eos>``. Only the last row is padded.
    Returns ``[rows, seq_len]`` token ids.
    """
    rows, row = [], []
    for ids in token_lists:
        row += ids + [EOS_ID]
        if len(row) >= seq_len:
            rows.append(row[:seq_len])
            row = []
    if row:
        rows.append(row + [PAD_ID] * (seq_len - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def lm_batches(token_lists: list[list[int]], spec: registry.TrainSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Endless ``{"input_ids", "attention_mask"}`` batches ``[batch, seq_len]``: each epoch
    shuffles the texts (seeded by ``spec.seed`` and the epoch), packs them, walks the rows."""
    epoch = 0
    while True:
        order = torch.randperm(len(token_lists), generator=torch.Generator().manual_seed(spec.seed + epoch))
        rows = pack_rows([token_lists[i] for i in order.tolist()], spec.seq_len)
        for start in range(0, len(rows) - spec.batch_size + 1, spec.batch_size):
            ids = rows[start : start + spec.batch_size]
            yield {"input_ids": ids, "attention_mask": (ids != PAD_ID).long()}
        epoch += 1


def lm_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-pad tokens (``<eos>`` included)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss


@torch.no_grad()
def lm_eval_loss(model: PreTrainedModel, token_lists: list[list[int]], seq_len: int) -> float:
    """Mean next-token loss per token on packed held-out texts."""
    rows = pack_rows(token_lists, seq_len)
    total, count = 0.0, 0
    for start in range(0, len(rows), 64):
        ids = rows[start : start + 64]
        mask = (ids != PAD_ID).long()
        n = int(mask[:, 1:].sum())
        total += lm_loss(model, {"input_ids": ids, "attention_mask": mask}).item() * n
        count += n
    return total / count


def _build_causal_lm(entry, tokenizer, token_lists, log, progress):
    recipe = entry.recipe
    model = LlamaForCausalLM(llama_config(recipe, tokenizer))
    start = time.perf_counter()
    losses = train_steps(
        model, lm_batches(token_lists, recipe.train), lm_loss, recipe.train, entry.name, progress
    )
    train = train_summary(losses, time.perf_counter() - start)
    spec = recipe.corpus
    heldout = registry.corpus_module(spec.name).heldout_texts(spec.n_eval, spec.eval_seed)
    eval_loss = lm_eval_loss(model, tokenizer(heldout)["input_ids"], recipe.train.seq_len)
    log(f"trained {train['steps']} steps in {train['seconds']:.1f} s ({train['threads']} threads); "
        f"train loss {train['final_loss']:.3f}, held-out loss {eval_loss:.3f} per token on "
        f"{len(heldout)} texts")
    corpus_eval = evals.lm_eval(spec.name)
    metrics, samples = corpus_eval.run(model, tokenizer, spec, corpus_eval.max_new_tokens, log)
    # The saved defaults: plain sampling. Set after the evaluation, whose greedy decoding would
    # otherwise inherit (and warn about) top_k=0.
    model.generation_config = evals.generation_config(corpus_eval.max_new_tokens)
    metrics = {"heldout_loss": round(eval_loss, 4), "heldout_texts": len(heldout), **metrics}
    return model, {"eval": metrics, "train": train, "samples": samples}


# ---------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------


def soft_label_loss(logits: torch.Tensor, targets: torch.Tensor, center_penalty: float) -> torch.Tensor:
    """Soft-label cross-entropy plus ``center_penalty * mean((logit0 + logit1)**2)``.

    ``logits``, ``targets``: ``[batch, 2]``. The penalty pins ``logit0 = -logit1``, so the
    positive logit is half the log-odds and a neutral text (target 0.5/0.5) scores about 0.
    """
    cross_entropy = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return cross_entropy + center_penalty * logits.sum(-1).pow(2).mean()


def classifier_batches(
    token_lists: list[list[int]], labels: list[str], spec: registry.TrainSpec
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless ``{"input_ids", "attention_mask" [batch, len], "targets" [batch, 2]}`` batches of
    right-padded reviews (no special tokens, as a caller would tokenize text).

    Each epoch shuffles the reviews, sorts each run of 16 batches by length (so a batch pads to
    similar lengths: about a third less compute), and shuffles the batches.
    """
    targets = torch.tensor([SOFT_TARGETS[label] for label in labels])
    bucket = 16 * spec.batch_size
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(spec.seed + epoch)
        order = torch.randperm(len(token_lists), generator=generator).tolist()
        batches = []
        for start in range(0, len(order) - bucket + 1, bucket):
            run = sorted(order[start : start + bucket], key=lambda i: len(token_lists[i]))
            batches += [run[b : b + spec.batch_size] for b in range(0, bucket, spec.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            index = batches[b]
            ids, mask = pad_right([token_lists[i][: spec.seq_len] for i in index])
            yield {"input_ids": ids, "attention_mask": mask, "targets": targets[index]}
        epoch += 1


def pad_right(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``[len(token_lists), longest]``, padded on the right."""
    longest = max(len(ids) for ids in token_lists)
    ids = torch.full((len(token_lists), longest), PAD_ID, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, (ids != PAD_ID).long()


@torch.no_grad()
def classifier_logits(model: PreTrainedModel, token_lists: list[list[int]]) -> torch.Tensor:
    """The ``[negative, positive]`` logits of each review, ``[len(token_lists), 2]``."""
    out = []
    for start in range(0, len(token_lists), 128):
        ids, mask = pad_right(token_lists[start : start + 128])
        out.append(model(input_ids=ids, attention_mask=mask).logits)
    return torch.cat(out)


def probe_accuracy(model, tokenizer) -> float:
    """Accuracy on one-sentence probes "The plot is <adjective>." over every positive and
    negative adjective of the grammar: does the reward model know each word it may be shown?"""
    probes = [(f"The plot is {adj}.", 1) for adj in reviews.POSITIVE_ADJECTIVES]
    probes += [(f"The plot is {adj}.", 0) for adj in reviews.NEGATIVE_ADJECTIVES]
    logits = classifier_logits(model, tokenizer([text for text, _ in probes])["input_ids"])
    return float((logits.argmax(-1) == torch.tensor([label for _, label in probes])).float().mean())


def classifier_eval(model, tokenizer, heldout: list[tuple[str, str]]) -> dict:
    """Held-out accuracy on positive/negative reviews, pairwise ordering, neutral scores, probes.
    (The review corpus is the only labelled one so far; its labels and probes are used here.)"""
    logits = classifier_logits(model, tokenizer([text for text, _ in heldout])["input_ids"])
    by_label = {
        label: logits[torch.tensor([lab == label for _, lab in heldout])] for label in reviews.LABELS
    }
    # Accuracy from the argmax; the pairwise order and means from the positive logit (the reward).
    correct = int((by_label["positive"].argmax(-1) == 1).sum() + (by_label["negative"].argmax(-1) == 0).sum())
    pos, neg = by_label["positive"][:, 1], by_label["negative"][:, 1]
    return {
        "heldout_accuracy": round(correct / (len(pos) + len(neg)), 4),
        "heldout_pairwise": round(float((pos[:, None] > neg[None, :]).float().mean()), 4),
        "heldout_pos_neg_reviews": len(pos) + len(neg),
        "probe_accuracy": round(probe_accuracy(model, tokenizer), 4),
        "mean_positive_logit": {
            label: round(float(by_label[label][:, 1].mean()), 3) for label in reviews.LABELS
        },
    }


def _build_classifier(entry, tokenizer, token_lists, labels, log, progress):
    recipe = entry.recipe
    heldout = registry.corpus_module(recipe.corpus.name).heldout(recipe.corpus.n_eval, recipe.corpus.eval_seed)
    config = llama_config(
        recipe, tokenizer, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    model = LlamaForSequenceClassification(config)
    penalty = recipe.train.center_penalty

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return soft_label_loss(logits, batch["targets"], penalty)

    batches = classifier_batches(token_lists, labels, recipe.train)
    start = time.perf_counter()
    losses = train_steps(model, batches, loss_fn, recipe.train, entry.name, progress)
    train = train_summary(losses, time.perf_counter() - start)
    metrics = classifier_eval(model, tokenizer, heldout)
    log(f"trained {train['steps']} steps in {train['seconds']:.1f} s ({train['threads']} threads); "
        f"train loss {train['final_loss']:.3f}")
    log(
        f"held-out accuracy {metrics['heldout_accuracy']:.3f} on {metrics['heldout_pos_neg_reviews']} "
        f"positive/negative reviews (pairwise {metrics['heldout_pairwise']:.3f}); one-adjective "
        f"probes {metrics['probe_accuracy']:.3f}; mean positive logit by label "
        f"{metrics['mean_positive_logit']}"
    )
    info = {"eval": metrics, "train": train}
    return model, info
