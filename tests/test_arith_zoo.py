"""The arithmetic corpus (the offline GSM8K), the corpus registry, and the test-size arithmetic model."""

import collections
import json
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cory.tasks.registry import arithmetic_task
from cory.zoo import registry
from cory.corpora import arithmetic

MICRO_ARITH = "cory:micro-arith"


@pytest.fixture
def one_thread():
    # The model is tiny: one thread is as fast, and immune to oversubscription on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- corpus ----------------------------------------------------------------------------------


def test_problems_are_deterministic_for_a_seed_and_a_prefix_of_longer_draws():
    assert arithmetic.generate(50, seed=3) == arithmetic.generate(50, seed=3)
    assert arithmetic.generate(50, seed=3) != arithmetic.generate(50, seed=4)
    assert arithmetic.generate(20, seed=3) == arithmetic.generate(50, seed=3)[:20]
    pretrain = arithmetic.generate(30, arithmetic.PRETRAIN_SEED)  # served from the cached stream
    assert pretrain == arithmetic.generate(30) and pretrain[:10] == arithmetic.generate(10)
    assert arithmetic.pretraining_texts(30) == [prompt + answer for prompt, answer, _ in pretrain]


def test_every_worked_step_is_right_and_the_answer_ends_it():
    for p in arithmetic.problems(3000, seed=5):
        assert p.prompt.startswith("Question: ") and p.prompt.endswith("?\nAnswer:")
        assert p.answer.endswith(f" The answer is {p.truth}.") and p.truth >= 2
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", p.answer)
        assert len(steps) == (2 if p.kind == "two" else 1)
        for a, op, b, result in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
        assert int(steps[-1][3]) == p.truth and arithmetic.is_correct(p.answer, p.truth)
        if p.easy:  # the easy tier's operands are small numbers
            assert all(int(b) <= arithmetic.EASY_MAX for _, _, b, _ in steps)


def test_kinds_and_tiers_follow_their_weights():
    problems = arithmetic.problems(20_000, seed=8)
    kinds = collections.Counter(p.kind for p in problems)
    total = sum(arithmetic.KIND_WEIGHTS.values())
    for kind, weight in arithmetic.KIND_WEIGHTS.items():
        assert kinds[kind] / len(problems) == pytest.approx(weight / total, abs=0.02)
        easy = [p.easy for p in problems if p.kind == kind]
        assert sum(easy) / len(easy) == pytest.approx(arithmetic.EASY_SHARE[kind], abs=0.03)


def test_last_number_on_hand_cases():
    cases = {
        "The answer is 8.": 8,  # a sentence's period is not a decimal point
        " 3 + 5 = 8. The answer is 8.": 8,
        "It is -12 degrees": -12,
        "12 - 5 = 7": 7,
        "1,200 apples": 1200,  # thousands separators
        "between 3,4": 4,  # two numbers, not 34
        "2.5 cups": 2.5,
        "5 apples, 7 pears, 12 in all, done": 12,
        "no number here": None,
        "": None,
    }
    for text, expected in cases.items():
        assert arithmetic.last_number(text) == expected, text


def test_is_correct_judges_the_last_number_only():
    assert arithmetic.is_correct(" 3 + 5 = 8. The answer is 8.", 8)
    assert arithmetic.is_correct("The answer is 8.0", 8)
    assert arithmetic.is_correct("-4", -4) and arithmetic.is_correct("1,234 stamps", 1234)
    assert not arithmetic.is_correct("8 apples, not 9", 8)  # several numbers: the last one counts
    assert not arithmetic.is_correct("The answer is 8.", 9)
    assert not arithmetic.is_correct("I do not know.", 8)


def test_heldout_prompts_exclude_every_pretraining_prompt():
    seen = {p for p, _, _ in arithmetic.generate(arithmetic.PRETRAIN_SIZE, arithmetic.PRETRAIN_SEED)}
    heldout = arithmetic.heldout(2000)
    assert not seen & {prompt for prompt, _ in heldout}
    assert heldout == arithmetic.heldout(2000, exclude=seen)  # the task's call
    assert heldout == [(p.prompt, p.truth) for p in arithmetic.heldout_problems(2000)]
    assert all(not text.startswith(tuple(seen)) for text in arithmetic.heldout_texts(50))
    first = arithmetic.heldout(3, exclude=set())
    assert arithmetic.heldout(3, exclude={first[0][0]})[0] == first[1]


