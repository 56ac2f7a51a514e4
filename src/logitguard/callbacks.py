"""Watch safety while training: a transformers TrainerCallback for logitguard's trainer, TRL's or anyone's.

Every `every` optimizer steps (and once before the first) the model answers a small held-out set of harmful
prompts, and optionally benign ones, greedily; the refusal rate and the benign over-refusal go through the
Trainer's own `log` (so they reach TensorBoard / W&B and `metrics.jsonl` like the loss) as
`eval_safety_refusal`, `eval_safety_over_refusal` and `eval_safety_seconds` (the check's cost). It can stop the
run when refusal falls below a threshold, and save a checkpoint whenever refusal reaches a new best (kept from
rotation as the Trainer's best checkpoint).

    monitor = SafetyMonitor(tokenizer, harmful_prompts, benign_prompts, every=50, stop_below=0.8)
    monitor.attach(trainer)     # trainer.add_callback(monitor), and logging through trainer.log

Under `accelerate launch` every process runs the check on the same prompts (greedy decoding, so all reach the
same decision); under FSDP / ZeRO-3 generation needs every rank anyway.

Under FSDP a parameter outside its unit's forward is a shard, and `generate` enters the model below the FSDP root
(a PEFT model's generate calls the causal LM's), so the root's own parameters (embeddings, head) would stay shards.
The check therefore gathers them first: FSDP1 under `summon_full_params` of the root (the Trainer's wrapped model:
attach the monitor to the trainer), FSDP2 by unsharding the root module, which needs the root's first forward to
have run (FSDP2 makes the first module to run forward its root), so the check before training is skipped under
FSDP and the curve starts at the first check after it. Under FSDP and DeepSpeed ZeRO-3 (which gathers weights in
its own hooks) generation runs under no_grad, not inference_mode: inference tensors would end up in the gathered
parameter buffers, which the next training step needs with autograd. And there every forward is a collective, so
generation runs through `model.generate` with synced_gpus: a process whose answers have all ended (greedy decoding
can differ between processes in a near-tie) keeps running forwards until every process is done, instead of leaving
the others waiting in an all-gather.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from transformers import TrainerCallback

from .errors import LogitguardError
from .eval.keyword import is_refusal, refusal_keywords
from .models import world_size


def fsdp_version(model, trainer=None) -> int | None:
    """1 or 2 when `model` (or the trainer's wrapped model) is sharded by FSDP1 / FSDP2, else None."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return None
    for candidate in (getattr(trainer, "model_wrapped", None), model):
        for module in candidate.modules() if candidate is not None else ():
            if isinstance(module, FSDPModule):
                return 2
            if isinstance(module, FullyShardedDataParallel):
                return 1
    return None


def sharded(model, trainer=None) -> bool:
    """Whether the weights are sharded across processes (FSDP1, FSDP2, DeepSpeed ZeRO-3): each forward then gathers
    them collectively, so generation keeps the processes in step and runs outside inference_mode."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return fsdp_version(model, trainer) is not None or is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def gathered_for_generation(model, trainer=None):
    """Within the context, `model.generate` sees whole parameters under FSDP (a no-op otherwise)."""
    version = fsdp_version(model, trainer)
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = next((m for m in (getattr(trainer, "model_wrapped", None), model) if isinstance(m, FSDP)), None)
        if root is None:
            raise LogitguardError(
                "the safety monitor needs the FSDP root module to gather the parameters for generation: "
                "attach it with monitor.attach(trainer)"
            )
        # recurse=False: the root's own parameters; each inner unit gathers its own in its forward, as in training
        with FSDP.summon_full_params(root, writeback=False, recurse=False):
            yield
    elif version == 2:
        from torch.distributed.fsdp import FSDPModule

        candidates = [m for m in (model, getattr(trainer, "model_wrapped", None)) if m is not None]
        root = next(m for c in candidates for m in c.modules() if isinstance(m, FSDPModule))  # the outermost unit
        root.unshard()  # not recursive: inner units unshard in their own forward
        try:
            yield
        finally:
            root.reshard()
    else:
        yield


class SafetyMonitor(TrainerCallback):
    def __init__(
        self,
        tokenizer,
        harmful: list[str],
        benign: list[str] | None = None,
        every: int = 50,
        refusal: str | Callable[[str], bool] = "qi2023",
        max_new_tokens: int = 32,
        batch_size: int = 16,
        stop_below: float | None = None,
        save_best: bool = False,
    ):
        if not harmful:
            raise ValueError("SafetyMonitor needs at least one harmful prompt")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.tokenizer = tokenizer
        self.harmful, self.benign = list(harmful), list(benign or [])
        self.every = every
        self.is_refusal = refusal if callable(refusal) else (lambda text, name=refusal: is_refusal(text, name))
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stop_below, self.save_best = stop_below, save_best
        self.trainer = None
        self.history: list[dict] = []  # one row per check: step, refusal, over_refusal, seconds
        self.best: float | None = None

    def attach(self, trainer) -> SafetyMonitor:
        """Add to `trainer` and log through it (without a trainer, rows go to state.log_history only)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def measure(self, model) -> dict:
        from .eval.generate import generate_responses

        split = sharded(model, self.trainer)
        start = time.perf_counter()
        rates = {}
        with gathered_for_generation(model, self.trainer):
            for name, prompts in (("refusal", self.harmful), ("over_refusal", self.benign)):
                if prompts:
                    responses = generate_responses(
                        model, self.tokenizer, prompts, self.max_new_tokens, self.batch_size, progress=False,
                        inference_mode=not split, synced_gpus=split and world_size() > 1,
                    )  # fmt: skip
                    rates[name] = sum(map(self.is_refusal, responses)) / len(responses)
        rates["seconds"] = time.perf_counter() - start
        return rates

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step != 0:  # the starting point of the curve (not again on resume)
            return
        if fsdp_version(model, self.trainer) is not None:
            if state.is_world_process_zero:  # FSDP2 cannot generate before the root's first forward (module doc)
                print(f"safety monitor: under FSDP the first check is at step {self.every}, not before training")
            return
        self._check(args, state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._check(args, state, control, model)

    def _check(self, args, state, control, model) -> None:
        rates = rank_zero_values(self.measure(model))
        self.history.append({"step": state.global_step, **rates})
        logs = {f"eval_safety_{k}": v for k, v in rates.items()}
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})
        refusal = rates["refusal"]
        if self.save_best and state.global_step > 0 and (self.best is None or refusal > self.best):
            self.best = refusal
            control.should_save = True  # this step's checkpoint; marked best so rotation keeps it
            state.best_metric = refusal
            state.best_model_checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.stop_below is not None and state.global_step > 0 and refusal < self.stop_below:
            control.should_training_stop = True
            control.should_save = True
            if state.is_world_process_zero:
                print(
                    f"safety monitor: refusal {refusal:.0%} < {self.stop_below:.0%} at step {state.global_step}; "
                    "stopping (the last checkpoint is saved)",
                    flush=True,
                )


def rank_zero_values(values: dict) -> dict:
    """Rank 0's values on every process. Each rank generates on the probe itself, and greedy decoding can differ
    between ranks in a near-tie (kernels, mixed GPUs); every decision taken from the rates (stop, save, lambda, the
    rewind) must be the same on all of them, or DDP's replicas diverge and a stop on one rank hangs the others."""
    import torch.distributed as dist

    if world_size() == 1:
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def safety_monitor(cfg, tokenizer, trainer) -> SafetyMonitor | None:
    """The SafetyMonitor the monitor_* settings ask for (None without monitor_harmful), attached to `trainer`."""
    if not cfg.monitor_harmful:
        return None
    from .eval.prompts import read_prompts

    refusal_keywords(cfg.monitor_keywords)  # an unknown list name fails before training starts
    benign = read_prompts(cfg.monitor_benign) if cfg.monitor_benign else None
    return SafetyMonitor(
        tokenizer, read_prompts(cfg.monitor_harmful), benign, every=cfg.monitor_every, refusal=cfg.monitor_keywords,
        stop_below=cfg.monitor_stop_below, save_best=cfg.monitor_save_best,
    ).attach(trainer)  # fmt: skip
