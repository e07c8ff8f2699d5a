"""Text environments: ACTION= parsing, prompts, shaping, the gymnasium contract, the batch adapter."""

import math
from types import SimpleNamespace

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import cory.envs  # noqa: F401  (registers the ids)
from cory.envs import BanditEnv, ContextualBanditEnv, GymTextEnvBatch, TicTacToeEnv, parse_action
from cory.envs.bandit import COLOURS, render_bandit_prompt
from cory.envs.prompts import PromptOptions
from cory.generation.sampling import Generation
from cory.rollout import Sampler

COLOUR_LABELS = ["blue", "green", "red", "yellow", "orange"]
DIGITS = [str(i) for i in range(10)]


# ---- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, labels, expected",
    [
        ("ACTION=blue", COLOUR_LABELS, 0),
        ("I think ACTION=red. On reflection ACTION=green", COLOUR_LABELS, 1),  # last wins
        ("format ACTION=X ... so ACTION = Green.", COLOUR_LABELS, 1),  # spaces, case, full stop
        ("ACTION=blue and finally ACTION=X", COLOUR_LABELS, None),  # last match invalid: no rescue
        ("action=RED", COLOUR_LABELS, 2),
        ("**ACTION=[yellow]**", COLOUR_LABELS, 3),
        ('ACTION="orange"!', COLOUR_LABELS, 4),
        ("ACTION=<blue>", COLOUR_LABELS, 0),
        ("ＡＣＴＩＯＮ＝ｒｅｄ", COLOUR_LABELS, 2),  # full-width unicode
        ("ACTION=green\u200b", COLOUR_LABELS, 1),  # zero-width space
        ("émoji 🎰 ACTION=red 🎉", COLOUR_LABELS, 2),
        ("I pick blue.", COLOUR_LABELS, None),  # no ACTION=
        ("", COLOUR_LABELS, None),
        ("\x00\x07#$%^&*()ACTION=", COLOUR_LABELS, None),  # junk, empty token
        ("REACTION=blue", COLOUR_LABELS, None),  # not the ACTION keyword
        ("ACTION=purple", COLOUR_LABELS, None),  # unknown arm
        ("ACTION=blue/green", COLOUR_LABELS, None),  # ambiguous
        ("ACTION=10", DIGITS, None),  # out of range
        ("ACTION=-1", DIGITS, None),
        ("ACTION=1.5", DIGITS, None),
        ("ACTION=9.", DIGITS, 9),
        ("ACTION=03", DIGITS, 3),
        ("ACTION=３", DIGITS, 3),
    ],
)
def test_parse_action(text, labels, expected):
    assert parse_action(text, labels) == expected


def test_parse_action_survives_arbitrary_bytes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = "".join(chr(int(c)) for c in rng.integers(0, 0x2FFF, size=int(rng.integers(0, 80))))
        assert parse_action(text, COLOUR_LABELS) in (None, 0, 1, 2, 3, 4)


# ---- gymnasium contract -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("cory/Bandit-v0", {}),
        ("cory/Bandit-v0", {"variant": "continuous", "distribution": "bernoulli", "n_arms": 20, "summary": True}),
        ("cory/ContextualBandit-v0", {"n_items": 5}),
        ("cory/TicTacToe-v0", {"opponent": "noisy", "agent_first": False}),
    ],
)
def test_gymnasium_make_passes_check_env(env_id, kwargs):
    # check_env handles Text spaces: it samples random response strings (all invalid actions here),
    # checks seeding determinism and the reset/step return types.
    env = gymnasium.make(env_id, **kwargs)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert isinstance(obs, str) and env.observation_space.contains(obs)


def test_unknown_kwarg_values_are_clear_errors():
    with pytest.raises(ValueError, match="distribution"):
        BanditEnv(distribution="poisson")
    with pytest.raises(ValueError, match="20 colours"):
        BanditEnv(n_arms=21)
    with pytest.raises(ValueError, match="opponent"):
        TicTacToeEnv(opponent="mcts")
    with pytest.raises(ValueError, match="reward_norm"):
        BanditEnv(reward_norm="zscore")


