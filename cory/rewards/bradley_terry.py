"""Reward models from preference pairs (the InstructGPT recipe): a Bradley-Terry pairwise model.

Each row is `{prompt, chosen, rejected}`. The model r(x) is an `AutoModelForSequenceClassification`
with one logit; training maximises log sigmoid(r(prompt + chosen) - r(prompt + rejected)), i.e. the
probability that the preferred answer wins under the Bradley-Terry model. Held-out pairwise accuracy
is the share of held-out pairs the model orders correctly. The result is an ordinary HF folder that
`task.reward` accepts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cory import zoo
from cory.corpora import reviews
from cory.errors import UsageError
from cory.jsonl import jsonl_rows


class PairDataError(UsageError):
    """A preference file that cannot be used."""


def load_pairs(path: str | Path) -> list[dict]:
    """Rows {prompt, chosen, rejected} from a JSONL file; `prompt` may be empty."""
    rows = [
        {"prompt": str(row.get("prompt", "")), "chosen": str(row["chosen"]), "rejected": str(row["rejected"])}
        for _, row in jsonl_rows(Path(path), PairDataError, ("chosen", "rejected"), "preference file")
    ]
    if len(rows) < 2:
        raise PairDataError(f"{path}: need at least 2 pairs, found {len(rows)}")
    return rows


@dataclass
class RMTrainConfig:
    base: str = "cory:tiny-reviews"
    """The model the reward model starts from (its trunk; the one-logit head is new)."""
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    eval_fraction: float = 0.1
    seed: int = 0
    max_length: int = 128


def _scores(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return model(**enc).logits[:, 0]


def pairwise_accuracy(model, tokenizer, pairs: list[dict], max_length: int = 128, batch_size: int = 64) -> float:
    """Share of pairs with r(chosen) > r(rejected)."""
    if not pairs:
        return float("nan")
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            c = _scores(model, tokenizer, [p["prompt"] + p["chosen"] for p in chunk], max_length)
            r = _scores(model, tokenizer, [p["prompt"] + p["rejected"] for p in chunk], max_length)
            right += int((c > r).sum())
    return right / len(pairs)


def train_reward_model(pairs: list[dict], output_dir: str | Path, cfg: RMTrainConfig, progress: bool = True) -> dict:
    """Fits the model, saves it to output_dir, returns {train_pairs, eval_pairs, eval_accuracy, ...}."""
    torch.manual_seed(cfg.seed)
    rows = list(pairs)
    random.Random(cfg.seed).shuffle(rows)
    n_eval = max(1, int(round(len(rows) * cfg.eval_fraction))) if cfg.eval_fraction > 0 else 0
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    base = zoo.resolve(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(steps, 1))
    bar = tqdm(total=steps, desc="reward model", disable=not progress)
    rng = random.Random(cfg.seed + 1)
    losses = []
    for _ in range(cfg.epochs):
        rng.shuffle(train_rows)
        model.train()
        for i in range(0, len(train_rows), cfg.batch_size):
            chunk = train_rows[i : i + cfg.batch_size]
            texts = [p["prompt"] + p["chosen"] for p in chunk] + [p["prompt"] + p["rejected"] for p in chunk]
            scores = _scores(model, tokenizer, texts, cfg.max_length)
            margin = scores[: len(chunk)] - scores[len(chunk) :]
            loss = -F.logsigmoid(margin).mean()
            if not torch.isfinite(loss):
                raise RuntimeError(f"reward-model loss is {loss.item()}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    accuracy = pairwise_accuracy(model, tokenizer, eval_rows, cfg.max_length)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    info = {"train_pairs": len(train_rows), "eval_pairs": len(eval_rows), "eval_accuracy": accuracy,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "base": cfg.base}
    (output_dir / "reward_model.json").write_text(json.dumps(info, indent=2))
    return info


def sentiment_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs from the synthetic review corpus: a positive review preferred over a negative
    one that starts with the same words (the shared start is the prompt)."""
    texts = reviews.generate(n * 6, seed=seed + 7919)
    pos = [t for t, label in texts if label == "positive"]
    neg = [t for t, label in texts if label == "negative"]
    rng = random.Random(seed)
    pairs = []
    for i in range(min(n, len(pos), len(neg))):
        c, r = pos[i], neg[rng.randrange(len(neg))]
        pairs.append({"prompt": "", "chosen": c, "rejected": r})
    return pairs
