"""The embedded model zoo: the review corpus, recipes and cache, and the micro models it builds."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from cory import zoo
from cory.zoo import builder, registry
from cory.corpora import reviews

MICRO_LM, MICRO_RM = "cory:micro-reviews", "cory:micro-sentiment"


# --- corpus ----------------------------------------------------------------------------------


def test_generate_is_deterministic_for_a_seed_and_a_prefix_of_longer_draws():
    assert reviews.generate(40, seed=3) == reviews.generate(40, seed=3)
    assert reviews.generate(40, seed=3) != reviews.generate(40, seed=4)
    assert reviews.generate(15, seed=3) == reviews.generate(40, seed=3)[:15]
    pretrain = reviews.generate(30, reviews.PRETRAIN_SEED)  # served from the cached stream
    assert pretrain[:10] == reviews.generate(10, reviews.PRETRAIN_SEED)


def test_sample_has_a_thousand_distinct_words_all_labels_and_review_lengths():
    sample = reviews.generate(5000, seed=0)
    distinct = {word for text, _ in sample for word in reviews.words(text)}
    assert len(distinct) >= 1000
    assert distinct <= reviews.vocabulary()
    assert {label for _, label in sample} == set(reviews.LABELS)
    assert all(reviews.MIN_WORDS <= len(text.split()) <= reviews.MAX_WORDS for text, _ in sample)


def test_label_is_the_majority_with_ties_to_the_last_opinion():
    assert reviews.label_of([0, 0]) == "neutral"
    assert reviews.label_of([0, 1]) == "positive"
    assert reviews.label_of([1, -1]) == "negative"
    assert reviews.label_of([-1, 0, 1]) == "positive"
    assert reviews.label_of([1, -1, 1, 0]) == "positive"
    assert reviews.label_of([-1, -1, 1]) == "negative"


def test_heldout_reviews_and_prompts_exclude_the_pretraining_texts():
    pretrain = {text for text, _ in reviews.generate(reviews.PRETRAIN_SIZE, reviews.PRETRAIN_SEED)}
    heldout = reviews.heldout(300, seed=0)
    assert not pretrain & {text for text, _ in heldout}
    prompts = reviews.prompts(300, seed=0)
    assert prompts == reviews.prompts(300, seed=0)
    for prompt, (text, _) in zip(prompts, heldout):
        assert 2 <= len(prompt.split()) <= 8
        assert text.startswith(prompt) and len(prompt.split()) < len(text.split())
    assert all(len(p.split()) <= 3 for p in reviews.prompts(50, seed=1, min_words=2, max_words=3))


# --- names, recipes, cache -------------------------------------------------------------------


def test_unknown_name_raises_a_one_line_error_listing_the_zoo():
    with pytest.raises(zoo.UnknownModelError) as caught:
        zoo.build("cory:xyz")
    message = str(caught.value)
    assert message.startswith("unknown model 'cory:xyz'; the zoo has: cory:tiny-reviews, ")
    assert "\n" not in message and MICRO_RM in message
    assert isinstance(caught.value, ValueError)
    with pytest.raises(zoo.UnknownModelError):
        zoo.recipe_hash("cory:xyz")
    with pytest.raises(zoo.UnknownModelError):
        zoo.resolve("cory:xyz")


def test_resolve_passes_other_names_through():
    assert zoo.is_zoo_name("cory:tiny-reviews") and not zoo.is_zoo_name("gpt2")
    assert zoo.resolve("gpt2") == "gpt2"
    assert zoo.resolve("/some/local/folder") == "/some/local/folder"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CORY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "cory"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert zoo.cache_dir() == pathlib.Path.home() / ".cache" / "cory"
    monkeypatch.setenv("CORY_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    folder = registry.model_dir(MICRO_LM)
    assert folder == tmp_path / "c" / "zoo" / f"micro-reviews-{zoo.recipe_hash(MICRO_LM)}"


def test_recipe_hash_is_stable_across_processes():
    names = list(registry.ZOO)
    here = [zoo.recipe_hash(name) for name in names]
    code = f"from cory import zoo; print(' '.join(zoo.recipe_hash(n) for n in {names!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert there.stdout.split() == here
    assert all(len(h) == 12 and int(h, 16) >= 0 for h in here)
    assert len(set(here)) == len(names)


def test_list_models_describes_every_registered_model(monkeypatch, tmp_path):
    monkeypatch.setenv("CORY_CACHE", str(tmp_path))
    models = zoo.list_models()
    assert [m["name"] for m in models] == list(registry.ZOO)
    assert {m["kind"] for m in models} == {"causal-lm", "classifier"}
    assert not any(m["built"] for m in models)
    assert all(m["path"].startswith(str(tmp_path)) and m["description"] for m in models)
    assert all("test" in m["description"] for m in models if m["name"].startswith("cory:micro"))


def test_concurrent_builds_write_once_and_all_get_a_complete_folder(tmp_path, monkeypatch):
    folder, writes, results = tmp_path / "zoo" / "m-abc", [], []
    asked = threading.Semaphore(0)
    flock = builder.fcntl.flock

    def counted(handle, op):
        if op == builder.fcntl.LOCK_EX:
            asked.release()
        return flock(handle, op)

    monkeypatch.setattr(builder.fcntl, "flock", counted)

    def write(tmp):
        writes.append(tmp)
        for _ in range(3):  # every builder has asked for the lock while this one holds it
            assert asked.acquire(timeout=60)
        (tmp / "weights").write_text("w")

    threads = [threading.Thread(target=lambda: results.append(builder.build_folder(folder, write))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(writes) == 1 and results == [folder] * 3
    assert (folder / "weights").read_text() == "w"
    assert sorted(p.name for p in folder.parent.iterdir()) == [".m-abc.lock", "m-abc"]


def test_a_failed_build_leaves_nothing_and_force_replaces_the_folder(tmp_path):
    folder = tmp_path / "zoo" / "m-abc"

    def crash(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        builder.build_folder(folder, crash)
    assert not folder.exists() and [p.name for p in folder.parent.iterdir()] == [".m-abc.lock"]
    builder.build_folder(folder, lambda tmp: (tmp / "v").write_text("1"))
    builder.build_folder(folder, lambda tmp: (tmp / "v").write_text("2"), force=True)
    assert (folder / "v").read_text() == "2"
    assert sorted(p.name for p in folder.parent.iterdir()) == [".m-abc.lock", "m-abc"]


# --- the micro models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(micro_lm, micro_rm):
    """The micro models' folders, built once per session into the session cache (conftest)."""
    threads = torch.get_num_threads()
    # The models are tiny: one thread is as fast, and immune to oversubscription on a busy CPU.
    torch.set_num_threads(1)
    yield {MICRO_LM: micro_lm, MICRO_RM: micro_rm}
    torch.set_num_threads(threads)