# ---- bandits ------------------------------------------------------------------------------------


def test_button_variant_has_twenty_colour_arms():
    env = BanditEnv(n_arms=20)
    assert env.labels == list(COLOURS) and len(set(COLOURS)) == 20
    assert BanditEnv(n_arms=5, variant="continuous").labels == ["0", "1", "2", "3", "4"]


def test_means_are_drawn_from_the_reset_seed():
    env = BanditEnv(n_arms=10)
    env.reset(seed=7)
    a = env.means.copy()
    env.reset(seed=7)
    assert np.array_equal(a, env.means)
    env.reset(seed=8)
    assert not np.array_equal(a, env.means)
    assert np.all((0 <= a) & (a <= 1))
    # instance_seed overrides: same instance, independent reward noise seed
    env.reset(seed=1, options={"instance_seed": 99})
    b = env.means.copy()
    env.reset(seed=2, options={"instance_seed": 99})
    assert np.array_equal(b, env.means)


def test_bernoulli_has_one_best_arm_at_a_random_index():
    best = set()
    for seed in range(20):
        env = BanditEnv(n_arms=5, distribution="bernoulli", gap=0.5)
        env.reset(seed=seed)
        assert sorted(env.means.tolist()) == [0.25] * 4 + [0.75]
        best.add(int(np.argmax(env.means)))
        _, r, *_ = env.step("ACTION=blue")
        assert r in (0.0, 1.0)
    assert len(best) > 1


def test_step_info_and_regret():
    env = BanditEnv(n_arms=5, sigma=0.1)
    env.reset(seed=0)
    _, reward, done, trunc, info = env.step("ACTION=green")
    assert info["action"] == 1 and info["valid"] and info["executed"] == 1 and info["executed_label"] == "green"
    assert info["best_action"] == int(np.argmax(env.means))
    assert info["regret"] == pytest.approx(env.means.max() - env.means[1])
    assert reward == info["env_reward"] and not done and not trunc


def test_bandit_prompt_has_instructions_history_summary_and_question():
    options = PromptOptions(cot=True, history=2, summary=True)
    text = render_bandit_prompt(COLOUR_LABELS, "button", 50, [(0, 0.5), (1, 0.314), (1, 1.0)], options)
    assert "5 buttons labeled blue, green, red, yellow, orange" in text
    assert "50 steps" in text and "maximize the total reward" in text
    assert "Think step-by-step and output your final answer in the format ACTION=X" in text
    assert "Provide your (SHORT!) thinking process and your answer ACTION=X" in text
    assert "Step=1 Action=blue" not in text  # outside the window of 2
    assert "Step=2 Action=green Reward=0.31\nStep=3 Action=green Reward=1.00" in text
    assert "green: chosen 2 times, mean reward 0.66" in text and "red: not chosen yet" in text
    assert text.endswith("What do you predict next?")
    direct = render_bandit_prompt(COLOUR_LABELS, "button", 50, [], PromptOptions(cot=False))
    assert "Output ONLY your final answer in the format ACTION=X." in direct and "step-by-step" not in direct
    assert "So far" not in direct


def test_invalid_response_executes_random_arm_and_costs_the_penalty():
    env = BanditEnv(n_arms=5, invalid_penalty=-5.0)
    env.reset(seed=0)
    executed = set()
    for _ in range(30):
        _, reward, _, _, info = env.step("no idea")
        assert info["action"] is None and not info["valid"]
        assert reward == pytest.approx(info["env_reward"] - 5.0)
        executed.add(info["executed"])
    assert len(executed) > 1  # a random arm, not a fixed fallback


