"""The entry point of a training run, used by `cory train` and the benchmarks: every check of the
input first (writing nothing), then the run the config asks for (single agent, or CORY when
cory.enabled)."""

from __future__ import annotations

from pathlib import Path

from cory.coevolve import CoryRun
from cory.config import Config
from cory.preflight import preflight
from cory.run import check_output_dir, check_resume_config
from cory.train import TrainingRun


def train(cfg: Config, output_dir: str | Path, resume: bool = False, overwrite: bool = False, force: bool = False,
          check_inputs: bool = True) -> dict:
    """Builds the run the config asks for (single agent, or CORY when cory.enabled) and runs it.

    A fresh run refuses a directory holding another run unless `overwrite`; `resume` refuses a
    changed config (outside RESUMABLE_KEYS) unless `force`; `check_inputs` runs `preflight` (models,
    reward, prompts, environment) before anything is built. Each refusal is a one-line UsageError.
    """
    check_output_dir(output_dir, resume, overwrite)
    if resume:
        check_resume_config(cfg, output_dir, force)
    if check_inputs:
        preflight(cfg)
    options = {"resume": resume, "overwrite": overwrite}
    run = CoryRun(cfg, output_dir, **options) if cfg.cory.enabled else TrainingRun(cfg, output_dir, **options)
    try:
        return run.run()
    finally:
        run.close()
