"""The entry point of a training run, used by `cory train` and the benchmarks: the config picks
the kind of run (single agent, or CORY when cory.enabled)."""

from __future__ import annotations

from pathlib import Path

from cory.coevolve import CoryRun
from cory.config import Config
from cory.run import check_output_dir, check_resume_config
from cory.train import TrainingRun


def train(cfg: Config, output_dir: str | Path, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict:
    """Builds the run the config asks for (single agent, or CORY when cory.enabled) and runs it.

    A fresh run refuses a directory holding another run unless `overwrite`; `resume` refuses a
    changed config (outside RESUMABLE_KEYS) unless `force`.
    """
    check_output_dir(output_dir, resume, overwrite)
    if resume:
        check_resume_config(cfg, output_dir, force)
    options = {"resume": resume, "overwrite": overwrite}
    run = CoryRun(cfg, output_dir, **options) if cfg.cory.enabled else TrainingRun(cfg, output_dir, **options)
    try:
        return run.run()
    finally:
        run.close()