def test_exploration_bonus_only_for_first_valid_try():
    env = BanditEnv(n_arms=5, exploration_bonus=1.0, sigma=0.0)
    env.reset(seed=0)
    _, r1, *_ = env.step("ACTION=blue")
    _, r2, *_ = env.step("ACTION=blue")
    _, r3, *_ = env.step("ACTION=red")
    assert r1 == pytest.approx(env.means[0] + 1) and r2 == pytest.approx(env.means[0])
    assert r3 == pytest.approx(env.means[2] + 1)


def test_reward_normalisation():
    raw = BanditEnv(n_arms=5, sigma=1.0)
    std = BanditEnv(n_arms=5, sigma=1.0, reward_norm="standard")
    scaled = BanditEnv(n_arms=5, sigma=1.0, reward_norm="scale", reward_scale=4.0)
    rewards = []
    for env in (raw, std, scaled):
        env.reset(seed=5)
        rewards.append(env.step("ACTION=red")[1])
    assert rewards[1] == pytest.approx((rewards[0] - 0.5) / math.sqrt(1 / 12 + 1))
    assert rewards[2] == pytest.approx(rewards[0] / 4)


def test_episode_ends_at_horizon():
    env = BanditEnv(n_arms=5, horizon=4)
    env.reset(seed=0)
    dones = [env.step("ACTION=blue")[2] for _ in range(4)]
    assert dones == [False, False, False, True]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("ACTION=blue")


# ---- contextual bandit --------------------------------------------------------------------------


def test_contextual_bandit_new_user_each_step_and_linear_regret():
    env = ContextualBanditEnv(n_items=5, noise=0.0)
    obs, _ = env.reset(seed=0)
    assert "years old" in obs and "User features (age, action, comedy, drama, romance" in obs
    x0 = env.agent_view().context
    values = env.thetas @ x0
    obs, reward, _, _, info = env.step("ACTION=2")
    assert reward == pytest.approx(values[2])  # noise 0: reward = x . theta_k
    assert info["regret"] == pytest.approx(values.max() - values[2]) and info["best_action"] == int(values.argmax())
    assert not np.array_equal(env.agent_view().context, x0)
    assert "Step=1 User=[" in obs and "Action=2" in obs


# ---- tic-tac-toe --------------------------------------------------------------------------------


def test_tictactoe_prompt_and_illegal_move():
    env = TicTacToeEnv(opponent="random", agent_first=True, show_legal=True)
    obs, _ = env.reset(seed=0)
    assert "Board: 000000000" in obs and "Legal actions: 0, 1, 2, 3, 4, 5, 6, 7, 8" in obs
    obs, reward, done, _, info = env.step("ACTION=4")
    assert info["valid"] and env.board[4] == 1 and env.board.count(2) == 1 and reward == 0 and not done
    occupied = next(i for i, v in enumerate(env.board) if v == 2)
    _, reward, _, _, info = env.step(f"ACTION={occupied}")
    assert info["action"] == occupied and not info["valid"] and info["executed"] != occupied
    assert reward == pytest.approx(info["env_reward"] - 5.0)
    assert info["regret"] is None


def test_tictactoe_win_and_loss_rewards():
    env = TicTacToeEnv(opponent="minimax", tiebreak="first")
    env.reset(seed=0)
    total, done = 0.0, False
    while not done:  # a naive agent against perfect play: it cannot win
        legal = env.legal_actions()
        _, r, done, _, info = env.step(f"ACTION={legal[0]}")
        total += r
    assert env.record.outcome in (-1.0, 0.0) and total == env.record.outcome == info["outcome"]


def test_minimax_opponent_takes_an_immediate_win():
    env = TicTacToeEnv(opponent="minimax", tiebreak="first", agent_first=False)
    env.reset(seed=0)
    env.board = (2, 2, 0, 1, 1, 0, 0, 0, 0)  # opponent to play 2 after our move elsewhere
    _, r, done, _, _ = env.step("ACTION=8")
    assert done and r == -1.0 and env.board[2] == 2


