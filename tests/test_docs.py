"""The documentation: the README, the MkDocs site, its generated pages and the example configs.

The generated pages (docs/reference/*.md from the config dataclasses and the algorithm registry,
docs/results/*.md and the README's headline table from benchmarks/results/*.json) are rewritten by
one command, `python scripts/render_docs.py`; a test here renders them afresh and compares.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cory.cli import main
from cory.config import load_config, valid_keys

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
REGENERATE = "python scripts/render_docs.py"


def render_docs():
    """scripts/render_docs.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_equal_a_fresh_rendering():
    """docs/reference/config.md (`cory config --markdown`), docs/reference/algorithms.md
    (`cory algos --markdown`), docs/results/*.md and the README's table between its markers."""
    stale = [str(path.relative_to(REPO)) for path, text in render_docs().render().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert not stale, (f"generated pages out of date: {', '.join(stale)}; regenerate them with `{REGENERATE}` "
                       "(after a config key, an algorithm or a benchmark result changed) and commit the result")


def test_config_page_lists_every_key():
    page = (REPO / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    missing = [key for key in valid_keys() if f"`{key}`" not in page]
    assert not missing, f"docs/reference/config.md lacks {missing}; regenerate it with `{REGENERATE}`"


def test_markdown_generators_run_from_the_command_line(capsys):
    assert main(["config", "--markdown", "kl"]) == 0
    out = capsys.readouterr().out
    assert "`kl.hard_budget`" in out and "`algo.lr`" not in out
    assert main(["algos", "--markdown"]) == 0
    assert "| `grpo` |" in capsys.readouterr().out


def test_site_builds_with_strict(tmp_path):
    """`mkdocs build --strict` into a temporary folder: a broken link, a missing page or a missing
    anchor fails it. The repository is not written to."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    had_site = (REPO / "site").exists()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "results" / "img").is_dir()  # the benchmarks' plots, served by the hook
    assert (REPO / "site").exists() == had_site


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo") and first_block.splitlines()[1].startswith("make test")


def documented_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])


def test_every_example_file_named_in_the_docs_exists_and_every_example_is_documented():
    text = documented_text()
    named = set(re.findall(r"examples/[\w./-]+\.yaml", text))
    assert not [n for n in named if not (REPO / n).exists()]
    examples_page = (REPO / "docs" / "examples.md").read_text(encoding="utf-8")
    assert not [p.name for p in EXAMPLES if f"examples/{p.name}" not in examples_page]


def test_every_override_in_the_docs_code_blocks_is_a_config_key():
    """`section.key=value` in the README's and the docs' shell blocks names a key that exists."""
    keys, sections = set(valid_keys()), {k.split(".")[0] for k in valid_keys()}
    blocks = re.findall(r"```bash\n(.*?)```", documented_text(), re.S)
    used = {m for block in blocks for m in re.findall(r"(?<![\w./:-])'?([a-z_]+(?:\.[a-z_]+)+)=", block)}
    unknown = sorted(k for k in used if k.split(".")[0] in sections and k not in keys)
    assert not unknown, f"unknown config keys in the docs: {unknown}"


# -- every example config runs ---------------------------------------------------------------------------
SWAP = {
    "cory:tiny-reviews": "cory:micro-reviews",
    "cory:tiny-sentiment": "cory:micro-sentiment",
    "cory:tiny-agent": "cory:micro-agent",
    "cory:tiny-dialogue": "cory:micro-dialogue",
    "cory:tiny-arith": "cory:micro-arith",
    "cory:tiny-reviews@seed1": "cory:micro-reviews@seed1",
}
"""The embedded models an example names -> the test-size models of the same recipe family (built in
seconds into the session cache). cory:smollm2-135m-instruct stays itself (converted once per machine)."""

ENV_KWARGS = {
    "cory/Bandit-v0": "{horizon: 5}",
    # The micro student is trained on rows of 128 tokens: keep its conversations inside them.
    "cory/TeacherStudent-v0": "{student: 'cory:micro-dialogue', max_tokens: 48, context_tokens: 96}",
}
"""What each environment's example changes in env.kwargs (merged into the file's kwargs)."""


def example_overrides(path: Path) -> list[str]:
    """The overrides the example test adds to a file: the swaps above, then one iteration of a small
    batch with short answers and a small evaluation. Everything else is the file's own."""
    cfg = load_config(path)
    out = [f"{key}={SWAP[value]}" for key, value in (("model.name", cfg.model.name), ("task.reward", cfg.task.reward),
                                                      ("distill.teacher", cfg.distill.teacher)) if value in SWAP]
    out += ["train.iterations=1", "train.batch_size=1",
            f"generation.max_new_tokens={min(cfg.generation.max_new_tokens, 8)}", "train.progress=false",
            "eval.samples_per_prompt=1"]
    if cfg.env.id:
        out += ["env.eval_episodes=2", f"env.kwargs={ENV_KWARGS[cfg.env.id]}"]
    else:
        out += ["task.num_eval_prompts=2"]
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_one_iteration_as_documented(path, tmp_path, zoo_cache, request, monkeypatch):
    """Each examples/*.yaml, through `cory train --config FILE --output-dir DIR` as documented, for
    one iteration. What is swapped: the tiny embedded models for their test-size versions (`SWAP`:
    cory:tiny-reviews -> cory:micro-reviews, cory:tiny-sentiment -> cory:micro-sentiment,
    cory:tiny-agent -> cory:micro-agent, cory:tiny-dialogue -> cory:micro-dialogue, cory:tiny-arith ->
    cory:micro-arith, a distillation teacher cory:tiny-reviews@seed1 -> cory:micro-reviews@seed1, and
    the teacher-student environment's student likewise), and the sizes (`example_overrides`: 1 iteration
    of one prompt or episode (times the algorithm's group size), at most 8 new tokens, 2 evaluation
    prompts or episodes of 1 sample, bandit horizon 5, conversations of 48 tokens). Every other key, the algorithm and its settings, the
    KL control, CORY, chat templates and rewards included, is the file's own. It checks that the file
    loads, the run finishes with exit status 0 and writes its metrics row and an ordinary HF
    `final/` folder."""
    cfg = load_config(path)
    if cfg.model.name == "cory:smollm2-135m-instruct":
        request.getfixturevalue("smollm2")
    monkeypatch.chdir(REPO)  # an example's data files are named from the repository's root, as documented
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output-dir", str(out), *example_overrides(path)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]
    assert (out / "final" / "config.json").is_file()


def test_accelerate_launch_configs_parse():
    """examples/accelerate/*.yaml are accelerate launch files (GPUs), read here, not run."""
    for path in sorted((REPO / "examples" / "accelerate").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data["distributed_type"] in ("FSDP", "DEEPSPEED"), path
