"""Rewards on real text: VADER, and classifier rewards fed text written by another tokenizer."""

import pytest
from transformers import AutoTokenizer

from cory.config import load_config
from cory.rewards import RewardError, load_reward, validate_spec
from cory.tasks import make_task


def test_vader_reward_is_the_compound_score_of_the_chosen_text():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    prompts = ["The movie was", "I think it is", "Plot:"]
    responses = [" wonderful, I loved it!", " terrible and boring.", " a man walks to a shop."]
    both = load_reward("vader")(prompts, responses)
    only = load_reward("vader", on="response")(prompts, responses)
    assert both == [analyzer.polarity_scores(p + r)["compound"] for p, r in zip(prompts, responses)]
    assert only == [analyzer.polarity_scores(r)["compound"] for r in responses]
    assert both[0] > 0.5 and both[1] < -0.5 and only[2] == 0.0
    validate_spec("vader")


def test_unknown_word_reward_names_vader_among_the_choices():
    with pytest.raises(RewardError, match="vader"):
        load_reward("vaderr")


def test_sentiment_task_with_vader_and_chat_prompts():
    cfg = load_config(overrides=["task.reward=vader", "task.reward_on=response", "task.chat_template=true",
                                 "task.num_train_prompts=8", "task.num_eval_prompts=4"])
    task = make_task(cfg.task)
    assert all(p.startswith("Continue this movie review in one sentence: ") for p in task.eval_prompts)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    compound = SentimentIntensityAnalyzer().polarity_scores
    scores = task.score(task.eval_prompts[:2], ["I loved it, wonderful!", "awful"])
    assert scores == [compound("I loved it, wonderful!")["compound"], compound("awful")["compound"]]
    assert scores[0] > 0 > scores[1]


def test_classifier_reward_scores_text_from_any_tokenizer_alike(micro_rm, smollm2):
    """Text written through another tokenizer (SmolLM2's: capitals, unicode, newlines, long replies)
    gets the same score alone as in a batch of much longer texts, and texts longer than the
    classifier's positions are scored on their end instead of failing."""
    reward = load_reward(str(micro_rm), on="response")
    other = AutoTokenizer.from_pretrained(smollm2)
    sample = "The Movie was GREAT — truly wonderful!\n\nI loved it 😀"
    text = other.decode(other(sample)["input_ids"])
    assert text == sample
    long_text = "the plot was bad and boring " * 200  # far beyond the classifier's 256 positions
    alone = reward([""], [text])[0]
    batched = reward(["", "", ""], [long_text, text, "great"])
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    assert all(v == v and abs(v) < 1e3 for v in batched)
    # A text longer than the positions the classifier was trained on is scored on its last ones.
    longest = reward.__wrapped__.model.config.max_position_embeddings
    ids = reward.__wrapped__.tokenizer(long_text + "the acting was great")["input_ids"]
    assert len(ids) > longest
    end = reward.__wrapped__.tokenizer.decode(ids[-longest:])
    assert reward([""], [long_text + "the acting was great"])[0] == pytest.approx(reward([""], [end])[0], abs=1e-5)