# ---- batch adapter ------------------------------------------------------------------------------


def test_junk_responses_complete_the_episode_with_penalty_every_step():
    batch = GymTextEnvBatch("cory/Bandit-v0", n_arms=5, horizon=50)
    obs = batch.reset(3, np.random.default_rng(0))
    assert len(obs) == 3
    junk = ["", "ACTION=", "\x00\ufffd🤖 lol ACTION=ultraviolet"]
    steps = 0
    while batch.live:
        _, rewards, dones, infos = batch.step([junk[e] for e in batch.live])
        steps += 1
        for r, info in zip(rewards, infos):
            assert not info["valid"] and r == pytest.approx(info["env_reward"] - 5.0)
    assert steps == 50 and all(dones)
    for rec in batch.episodes():
        assert len(rec) == 50 and not any(rec.valid) and rec.actions == [None] * 50
        assert np.allclose(np.array(rec.rewards) - np.array(rec.env_rewards), -5.0)
        assert len(rec.regrets) == 50 and all(r >= 0 for r in rec.regrets)


def test_group_copies_share_instance_and_seed():
    batch = GymTextEnvBatch("cory/Bandit-v0", n_arms=5)
    obs = batch.reset(2, np.random.default_rng(1), group_size=3)
    assert len(obs) == 6
    means = [batch.env(e).means for e in range(6)]
    assert all(np.array_equal(means[0], m) for m in means[:3]) and not np.array_equal(means[0], means[3])
    _, rewards, _, _ = batch.step(["ACTION=red"] * 6)
    assert rewards[0] == rewards[1] == rewards[2] and rewards[3] == rewards[4] == rewards[5]


def test_step_only_takes_live_episodes_in_order():
    batch = GymTextEnvBatch("cory/TicTacToe-v0", opponent="minimax")
    batch.reset(4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="4 live"):
        batch.step(["ACTION=0"])
    while batch.live:
        before = list(batch.live)
        _, _, dones, infos = batch.step(["x"] * len(before))
        assert [i["episode"] for i in infos] == before
        assert batch.live == [e for e, d in zip(before, dones) if not d]
    assert all(rec.outcome is not None for rec in batch.episodes())


def test_pool_replays_a_fixed_set_of_instances():
    batch = GymTextEnvBatch("cory/Bandit-v0", pool_size=4, n_arms=5)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(10):
        batch.reset(3, rng)
        seen |= {rec.instance_seed for rec in batch.episodes()}
    assert seen == {int(s) for s in batch.pool}
    other = GymTextEnvBatch("cory/Bandit-v0", pool_size=4, pool_seed=1, n_arms=5)
    assert set(other.pool.tolist()).isdisjoint(batch.pool.tolist())


def test_batch_drives_the_sampler():
    """The Sampler runs whole episodes through the adapter (a scripted policy stands in for a model)."""

    class ScriptedPolicy:
        tokenizer = SimpleNamespace(pad_token_id=0)

        def generate(self, prompts, params, generator=None):
            b = len(prompts)
            ids = torch.ones(b, 2, dtype=torch.long)
            return Generation(
                query_ids=ids, query_mask=torch.ones_like(ids), response_ids=ids, response_mask=torch.ones_like(ids),
                logprobs=torch.zeros(b, 2), finished=torch.ones(b, dtype=torch.bool),
                texts=["ACTION=4" if i % 2 else "thinking... ACTION=1" for i in range(b)],
            )

    batch = GymTextEnvBatch("cory/Bandit-v0", n_arms=5, horizon=6, variant="continuous")
    rollout = Sampler(ScriptedPolicy(), batch, params=None).collect(2, np.random.default_rng(0), group_size=2)
    assert len(rollout) == 4 * 6
    assert rollout.done.sum() == 4 and rollout.turn_index.max() == 5
    assert rollout.group_ids.tolist()[:4] == [0, 0, 1, 1]
    assert all(info["valid"] for info in rollout.infos)
