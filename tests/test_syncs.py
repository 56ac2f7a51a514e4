"""The training step's waits for the device: once per optimizer step, never per micro-batch or per parameter.

On a GPU every host read of a device value (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `int(t)`, `float(t)`)
stalls the host until the device has drained its queue; between two of them the GPU idles while Python queues
the next kernels. On the CPU the same calls can be counted: a spy on those methods counts the ones logitguard's
own code makes during training (the Trainer's are not ours to change; logging reads its averages at logging
steps only and is left out). A NaN is still caught, before the optimizer step, naming its term.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import chat_examples
from test_trainer import lora, make_trainer

import logitguard
from logitguard.cache import CachedReference, build_reference_cache
from logitguard.data import ChatCollator
from logitguard.guards import FiniteGradients, NonFiniteWatch, nonfinite_gradients
from logitguard.keyed import KeyedReference
from logitguard.losses import NonFiniteLossError
from logitguard.reference import OnlineReference
from logitguard.tokens import SafetyTokens

SOURCE = str(Path(logitguard.__file__).parent)
HOST_READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")


class HostReads:
    """Counts host reads of tensors made from logitguard's code (outside `log`)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._spy(name, original))

    def _spy(self, name, original):
        def spy(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(SOURCE) and caller.co_name != "log":
                self.calls.append(f"{name} in {Path(caller.co_filename).name}:{caller.co_name}")
            return original(tensor, *args, **kwargs)

        return spy


class NoIndexCollator(ChatCollator):
    """A collator without `example_idx`, as TRL's are: the cache is matched by token ids (KeyedReference)."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch.pop("example_idx", None)
        return batch


def reference_for(kind, model, tokenizer, examples, ids, tmp_path):
    if kind == "online":
        return OnlineReference(ids)
    cached = CachedReference(build_reference_cache(model, tokenizer, examples, ids, tmp_path, 64, progress=False), ids)
    return KeyedReference(cached, examples) if kind == "keyed" else cached


def reads_per_step(kind, model, tokenizer, tmp_path, monkeypatch, accum: int, steps: int = 2) -> list[str]:
    examples = chat_examples(tokenizer)[:4]
    ids = list(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    reference = reference_for(kind, model, tokenizer, examples, ids, tmp_path / "cache")
    trainer = make_trainer(tmp_path, lora(model), tokenizer, examples, 1.0, ids, reference, max_steps=steps,
                           per_device_train_batch_size=4 // accum, gradient_accumulation_steps=accum,
                           logging_steps=1000)  # fmt: skip
    if kind == "keyed":
        trainer.data_collator = NoIndexCollator(tokenizer.pad_token_id)
    moves = []
    original_to = torch.Tensor.to

    def to(tensor, *args, **kwargs):  # copies of the host's safety ids: once per device, not once per micro-batch
        if tensor is trainer.safety_ids:
            moves.append(args)
        return original_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    spy = HostReads(monkeypatch)
    trainer.train()
    monkeypatch.undo()
    assert trainer.state.global_step == steps
    assert len(moves) <= 1, moves
    return spy.calls


@pytest.mark.parametrize("kind", ["cached", "keyed", "online"])
def test_the_host_waits_once_per_optimizer_step_not_per_micro_batch(kind, model, tokenizer, tmp_path, monkeypatch):
    one = reads_per_step(kind, model, tokenizer, tmp_path / "a", monkeypatch, accum=1)
    from conftest import tiny_llama

    four = reads_per_step(kind, tiny_llama(len(tokenizer)), tokenizer, tmp_path / "b", monkeypatch, accum=4)
    # the non-finite flags and gradients, read once per step; for a cache, the step's indices read once ahead
    assert len(four) == len(one) <= 2 * 2, (one, four)
    assert sum("guards.py" in c for c in four) == 2, four


def test_a_nan_in_a_middle_micro_batch_is_caught_before_the_optimizer_step(model, tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    ids = list(SafetyTokens.from_words(tokenizer, "I").ids)
    calls = []

    class NanOnce:  # the third micro-batch's reference is NaN; the others are fine
        policy_from_full_logits = False

        def __call__(self, model, batch):
            calls.append(1)
            value = float("nan") if len(calls) == 3 else 0.0
            return torch.full((*batch["input_ids"].shape, len(ids)), value)

    peft_model = lora(model)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainer = make_trainer(tmp_path, peft_model, tokenizer, examples, 1.0, ids, NanOnce(), max_steps=2,
                           per_device_train_batch_size=1, gradient_accumulation_steps=4)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"safety-token regularizer is not finite at step 0 \(value nan\)"):
        trainer.train()
    assert len(calls) == 4  # the step's micro-batches ran; the optimizer step did not
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_watch_keeps_the_first_bad_value_and_clears_per_step():
    watch = NonFiniteWatch()
    for v in (1.0, float("inf"), 2.0, float("nan")):
        watch.note(torch.tensor(v), "ce")
    assert bool(watch.flags["ce"]) and watch.values["ce"].item() == float("inf")
    callback = FiniteGradients(watch)
    state = type("State", (), {"global_step": 7})()
    with pytest.raises(NonFiniteLossError, match=r"ce is not finite at step 7 \(value inf\)"):
        callback.on_pre_optimizer_step(None, state, None)
    watch.note(torch.tensor(1.0), "ce")  # the next step starts clean
    callback.on_pre_optimizer_step(None, state, None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_element_among_many_gradients_is_found(bad):
    grads = [torch.randn(5, 3), torch.randn(7, dtype=torch.bfloat16), torch.randn(4, 4)]
    assert not nonfinite_gradients(grads)
    grads[2][1, 3] = bad
    assert nonfinite_gradients(grads)
    assert not nonfinite_gradients([torch.full((3,), 1e30), torch.full((3,), 6e4, dtype=torch.float16)])  # no overflow
    assert not nonfinite_gradients([])


def test_the_online_reference_moves_its_ids_once():
    reference = OnlineReference([5, 9])
    meta = reference.ids_on(torch.device("meta"))  # the meta device stands in for the accelerator
    assert meta.device.type == "meta" and reference.ids_on(torch.device("meta")) is meta