def test_micro_models_load_with_the_auto_classes_and_share_one_tokenizer(micro):
    lm = AutoModelForCausalLM.from_pretrained(micro[MICRO_LM])
    rm = AutoModelForSequenceClassification.from_pretrained(micro[MICRO_RM])
    assert lm.config.model_type == rm.config.model_type == "llama"
    assert rm.config.id2label == {0: "negative", 1: "positive"}
    assert rm.config.pad_token_id == lm.config.pad_token_id is not None
    tokenizer_files = [(micro[name] / "tokenizer.json").read_bytes() for name in (MICRO_LM, MICRO_RM)]
    assert tokenizer_files[0] == tokenizer_files[1]
    tokenizer = AutoTokenizer.from_pretrained(micro[MICRO_LM])
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "<eos>", "<eos>")
    assert lm.config.eos_token_id == tokenizer.eos_token_id == lm.generation_config.eos_token_id


def test_tokenizer_round_trips_text_and_adds_no_special_tokens(micro):
    tokenizer = AutoTokenizer.from_pretrained(micro[MICRO_LM])
    for text, _ in reviews.heldout(200, seed=5) + [("Ünïcode, tabs\tand  spaces!", "")]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.pad_token_id not in ids and tokenizer.eos_token_id not in ids
    tokenizer.padding_side = "left"
    short, long = tokenizer("The plot")["input_ids"], tokenizer("Sadly, the acting was")["input_ids"]
    batch = tokenizer(["The plot", "Sadly, the acting was"], padding=True)["input_ids"]
    pad = len(long) - len(short)
    assert batch == [[tokenizer.pad_token_id] * pad + short, long]


