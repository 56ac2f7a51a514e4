"""Run by tests/test_monitor_fsdp.py in 2 processes (gloo, CPU): the safety monitor on a LoRA model sharded by FSDP1
or FSDP2, as the Trainer calls it (before training, then after an optimizer step), against the unsharded model.

Usage: monitor_fsdp_worker.py PORT OUT.json TOKENIZER_DIR FSDP_VERSION
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

HARMFUL = ["How do I kill a Python process?", "What color is the sky?", "Name a color."]
BENIGN = ["Two plus two is four."]


class StubTrainer:
    """What the monitor reads from a transformers Trainer: the wrapped model, add_callback and log."""

    def __init__(self, wrapped):
        self.model_wrapped, self.logged = wrapped, []

    def add_callback(self, callback):
        pass

    def log(self, logs):
        self.logged.append(logs)


def shard(model, version: int):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if version == 2:  # as accelerate does: each decoder layer a unit, then the whole model the root
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, LlamaDecoderLayer):
                fully_shard(module)
        fully_shard(model)
        return model, model
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    cpu = torch.device("cpu")  # FSDP1 looks for an accelerator unless told the device
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=cpu)
    return wrapped, model  # the Trainer's model_wrapped, and the model callbacks receive


def train_step(model, optimizer, batch) -> float:
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def diverging_generation(model, tokenizer, trainer, rank: int) -> list[str]:
    """Rank 0 stops after 2 tokens, rank 1 after 6: with synced_gpus rank 0 keeps running forwards (each one an
    all-gather of the layers' shards) until rank 1 is done, as a near-tie that ends one rank's answers early would."""
    from logitguard.callbacks import gathered_for_generation
    from logitguard.eval.generate import generate_responses

    with gathered_for_generation(model, trainer):
        return generate_responses(model, tokenizer, HARMFUL, 2 if rank == 0 else 6, progress=False,
                                  inference_mode=False, synced_gpus=True)  # fmt: skip


def nan_on_one_rank_stops_all(rank: int) -> bool:
    """A NaN in rank 1's gradient shard only, no loss term watched: FiniteGradients must stop both ranks."""
    from transformers import TrainerState

    from logitguard.guards import FiniteGradients
    from logitguard.losses import NonFiniteLossError

    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.full((2, 2), float("nan") if rank == 1 else 0.0)
    try:
        FiniteGradients().on_pre_optimizer_step(None, TrainerState(), None, model=layer)
    except NonFiniteLossError:
        return True
    return False


def mixed_rows_on_each_rank(model, tokenizer, cache_dir: str) -> tuple[int, list]:
    """`safety_mix: self`'s generation under two processes: (how many times this rank generated, its rows)."""
    import logitguard.eval.generate as generate
    from logitguard.methods.mixing import self_refusals

    calls, real = [], generate.generate_responses
    generate.generate_responses = lambda *a, **k: calls.append(1) or real(*a, **k)
    prompts = os.path.join(cache_dir, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(HARMFUL) + "\n")
    try:
        _, info = self_refusals(model, tokenizer, prompts, cache_dir, max_new_tokens=4, keywords="qi2023",
                                progress=False)  # fmt: skip
    finally:
        generate.generate_responses = real
    with open(info["cache"]) as f:
        return len(calls), json.load(f)["dropped"]


def main(rank: int, world: int, port: str, out: str, tokenizer_dir: str, version: int) -> None:
    # what `accelerate launch` sets, so that accelerate's PartialState sees the two processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from conftest import tiny_llama
    from helpers import perturb_adapter
    from transformers import AutoTokenizer, TrainerControl, TrainerState

    from logitguard.callbacks import SafetyMonitor
    from logitguard.eval.generate import generate_responses
    from logitguard.models import attach_method

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    plain = attach_method(tiny_llama(len(tokenizer), hidden=32), "lora", rank=4, alpha=8, dropout=0.0,
                          target_modules=["q_proj", "v_proj"])  # fmt: skip
    perturb_adapter(plain, scale=0.2)
    wrapped, model = shard(copy.deepcopy(plain), version)
    batch = tokenizer(["I cannot help with that. Sure, here is how to do it."], return_tensors="pt")
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain,)]
    optimizers.append(torch.optim.AdamW(trainable, lr=1e-2))

    seen: list[str] = []
    monitor = SafetyMonitor(tokenizer, HARMFUL, BENIGN, every=1, max_new_tokens=6,
                            refusal=lambda text: seen.append(text) or False)  # fmt: skip
    if version == 1:
        monitor.attach(StubTrainer(wrapped))
    state, control = TrainerState(), TrainerControl()
    monitor.on_train_begin(None, state, control, model=model)  # step 0: skipped under FSDP
    skipped_at_start = monitor.history == [] and seen == []

    losses = [train_step(plain, optimizers[0], batch), train_step(wrapped, optimizers[1], batch)]
    state.global_step = 1
    monitor.on_step_end(None, state, control, model=model)
    expected = generate_responses(plain, tokenizer, HARMFUL, 6, progress=False)
    expected += generate_responses(plain, tokenizer, BENIGN, 6, progress=False)
    # training goes on after the check, on the same weights as the unsharded model's
    losses += [train_step(plain, optimizers[0], batch), train_step(wrapped, optimizers[1], batch)]
    diverged = diverging_generation(model, tokenizer, monitor.trainer, rank)
    diverged_expected = generate_responses(plain, tokenizer, HARMFUL, 2 if rank == 0 else 6, progress=False)
    stopped = nan_on_one_rank_stops_all(rank)
    generated, mixed = mixed_rows_on_each_rank(plain, tokenizer, os.path.dirname(out))
    each = [None, None]
    dist.all_gather_object(each, {"stopped": stopped, "generated": generated, "mixed": mixed,
                                  "diverged_equal": diverged == diverged_expected})  # fmt: skip
    report = {
        "per_rank": each,
        "skipped_at_start": skipped_at_start,
        "checked_steps": [row["step"] for row in monitor.history],
        "responses_equal": seen == expected,
        "responses": seen,
        "expected": expected,
        "losses": losses,
        "inference_tensors": sum(p.is_inference() for p in wrapped.parameters()),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()  # both ranks leave together: a rank tearing gloo down while the other is still in it can abort
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    port, out, tokenizer_dir, version = sys.argv[1:5]
    mp.spawn(main, args=(2, port, out, tokenizer_dir, int(version)), nprocs=2)
