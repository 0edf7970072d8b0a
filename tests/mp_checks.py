"""Run under `torchrun --nproc_per_node=N` by tests/test_multiprocess.py (one launch, many checks).

Writes rank-0 results to OUT_DIR; the pytest side compares them with 1-process runs.
  python mp_checks.py OUT_DIR TP1_CHECKPOINT_RUN_DIR        (2 processes)
  python mp_checks.py OUT_DIR --four                        (4 processes: TP=2 x DP=2)
"""
import os
import shutil
import sys

import torch
import torch.distributed as dist

BASE = ["recipe=smoke", "train.global_batch_size=4", "wandb.mode=disabled"]
STAGES = {"ar": ["objective=ar"], "joint": ["objective=joint"]}
LAYOUTS = {  # name -> overrides (2 processes)
    "dp2_mbs2": ["train.micro_batch_size=2"],
    "dp2_mbs1": ["train.micro_batch_size=1"],
    "tp2": ["train.micro_batch_size=2", "parallel.tensor_model_parallel_size=2"],
    "tp2sp": ["train.micro_batch_size=2", "parallel=tp2"],
    "dp2_zero": ["train.micro_batch_size=2", "parallel.distributed_optimizer=true"],
    # gradient all-reduce overlapped with the last micro-batch's backward, in buckets small enough
    # that the smoke model has 8 of them (OVERLAP_TWINS: the same layouts without overlap)
    "dp2_overlap": ["train.micro_batch_size=1", "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=5000"],
    "dp2_zero_overlap": ["train.micro_batch_size=2", "parallel.distributed_optimizer=true",
                         "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=5000"],
}
ZERO = "parallel.distributed_optimizer=true"
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=5000"]
# overlapped layout -> the same layout without overlap: gradients and losses equal bit for bit
OVERLAP_TWINS = {"dp2_overlap": "dp2_mbs1", "dp2_zero_overlap": "dp2_zero"}
OVERLAP_TWINS_FOUR = {"joint_tp2dp2_overlap": "joint_tp2dp2", "joint_tp2dp2_zero_overlap": "joint_tp2dp2_zero"}


def gather_full(model):
    """Gradients by parameter name in the TP=1 layout (a linear_fc1 shard is [gate_r; up_r])."""
    from megatron.core import parallel_state as ps
    tp, out = ps.get_tensor_model_parallel_world_size(), {}
    for n, p in model.named_parameters():
        t = p.main_grad
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            if "linear_fc1" in n:
                halves = [x.chunk(2, 0) for x in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                t = torch.cat(parts, p.partition_dim)
        out[n] = t.clone()
    return out


def trainer(overrides):
    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    return Trainer(load_config([*BASE, *overrides]))


def equivalence(out_dir, name, overrides):
    """Gradients of global batch 0 and losses over 3 steps; noise checks across ranks."""
    tr = trainer([*overrides, f"run.dir={out_dir}/{name}"])
    preps, _ = tr._prepare(tr.train_ds, 0)
    mine = torch.stack([p.masked if p.masked is not None else p.loss_mask.bool() for p in preps]).float()
    from megatron.core import parallel_state as ps
    if tr.layout.tp > 1:  # TP peers of one replica draw identical noise
        other = mine.clone()
        dist.broadcast(other, src=dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())[0],
                       group=ps.get_tensor_model_parallel_group())
        assert torch.equal(mine, other), f"{name}: noise differs across tensor-parallel ranks"
    if tr.layout.dp > 1 and tr.objective.has_diffusion:  # DP ranks see other samples, other noise
        both = [torch.empty_like(mine) for _ in range(tr.layout.dp)]
        dist.all_gather(both, mine, group=ps.get_data_parallel_group())
        assert not torch.equal(both[0], both[1]), f"{name}: noise identical across data-parallel ranks"
    sums, counts = tr.forward_backward(0)
    grads = gather_full(tr.ddp.module)
    losses = [tr.train_step(s) for s in range(3)]
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "sums": sums, "counts": counts, "losses": losses}, f"{out_dir}/{name}.pt")
    tr.close()


def check_weights_moved_as_drawn(m, p):
    """Build the model plainly and with every drawn weight handed to a mover (a copy here, the GPU
    in build_model on CUDA): the same weights bit for bit, and every matrix went through the mover
    (what stays on the host until the end is 1-D: norm weights)."""
    from megatron.core.tensor_parallel import layers

    from nld_train.model.gpt import build_model, weights_drawn_on_cpu_then
    draw = layers._initialize_affine_weight_cpu
    ref = build_model(m, p, 64, seed=5).state_dict()
    moved = []
    with weights_drawn_on_cpu_then(lambda t: moved.append(t.clone()) or moved[-1]):
        model = build_model(m, p, 64, seed=5)
    assert layers._initialize_affine_weight_cpu is draw  # the patch is gone afterwards
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:  # (megatron's _extra_state entries are None)
        assert torch.equal(got[k], ref[k]) if torch.is_tensor(ref[k]) else got[k] == ref[k], k
    matrices = [q for q in model.parameters() if q.ndim >= 2]
    assert len(moved) == len(matrices) > 0
    if matrices[0].device.type == "cpu":  # on CUDA build_model moves the copies on to the GPU
        assert {q.data_ptr() for q in matrices} == {t.data_ptr() for t in moved}