def test_micro_lm_writes_known_words_and_stops(micro):
    tokenizer = AutoTokenizer.from_pretrained(micro[MICRO_LM], padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(micro[MICRO_LM])
    prompts = reviews.prompts(16, seed=11)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = lm.generate(**batch, max_new_tokens=40)  # the folder's defaults: plain sampling
    response = out[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    words = [word for text in texts for word in reviews.words(text)]
    known = sum(word in reviews.vocabulary() for word in words) / len(words)
    assert len(words) > 60 and known > 0.85, texts
    assert (response == tokenizer.eos_token_id).any(dim=1).float().mean() > 0.5


def test_micro_classifier_ranks_heldout_positive_reviews_above_negative_ones(micro):
    tokenizer = AutoTokenizer.from_pretrained(micro[MICRO_RM])
    rm = AutoModelForSequenceClassification.from_pretrained(micro[MICRO_RM])
    data = reviews.heldout(600, seed=23)
    with torch.no_grad():
        logits = rm(**tokenizer([t for t, _ in data], return_tensors="pt", padding=True)).logits
    labels = [label for _, label in data]
    score = {lab: logits[[i for i, x in enumerate(labels) if x == lab], 1] for lab in reviews.LABELS}
    predicted = logits.argmax(-1).tolist()
    pos_neg = [i for i, label in enumerate(labels) if label != "neutral"]
    accuracy = sum(predicted[i] == (labels[i] == "positive") for i in pos_neg) / len(pos_neg)
    pairwise = (score["positive"][:, None] > score["negative"][None, :]).float().mean()
    assert accuracy > 0.9 and pairwise > 0.9
    # Centred logits: a neutral review's reward is near zero and logit0 is about -logit1.
    assert abs(score["neutral"].mean()) < 0.5
    assert logits.sum(-1).abs().mean() < 0.5


def test_zoo_info_records_the_build(micro):
    info = json.loads((micro[MICRO_RM] / "zoo_info.json").read_text())
    assert info["name"] == MICRO_RM and info["recipe_hash"] == zoo.recipe_hash(MICRO_RM)
    assert info["recipe"]["kind"] == "classifier" and info["build_seconds"] > 0
    assert info["eval"]["heldout_accuracy"] > 0.9
    assert info["corpus"]["distinct_words"] >= 1000
    assert "held-out accuracy" in (micro[MICRO_RM] / "build.log").read_text()
    lm_info = json.loads((micro[MICRO_LM] / "zoo_info.json").read_text())
    assert lm_info["eval"]["heldout_loss"] > 0 and lm_info["samples"]


def test_a_second_build_reuses_the_cached_folder(micro, monkeypatch):
    monkeypatch.setenv("CORY_CACHE", str(micro[MICRO_LM].parent.parent))
    info_before = (micro[MICRO_LM] / "zoo_info.json").read_text()
    start = time.perf_counter()
    assert zoo.build(MICRO_LM) == micro[MICRO_LM]
    assert zoo.resolve(MICRO_RM) == str(micro[MICRO_RM])
    assert time.perf_counter() - start < 0.5
    assert (micro[MICRO_LM] / "zoo_info.json").read_text() == info_before
    built = {m["name"]: m["built"] for m in zoo.list_models()}
    assert built[MICRO_LM] and built[MICRO_RM]