def test_the_task_evaluates_on_the_problems_the_build_measures():
    task = arithmetic_task(SimpleNamespace(num_train_prompts=20, num_eval_prompts=10))
    spec = registry.ZOO["cory:tiny-arith"].recipe.corpus
    built_on = [p.prompt for p in arithmetic.heldout_problems(10, spec.eval_seed)]
    assert task.eval_prompts == built_on
    truth = dict(arithmetic.heldout(30))
    prompts = task.eval_prompts[:2]
    assert task.score(prompts, [f" The answer is {truth[prompts[0]]}.", "no idea"]) == [1.0, 0.0]


# --- the corpus registry -----------------------------------------------------------------------


def test_recipes_name_a_registered_corpus_at_its_current_version():
    assert registry.corpus_module("arithmetic") is arithmetic
    with pytest.raises(ValueError, match="unknown corpus 'poems'"):
        registry.corpus_module("poems")
    synthetic = [e for e in registry.ZOO.values() if isinstance(e.recipe, registry.Recipe)]  # not converted ones
    for entry in synthetic:
        spec, module = entry.recipe.corpus, registry.corpus_module(entry.recipe.corpus.name)
        assert (spec.seed, spec.version) == (module.PRETRAIN_SEED, module.CORPUS_VERSION)
        assert spec.n_train <= module.PRETRAIN_SIZE
    assert {e.recipe.corpus.name for e in synthetic} == set(registry.CORPORA)  # every corpus has a model
    with pytest.raises(ValueError, match="at most"):
        registry.corpus("arithmetic", n_train=arithmetic.PRETRAIN_SIZE + 1)


# --- the micro model -----------------------------------------------------------------------------


def test_micro_arith_tokenizer_keeps_numbers_whole_and_prompts_a_prefix(micro_arith):
    tokenizer = AutoTokenizer.from_pretrained(micro_arith)
    for p in arithmetic.heldout_problems(100):
        prompt, full = tokenizer(p.prompt)["input_ids"], tokenizer(p.prompt + p.answer)["input_ids"]
        assert full[: len(prompt)] == prompt  # generation continues exactly the trained text
        assert tokenizer.decode(full) == p.prompt + p.answer
    assert len(tokenizer(" 47")["input_ids"]) == 1 and len(tokenizer(" 117")["input_ids"]) == 1


def test_micro_arith_starts_partly_right_with_greedy_decoding(micro_arith, one_thread):
    tokenizer = AutoTokenizer.from_pretrained(micro_arith, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(micro_arith)
    assert lm.config.model_type == "llama" and lm.config.eos_token_id == tokenizer.eos_token_id
    problems = arithmetic.heldout_problems(100)
    batch = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.generate(**batch, do_sample=False, top_k=None, max_new_tokens=32)
    response = out[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    accuracy = sum(arithmetic.is_correct(t, p.truth) for t, p in zip(texts, problems)) / len(problems)
    assert 0.10 <= accuracy <= 0.50, texts[:8]
    # It has learned the format: a worked step, the answer sentence, then <eos>.
    assert sum(re.fullmatch(r" \d+ [-+*] \d+ = \d+\..* The answer is \d+\.", t) is not None for t in texts) >= 90
    assert (response == tokenizer.eos_token_id).any(dim=1).float().mean() >= 0.9


def test_micro_arith_zoo_info_records_its_accuracy(micro_arith):
    info = json.loads((micro_arith / "zoo_info.json").read_text())
    assert info["name"] == MICRO_ARITH and info["recipe"]["corpus"]["name"] == "arithmetic"
    metrics = info["eval"]
    assert 0.10 <= metrics["greedy_accuracy"] <= 0.50 and 0.0 < metrics["sampled_accuracy"] < 0.6
    assert set(metrics["greedy_accuracy_by_kind"]) == {"all", *arithmetic.KINDS, "easy", "hard"}
    assert metrics["greedy_accuracy_by_kind"]["easy"] > metrics["greedy_accuracy_by_kind"]["hard"]
    assert metrics["heldout_problems"] == info["recipe"]["corpus"]["n_eval"]
    assert "held-out accuracy" in (micro_arith / "build.log").read_text()
    assert info["samples"] and info["samples"][0].startswith("Question: ")
