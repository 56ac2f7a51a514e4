"""Run by tests/test_fsdp.py in 2 processes (gloo, CPU): head_tap under FSDP2 against the unsharded model."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))


def main(rank: int, world: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from conftest import tiny_llama
    from torch.distributed.fsdp import fully_shard

    from logitguard.reference import head_tap

    ids = torch.tensor([5, 9, 11])
    x = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, sharded = tiny_llama(300, hidden=32), tiny_llama(300, hidden=32)  # the same seed: the same weights
    results = []
    for model in (plain, sharded):
        if model is sharded:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        with head_tap(model, ids, x) as tap:
            model(input_ids=x)
        (tap["ce_sum"] + tap["safety"].pow(2).sum()).backward()
        grad = model.lm_head.weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        results.append((tap["ce_sum"].detach(), tap["safety"].detach(), grad))
    (ce_a, s_a, g_a), (ce_b, s_b, g_b) = results
    weight = sharded.lm_head.weight  # outside the forward: this rank's shard only
    report = {
        "ce_equal": bool(torch.allclose(ce_a, ce_b, atol=1e-5)),
        "safety_equal": bool(torch.allclose(s_a, s_b, atol=1e-5)),
        "head_grad_equal": bool(torch.allclose(g_a, g_b, atol=1e-5)),
        "local_rows_outside_forward": int(weight.to_local().shape[0]),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    # both ranks finish every collective before either tears gloo down: a rank that destroys its group while
    # the other still talks to it aborts with "terminate called without an active exception" (seen once in CI)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(main, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
