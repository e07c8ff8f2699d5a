"""The statistics of the asynchronous-rollout benchmark (`benchmarks/async.py`) against hand
computations: speed-ups pair by seed whatever the order of the runs, the declared goal is judged on
the Bonferroni-corrected interval against the one-thread loop of the mode's own backend, and the
ceiling of one core per stage is 1/s_g + 1/s_u, from the baselines of the mode's own backend."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/async.py")


def run(k: int, threads: int, seed: int, seconds: float, generate: float = 1.0, update: float = 1.0, reward: float = 0.0,
        backend: str = "native") -> dict:
    name = (f"k=0, {threads} thread{'s' * (threads != 1)}" if k == 0 else f"k={k}") + (f", {backend}" if backend != "native" else "")
    return {"k": k, "threads": threads, "backend": backend, "mode": name, "seed": seed, "iterations_per_hour": 3600 / seconds,
            "seconds_per_iteration": seconds, "generate_s": generate, "update_s": update, "reward_per_sample": reward,
            "load_before": 0.0, "load_after": 0.0, "reward_curve": [reward] * 12,
            **({"wait_s": 0.5, "publish_s": 0.01, "staleness_max": k, "behaviour_gap_max": 1e-5} if k else {})}


def test_speedups_pair_by_seed_and_the_goal_uses_the_corrected_interval(bench):
    one = {0: 8.0, 1: 6.0, 2: 7.0}  # the one-thread loop's seconds per iteration by seed
    k1 = {0: 5.0, 1: 4.0, 2: 4.5}
    runs = [run(1, 1, s, k1[s], reward=0.1 * s) for s in (2, 0, 1)]  # out of order
    runs += [run(0, 1, s, one[s], reward=0.1 * s + 0.01) for s in (0, 1, 2)]
    runs += [run(2, 1, s, one[s] / 1.41) for s in (1, 2, 0)]
    summary = bench.summarise(runs, "k=0, 1 thread")
    ratios = [one[s] / k1[s] for s in (0, 1, 2)]  # 1.6, 1.5, 1.5556
    mean = sum(ratios) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    goal = summary["k=1"]["goal"]
    assert goal["baseline"] == "k=0, 1 thread" and goal["level"] == 0.975  # two asynchronous modes: Bonferroni
    assert goal["speedup"][0] == pytest.approx(mean)
    assert goal["speedup"][1] == pytest.approx(6.205 * sd / math.sqrt(3))
    assert summary["k=1"]["speedup_vs"]["k=0, 1 thread"][1] == pytest.approx(4.30 * sd / math.sqrt(3))  # the table: 95%
    # mean 1.552, half 0.180: the corrected interval [1.372, 1.732] crosses 1.4
    assert goal["verdict"] == "inconclusive"
    assert goal["reward_equal"] is False  # the same difference -0.01 on every seed: its interval is [-0.01, -0.01]
    # k = 2 is 1.41x on every seed: no spread, the interval [1.41, 1.41] lies above the goal
    assert summary["k=2"]["goal"]["verdict"] == "met" and summary["k=2"]["goal"]["reward_equal"] is True


def test_verdicts_at_either_side_of_the_goal(bench):
    base = [run(0, 1, s, 7.0) for s in range(3)]
    fast = bench.summarise(base + [run(1, 1, s, 7.0 / r) for s, r in enumerate((1.60, 1.62, 1.64))], "k=0, 1 thread")
    slow = bench.summarise(base + [run(1, 1, s, 7.0 / r) for s, r in enumerate((1.20, 1.22, 1.24))], "k=0, 1 thread")
    assert fast["k=1"]["goal"]["level"] == 0.95  # one asynchronous mode: no correction
    assert fast["k=1"]["goal"]["verdict"] == "met"  # 1.62 ± 4.30 * 0.02 / sqrt(3) = [1.57, 1.67]
    assert slow["k=1"]["goal"]["verdict"] == "not met"
    three = bench.summarise(base + [run(k, 1, s, 4.0) for k in (1, 2, 3) for s in range(3)], "k=0, 1 thread")
    assert "verdict" in three["k=1"]["goal"] and "speedup" not in three["k=1"]["goal"]  # no tabled correction: no verdict


def test_the_goal_is_judged_against_the_one_thread_loop_of_the_modes_backend(bench):
    runs = [run(0, 1, s, 8.0) for s in range(2)] + [run(0, 1, s, 6.0, backend="vllm") for s in range(2)]
    runs += [run(1, 1, s, 4.0, backend="vllm") for s in range(2)]
    goal = bench.summarise(runs, "k=0, 1 thread")["k=1, vllm"]["goal"]
    assert goal["baseline"] == "k=0, 1 thread, vllm" and goal["speedup"][0] == pytest.approx(1.5)


def test_the_ceiling_of_one_core_per_stage_by_hand(bench):
    # one thread: generation 4.4 s, update 2.8 s; two threads: 3.8 s and 1.5 s (s_g = 4.4 / 3.8, s_u = 2.8 / 1.5)
    runs = [run(0, 1, 0, 7.2, 4.4, 2.8), run(0, 2, 0, 5.3, 3.8, 1.5), run(1, 1, 0, 4.5)]
    x = bench.summarise(runs, "k=0, 2 threads")["k=1"]
    assert x["ceiling_vs"]["k=0, 2 threads"][0] == pytest.approx(3.8 / 4.4 + 1.5 / 2.8)
    assert "k=0, 1 thread" not in x["ceiling_vs"]  # one thread: the stages gain nothing to lose
    assert x["pipeline_limit_vs"]["k=0, 2 threads"][0] == pytest.approx(5.3 / 4.4)
    assert x["two_core_limit_vs"]["k=0, 2 threads"][0] == pytest.approx(5.3 / 3.6)
    # a baseline on several threads of another backend gives no ceiling (its thread speed-ups are not the stages')
    runs = [run(0, 1, 0, 7.2, 4.4, 2.8), run(0, 2, 0, 5.3, 3.8, 1.5), run(0, 1, 0, 7.0, 3.9, 3.1, backend="vllm"),
            run(1, 1, 0, 4.5, backend="vllm")]
    x = bench.summarise(runs, "k=0, 2 threads")["k=1, vllm"]
    assert x["ceiling_vs"] == {} and "k=0, 2 threads" in x["pipeline_limit_vs"]


def test_the_whole_machine_is_judged_as_the_secondary_comparison(bench):
    runs = [run(0, 1, s, 7.0) for s in range(3)] + [run(0, 2, s, 5.4) for s in range(3)]
    runs += [run(1, 1, s, t) for s, t in enumerate((4.3, 4.4, 4.5))]
    x = bench.summarise(runs, "k=0, 2 threads")["k=1"]
    assert x["goal"]["baseline"] == "k=0, 1 thread" and x["goal"]["verdict"] == "met"
    whole = x["goal_whole_machine"]
    assert whole["baseline"] == "k=0, 2 threads" and whole["verdict"] == "not met"  # 1.20-1.26x
    assert whole["speedup"][0] == pytest.approx(sum(5.4 / t for t in (4.3, 4.4, 4.5)) / 3)
    only_one = bench.summarise([r for r in runs if r["threads"] == 1], "k=0, 1 thread")["k=1"]
    assert "goal_whole_machine" not in only_one  # the baseline is the goal's own


def test_from_json_recomputes_the_summary_and_refuses_a_foreign_file(bench, tmp_path, capsys, monkeypatch):
    runs = [run(0, 1, s, 7.0) for s in range(3)] + [run(1, 1, s, 4.0 + 0.1 * s) for s in range(3)]
    settings = {"argv": "", "seeds": [0, 1, 2], "batch_size": 2, "new_tokens": 16, "iterations": 12}
    stored = {"date": "2000-01-01 00:00 UTC", "cpus": 2, "settings": settings, "runs": runs, "baseline": "k=0, 1 thread",
              "summary": {}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(stored))
    again = bench.resummarise(path)
    summary = json.loads(json.dumps(bench.summarise(runs, "k=0, 1 thread")))
    assert again["summary"] == summary and "summarised" in again
    assert again["endpoint_declared"] is False  # its stored summary held no declared verdicts
    # an unchanged analysis leaves the file as it was, its dates included
    kept = {**stored, "summary": summary, "summarised": "2000-01-02 00:00 UTC"}
    path.write_text(json.dumps(kept))
    assert bench.resummarise(path) == kept
    # a run whose own summary held the verdicts keeps its declaration when the analysis changes
    declared = {**stored, "summary": {"k=1": {"k": 1, "goal": {}}}}
    path.write_text(json.dumps(declared))
    assert bench.resummarise(path)["endpoint_declared"] is True
    # main writes beside the file by default
    path.write_text(json.dumps(stored))
    monkeypatch.setattr("sys.argv", ["async.py", "--from-json", str(path)])
    bench.main()
    assert json.loads(path.read_text())["summary"] == summary
    assert path.with_suffix(".md").read_text().startswith("# Asynchronous rollouts")
    capsys.readouterr()
    for bad in ([], {"rows": []}, {"runs": 5, "baseline": "x"}, {**stored, "runs": [{"k": 0}]},
                {key: v for key, v in stored.items() if key != "settings"}):
        foreign = tmp_path / "bad.json"
        foreign.write_text(json.dumps(bad))
        monkeypatch.setattr("sys.argv", ["async.py", "--from-json", str(foreign)])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a results JSON" in err
        assert not foreign.with_suffix(".md").exists() and json.loads(foreign.read_text()) == bad  # nothing written
