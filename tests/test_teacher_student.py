"""The teacher-student dialogue corpus, cory/TeacherStudent-v0, and training in it (micro models)."""

import json
from collections import Counter

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import cory.envs  # noqa: F401  (registers the ids)
from cory.cli import main
from cory.teacher_student import teacher_turn
from cory.corpora import dialogue, reviews

MICRO_STUDENT = "cory:micro-dialogue"
WARM = " Great work on your essay!"


@pytest.fixture(scope="session")
def micro_student(zoo_cache):
    from cory import zoo

    zoo.build(MICRO_STUDENT, progress=False)
    return zoo.build("cory:tiny-dialogue-sentiment", progress=False)


def make_env(**kwargs):
    # The micro student is trained on rows of 128 tokens: keep its conversations inside them.
    kwargs = {"student": MICRO_STUDENT, "max_tokens": 64, "context_tokens": 96, **kwargs}
    return gymnasium.make("cory/TeacherStudent-v0", disable_env_checker=True, **kwargs).unwrapped


# ---- the corpus ---------------------------------------------------------------------------------


def test_dialogue_stream_is_deterministic_and_a_prefix_of_longer_draws():
    assert dialogue.pretraining_texts(40, 7) == dialogue.pretraining_texts(80, 7)[:40]
    assert dialogue.pretraining_texts(40, 7) != dialogue.pretraining_texts(40, 8)
    assert dialogue.generate(50, 7) == dialogue.generate(100, 7)[:50]
    first = dialogue.pretraining_texts(20, dialogue.PRETRAIN_SEED)
    assert first == [d.text for d in dialogue.dialogues(20, dialogue.PRETRAIN_SEED)]


def test_transcripts_are_tagged_lines_after_an_optional_time_line_and_the_lesson():
    for d in dialogue.dialogues(300, 3):
        lines = d.text.split("\n")
        assert lines.pop() == ""  # every line, the last included, ends with a newline
        if d.tokens_left is not None:
            assert lines.pop(0) == f"Tokens left: {d.tokens_left}" and 1 <= d.tokens_left <= 512
        assert lines.pop(0) == f"Lesson: {d.lesson}"
        tags = [line.split(":")[0] for line in lines if line.startswith(("Teacher:", "Student:"))]
        assert tags == ["Teacher", "Student"] * len(d.exchanges)
        assert dialogue.MIN_EXCHANGES <= len(d.exchanges) <= dialogue.MAX_EXCHANGES
        # An untagged line is the rest of a teacher turn written with a newline in it.
        for e in d.exchanges:
            assert "\n" not in e.reply and (e.kind == "odd" or "\n" not in e.teacher)


def test_student_replies_follow_the_kind_of_teacher_turn():
    replies = {kind: Counter() for kind in dialogue.KINDS}
    for d in dialogue.dialogues(2000, 5):
        for e in d.exchanges:
            replies[e.kind]["minimal" if e.minimal else e.label] += 1
    share = {kind: {k: v / sum(c.values()) for k, v in c.items()} for kind, c in replies.items()}
    assert share["warm"]["positive"] > 0.8 and share["harsh"]["negative"] > 0.8
    assert share["silent"]["minimal"] > 0.8 and share["odd"]["minimal"] > 0.6
    assert share["plain"]["neutral"] > 0.5 and share["warm"].get("minimal", 0) < 0.05


def test_labelled_replies_are_stripped_and_heldout_dialogues_are_new():
    pairs = dialogue.generate(500, 11)
    assert {label for _, label in pairs} == set(dialogue.LABELS)
    assert all(text and text == text.strip() and "\n" not in text for text, _ in pairs)
    assert all(label == "neutral" for text, label in pairs if text in dialogue.MINIMAL_REPLIES)
    seen = set(dialogue.pretraining_texts(dialogue.PRETRAIN_SIZE, dialogue.PRETRAIN_SEED))
    assert not seen & set(dialogue.heldout_texts(100, 1))


def test_sentiment_words_come_from_the_review_grammar():
    assert set(dialogue.POSITIVE_WORDS) <= set(reviews.POSITIVE_ADJECTIVES)
    assert set(dialogue.NEGATIVE_WORDS) <= set(reviews.NEGATIVE_ADJECTIVES)
    assert set(dialogue.NEUTRAL_WORDS) <= set(reviews.NEUTRAL_ADJECTIVES)