def init_checks(out_dir):
    """TP=2: the weights handed to the device as they are drawn equal the CPU initialisation."""
    from nld_train.cli import load_config
    from nld_train.dist import init_distributed
    cfg = load_config([*BASE, "parallel=tp2"])
    init_distributed(2, seed=cfg.train.seed)
    check_weights_moved_as_drawn(cfg.model, cfg.parallel)
    done = torch.ones(dist.get_world_size())
    dist.all_reduce(done)  # every rank got here
    if dist.get_rank() == 0:
        torch.save({"ranks_passed": int(done[0])}, f"{out_dir}/init_tp2.pt")


def run_to(run_dir, max_steps, overrides):
    tr = trainer([*overrides, f"run.dir={run_dir}", f"train.max_steps={max_steps}", "train.lr_schedule_steps=8"])
    tr.fit()
    tr.close()


def copy_tree(src, dst):
    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
    dist.barrier()


def zero_checks(out_dir):
    """parallel.distributed_optimizer: the same weights bit for bit as the unsharded optimizer after
    3 steps, with each rank holding about half of the AdamW state."""
    from nld_train.dist import local_optimizer
    weights, numel = {}, {}
    for name, ov in (("plain", []), ("zero", [ZERO])):
        tr = trainer(["objective=joint", "train.micro_batch_size=2", f"run.dir={out_dir}/bitwise_{name}", *ov])
        for s in range(3):
            tr.train_step(s)
        weights[name] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        local = torch.tensor([sum(p.numel() for p in local_optimizer(tr.optimizer).state)])
        both = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(both, local)
        numel[name] = [int(x) for x in both]
        total = sum(p.numel() for p in tr.params)
        tr.close()
    if dist.get_rank() == 0:
        equal = all(torch.equal(weights["plain"][k], weights["zero"][k]) for k in weights["plain"])
        torch.save({"equal": equal, "numel": numel, "total": total}, f"{out_dir}/zero_bitwise.pt")


def main(out_dir, arg):
    if arg == "--four":
        for stage, ov in STAGES.items():
            equivalence(out_dir, f"{stage}_tp2dp2", [*ov, "train.micro_batch_size=1", "parallel=tp2"])
        four_joint = [*STAGES["joint"], "train.micro_batch_size=1", "parallel=tp2"]
        equivalence(out_dir, "joint_tp2dp2_overlap", [*four_joint, *OVERLAP])
        equivalence(out_dir, "joint_tp2dp2_zero", [*four_joint, ZERO])
        equivalence(out_dir, "joint_tp2dp2_zero_overlap", [*four_joint, ZERO, *OVERLAP])
        # the sharded optimizer state at TP=2 x DP=2: a checkpoint at step 2 and its continuation
        four = ["train.micro_batch_size=1", "parallel=tp2", ZERO]
        run_to(f"{out_dir}/zero4_ckpt", 2, four)
        copy_tree(f"{out_dir}/zero4_ckpt", f"{out_dir}/zero4_cont")
        run_to(f"{out_dir}/zero4_cont", 4, four)
    else:
        for stage, ov in STAGES.items():
            for name, layout in LAYOUTS.items():
                equivalence(out_dir, f"{stage}_{name}", [*ov, *layout])
        # resharding: a TP=1 checkpoint (step 2) continues at DP=2 and at TP=2 + SP
        copy_tree(arg, f"{out_dir}/from_tp1_dp2")
        run_to(f"{out_dir}/from_tp1_dp2", 4, ["train.micro_batch_size=1"])
        copy_tree(arg, f"{out_dir}/from_tp1_tp2")
        run_to(f"{out_dir}/from_tp1_tp2", 4, ["train.micro_batch_size=2", "parallel=tp2"])
        copy_tree(arg, f"{out_dir}/from_tp1_dp2_zero")  # the unsharded optimizer state, now sharded
        run_to(f"{out_dir}/from_tp1_dp2_zero", 4, ["train.micro_batch_size=1", ZERO])
        # a checkpoint of the sharded state (step 2) and its sharded continuation
        run_to(f"{out_dir}/zero_ckpt", 2, ["train.micro_batch_size=2", ZERO])
        copy_tree(f"{out_dir}/zero_ckpt", f"{out_dir}/zero_cont")
        run_to(f"{out_dir}/zero_cont", 4, ["train.micro_batch_size=2", ZERO])
        zero_checks(out_dir)
        init_checks(out_dir)
        # a TP=2 checkpoint at step 2 (kept for the 1-process side) and its TP=2 continuation
        run_to(f"{out_dir}/tp2_ckpt", 2, ["train.micro_batch_size=2", "parallel=tp2"])
        copy_tree(f"{out_dir}/tp2_ckpt", f"{out_dir}/tp2_cont")
        run_to(f"{out_dir}/tp2_cont", 4, ["train.micro_batch_size=2", "parallel=tp2"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1], sys.argv[2])
