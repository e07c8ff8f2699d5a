"""Launched by test_distributed.py: cory's Learner updates a policy sharded by FSDP2 (torch
fully_shard) in 2 CPU processes (gloo), or, with `single`, the same policy unsharded in one process
on the union of the two processes' rollouts. Writes the full parameters each process ends with."""

import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cory.algorithms import make_algorithm
from cory.config import load_config
from cory.learner import Learner
from cory.policy import Policy
from cory.rollout import Rollout, Targets, TokenScores
from cory.sharding import gathered_state_dict, shard_policy
from cory.build import load_reference, make_accelerator

ROWS, LQ, LR = 16, 5, 7


def rollout(vocab: int, rows: slice) -> Rollout:
    """A fixed batch of 16 turns (the same in every mode); full-length responses, so every token
    weighs the same in any split of the batch."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(3, vocab, (ROWS, LQ), generator=g)
    r = torch.randint(3, vocab, (ROWS, LR), generator=g)
    adv = torch.randn(ROWS, LR, generator=g)
    n = ROWS
    full = Rollout(query_ids=q, query_mask=torch.ones_like(q), response_ids=r, response_mask=torch.ones_like(r),
                   logprobs=torch.zeros(n, LR), scores=torch.zeros(n), finished=torch.ones(n, dtype=torch.bool),
                   episode_ids=torch.arange(n), turn_index=torch.zeros(n, dtype=torch.long), done=torch.ones(n, dtype=torch.bool),
                   group_ids=torch.arange(n),
                   scored=TokenScores(ref_logprobs=torch.zeros(n, LR), kl=torch.zeros(n, LR)),
                   targets=Targets(rewards=torch.zeros(n, LR), advantages=adv, returns=None, loss_mask=torch.ones_like(r)))
    return full.select(list(range(ROWS))[rows])


if __name__ == "__main__":
    out, mode, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    local = ROWS // 2 if mode == "fsdp" else ROWS
    # Two epochs of two micro-batches each: accumulation and several optimizer steps under FSDP.
    cfg = load_config(None, [f"model.name={model}", "algo.name=reinforce", "algo.lr=1e-3", "algo.epochs=2",
                             f"algo.micro_batch_size={local // 2}", "algo.max_grad_norm=0.5", "train.log_with=[]"])
    acc = make_accelerator(cfg, out)
    policy = Policy.from_pretrained(model)
    if mode == "fsdp":
        assert acc.num_processes == 2
        shard_policy(policy.module)
    learner = Learner(policy, load_reference(model, torch.float32), make_algorithm(cfg), cfg, acc)
    rank = acc.process_index
    batch = rollout(policy.model.config.vocab_size, slice(rank * local, (rank + 1) * local))
    metrics, _ = learner.update(batch)
    assert metrics["grad_norm"] > 0.5  # clipping acted
    # After an update the learner holds the whole weights again (on every process).
    state = {k: v.cpu().contiguous().clone() for k, v in gathered_state_dict(policy.module).items()}
    digest = hashlib.sha256()
    for name, value in sorted(state.items()):
        digest.update(name.encode())
        digest.update(value.float().numpy().tobytes())
    (out / f"digest_{mode}_rank{rank}.txt").write_text(digest.hexdigest())
    if rank == 0:
        # Tied weights (embeddings = LM head) appear under both names; safetensors wants one copy each.
        save_file({k: v.clone() for k, v in state.items()}, str(out / f"{mode}.safetensors"))
