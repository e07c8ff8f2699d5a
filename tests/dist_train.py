"""Launched by test_distributed.py under torchrun: trains, then each rank writes a digest of its
own parameters, so the test can check that data-parallel training kept the ranks identical."""

import hashlib
import sys
from pathlib import Path


from cory.config import load_config
from cory.sharding import gathered_state_dict
from cory.train import TrainingRun

if __name__ == "__main__":
    out = Path(sys.argv[1])
    resume = "--resume" in sys.argv
    run = TrainingRun(load_config(None, [a for a in sys.argv[2:] if a != "--resume"]), out)
    run.run(resume=resume)
    # The weights each rank actually trained with (not the copy rank 0 saved).
    rank = run.accelerator.process_index
    digest = hashlib.sha256()
    # (Under FSDP the weights are whole again after the last update.)
    for name, p in sorted(gathered_state_dict(run.policy.module).items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().float().numpy().tobytes())
    (out / f"digest_rank{rank}.txt").write_text(digest.hexdigest())
