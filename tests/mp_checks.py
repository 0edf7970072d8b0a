"""Run under `torchrun --nproc_per_node=2` by tests/test_multiprocess.py (one launch, several checks).

Writes rank-0 results to OUT_DIR; the pytest side compares them with 1-process runs:
- DP=2 gradients of global batch 0 (micro-batch 2 and 1) -> dp2_mbs{2,1}.pt
- noise of the same samples on both TP ranks of one replica -> checked here (raises if different)
- TP=2 + sequence parallel losses over 3 steps -> tp2_losses.pt
"""
import os
import sys

import torch
import torch.distributed as dist


def main(out_dir):
    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    base = ["recipe=smoke", "train.global_batch_size=4", "wandb.mode=disabled"]
    rank = int(os.environ["RANK"])
    for mbs in (2, 1):
        tr = Trainer(load_config([*base, f"train.micro_batch_size={mbs}", f"run.dir={out_dir}/dp_{mbs}"]))
        assert tr.layout.dp == 2
        sums, counts = tr.forward_backward(0)
        if rank == 0:
            g = {n: p.main_grad.clone() for n, p in tr.ddp.module.named_parameters()}
            torch.save({"grads": g, "sums": sums, "counts": counts}, f"{out_dir}/dp2_mbs{mbs}.pt")
    tr = Trainer(load_config([*base, "train.micro_batch_size=4", "parallel=tp2", f"run.dir={out_dir}/tp2"]))
    assert tr.layout.tp == 2 and tr.layout.dp == 1
    preps, _ = tr._prepare(tr.train_ds, 0)
    mine = torch.stack([p.masked for p in preps]).float()
    other = mine.clone()
    dist.broadcast(other, src=0)
    assert torch.equal(mine, other), "noise differs across tensor-parallel ranks"
    losses = [tr.train_step(s) for s in range(3)]
    if rank == 0:
        torch.save(losses, f"{out_dir}/tp2_losses.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