@pytest.mark.parametrize(
    "turn, near_empty, signals",
    [
        ("", True, set()),
        (" ...", True, {"no_letters"}),
        (" ok", True, set()),
        (" Great work!", False, set()),
        ("Great work!", False, {"odd_spacing"}),
        (" Great  work!", False, {"odd_spacing"}),
        (" Great\nwork!", False, {"newlines"}),
        (" ***", True, {"no_letters", "odd_chars"}),
        (" GREAT | WORK", False, {"odd_chars"}),
        (" don't", False, set()),  # two runs of letters: not near-empty
    ],
)
def test_near_empty_and_formatting_signals(turn, near_empty, signals):
    assert dialogue.is_near_empty(turn) == near_empty
    assert {k for k, v in dialogue.formatting_signals(turn).items() if v} == signals


def test_teacher_turn_is_cut_at_the_first_speaker_tag():
    assert teacher_turn(" Well done.\nStudent: Thanks!\nTeacher: ok") == (" Well done.", True)
    assert teacher_turn(" Well done.  \n") == (" Well done.", False)
    assert teacher_turn(" caf\u00e9") == (" caf?", False)


# ---- the environment ----------------------------------------------------------------------------


def test_env_passes_check_env_and_shares_its_models(micro_student):
    env = make_env()
    check_env(env, skip_render_check=True)
    other = make_env(temperature=0.0)
    assert other.student is env.student and other.classifier is env.classifier


def test_episode_spends_its_tokens_and_ends(micro_student):
    env = make_env()
    obs, _ = env.reset(seed=0)
    assert obs.startswith("Tokens left: 64\nLesson: ") and obs.endswith("\nTeacher:")
    infos, rewards, done = [], [], False
    while not done:
        obs, reward, done, truncated, info = env.step(WARM)
        infos.append(info)
        rewards.append(reward)
        assert not truncated and len(infos) < 64
    assert all(0.0 <= r <= 1.0 for r in rewards) and sum(rewards) == pytest.approx(env.record.total_reward)
    last = infos[-1]
    assert last["tokens_used"] <= 64 and last["tokens_left"] < env._shortest_exchange
    assert sum(i["teacher_tokens"] + i["student_tokens"] for i in infos) == last["tokens_used"] == env.tokens_used
    assert last["transcript"] == env.transcript and env.transcript.count("Teacher:" + WARM) == len(infos)
    assert obs.startswith(f"Tokens left: {last['tokens_left']}\n")
    with pytest.raises(RuntimeError):
        env.step(WARM)
    env.reset(seed=0)
    replay = [env.step(WARM)[4]["student_reply"] for _ in range(len(infos)) if not env._done]
    assert replay == [i["student_reply"] for i in infos]  # the reset seed fixes the student's samples


def test_an_empty_turn_silences_the_student_more_often_than_a_warm_one(micro_student):
    env = make_env()

    def near_empty_share(turn: str) -> float:
        silent = []
        for seed in range(24):
            env.reset(seed=seed)
            env.step(" Open your book to page 12.")
            silent.append(env.step(turn)[4]["reply_near_empty"])
        return sum(silent) / len(silent)

    empty, warm = near_empty_share(""), near_empty_share(WARM)
    assert empty >= warm + 0.5, (empty, warm)


def test_training_runs_two_iterations_in_the_teacher_student_env(tmp_path, micro_student):
    out = tmp_path / "run"
    overrides = {
        "model.name": MICRO_STUDENT,
        "env.id": "cory/TeacherStudent-v0",
        "env.kwargs": f"{{student: '{MICRO_STUDENT}', max_tokens: 48, context_tokens: 96}}",
        "env.eval_episodes": 2,
        "generation.max_new_tokens": 8,
        "generation.stop_strings": '["\\n"]',
        "train.batch_size": 2,
        "train.iterations": 2,
        "train.log_with": "[]",
        "train.progress": False,
    }
    argv = ["train", "--output-dir", str(out)] + [f"{k}={v}" for k, v in overrides.items()]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["turns_per_episode"] >= 2 for r in rows)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for e in evals:
        assert 0 <= e["reward_mean"] <= e["episode_length"] and e["valid_rate"] == 1.0
