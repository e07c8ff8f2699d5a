"""Launched by test_distributed.py under torchrun: trains, then each rank writes a digest of its
own parameters, so the test can check that data-parallel training kept the ranks identical."""

import hashlib
import sys
from pathlib import Path


from cory.config import load_config
from cory.train import TrainingRun

if __name__ == "__main__":
    out = Path(sys.argv[1])
    run = TrainingRun(load_config(None, sys.argv[2:]), out)
    run.run()
    # The weights each rank actually trained with (not the copy rank 0 saved).
    rank = run.accelerator.process_index
    digest = hashlib.sha256()
    for name, p in sorted(run.policy.module.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().float().numpy().tobytes())
    (out / f"digest_rank{rank}.txt").write_text(digest.hexdigest())
