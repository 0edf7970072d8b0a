"""Run under `torchrun --nproc_per_node=2` by tests/test_multiprocess.py: an evaluation on rank 0
during training that outlasts the process-group timeout (parallel.timeout_minutes).

  python mp_eval_wait.py OUT_DIR
1. a slow evaluation (EVAL_S seconds) with a timeout of TIMEOUT_MIN minutes: the run must finish
   (rank 1 waits for rank 0 outside any collective) and log the evaluation's row;
2. a function raising on rank 0 under nld_train.dist.on_rank0 (what the trainer wraps the
   evaluation in): every rank must raise it instead of hanging.
Each rank writes OUT_DIR/rank<r>.json.
"""
import json
import os
import sys
import time

TIMEOUT_MIN = 0.2  # 12 s: above any wait of a smoke run's start-up (busy machines too), below EVAL_S
EVAL_S = 25


def main(out_dir):
    import torch.distributed as dist

    from nld_train.cli import load_config
    from nld_train.dist import on_rank0
    from nld_train.train.trainer import Trainer
    assert EVAL_S > 2 * TIMEOUT_MIN * 60

    def slow_eval(trainer):
        time.sleep(EVAL_S)
        return {"eval/slow/accuracy": 1.0}

    def failing_eval():
        raise ValueError("the evaluation broke")

    result = {}
    tr = Trainer(load_config(["recipe=smoke", "train.global_batch_size=4", "train.micro_batch_size=2",
                              "wandb.mode=disabled", "train.max_steps=1", "eval.interval=1",
                              f"parallel.timeout_minutes={TIMEOUT_MIN}", f"run.dir={out_dir}/slow"]),
                 eval_hook=slow_eval)
    t0 = time.time()
    tr.fit()  # the evaluation at step 1, then the final checkpoint: a collective right after it
    tr.close()
    result["slow_s"] = time.time() - t0
    try:
        on_rank0(failing_eval)
        result["fail"] = None
    except Exception as e:  # noqa: BLE001 - the point is which error each rank gets
        result["fail"] = f"{type(e).__name__}: {e}"
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1])
