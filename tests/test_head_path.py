"""The output head on the GPU path, run on the CPU: a head on another device than the batch (device_map="auto"),
autocast, fp16. The meta device stands in for a second GPU, and a dispatch mode applies CUDA's one-device rule."""

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_of, chat_examples
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from logitguard.reference import chunked_nll, head_tap, logits_from_hidden
from logitguard.tokens import SafetyTokens

aten = torch.ops.aten
META = torch.device("meta")


class OneDevicePerOp(TorchDispatchMode):
    """CUDA's rule on the CPU: an op's tensors share one device (0-dim CPU tensors aside); copies may cross.
    Values copied off the meta device (no data there) come back as zeros: the test checks devices, not values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and args[0].device == META and kwargs.get("device", META) != META:
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=kwargs["device"])
        if func is aten.copy_.default and args[1].device == META and args[0].device != META:
            return args[0]
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1 and func not in (aten._to_copy.default, aten.copy_.default):
            raise RuntimeError(f"{func}: expected all tensors on one device, found {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def head_elsewhere(model):
    """The model as device_map="auto" leaves it when lm_head lands on another GPU: accelerate's hook moves the head's
    input to the head's device inside the head's forward only."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model.lm_head.to(META)
    add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device=META))
    return model


@pytest.mark.parametrize("full", [False, True])
def test_head_tap_with_the_head_on_another_device(model, tokenizer, full):
    batch = batch_of(tokenizer, chat_examples(tokenizer)[:2])
    ids = torch.as_tensor(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    head_elsewhere(model)
    with OneDevicePerOp():
        with head_tap(model, ids, batch["labels"], full_logits=full) as tap:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        (tap["ce_sum"] + tap["safety"].sum()).backward()  # backward crosses back without a device error
    # everything the loss reads is where the batch is, whatever device the head is on
    assert {tap[k].device for k in ("safety", "ce_sum", "ce_tokens")} == {batch["labels"].device}
    assert tap["safety"].shape == (*batch["input_ids"].shape, len(ids))
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_trl_backbone_safety_logits_with_the_head_on_another_device(model, tokenizer):
    from logitguard.integrations.trl import _backbone_terms

    batch = batch_of(tokenizer, chat_examples(tokenizer)[:2])
    ids = torch.as_tensor(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    head_elsewhere(model)
    with OneDevicePerOp(), _backbone_terms(model, ids) as box:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert box["safety"].device == ids.device and box["safety"].dtype == torch.float32


class HeadOps(TorchDispatchMode):
    """Counts the copies (casts) of tensors shaped like the head's weight, and records the operand dtype of the
    matmuls that produce one (the head's gradient)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.casts, self.grad_dtypes = tuple(shape), 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.casts += 1
        if func in (aten.mm.default, aten.addmm.default, aten.addmm_.default) and tuple(out.shape) == self.shape:
            self.grad_dtypes.add(args[-1].dtype)
        return out


def _problem(n=12, h=8, v=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 2).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("head_trained", [False, True])
def test_chunked_nll_under_autocast_casts_the_head_once_and_runs_bf16_matmuls(head_trained):
    """An fp32 head under bf16 autocast: frozen (a k-bit-prepared model), one cast for all chunks, not one per
    chunk; trained (full fine-tuning), its gradient from bf16 GEMMs, not fp32 ones."""
    hidden, weight, targets = _problem()
    weight.requires_grad_(head_trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")  # bf16 logits
    with torch.autocast("cpu", dtype=torch.bfloat16), HeadOps(weight.shape) as ops:
        ours = chunked_nll(hidden, weight, None, targets, 3)  # 4 chunks
    assert ops.casts == 1
    assert ops.grad_dtypes == ({torch.bfloat16} if head_trained else set())
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-4)  # the same bf16 logits, fp32 softmax
    inputs = [hidden, weight] if head_trained else [hidden]
    got = torch.autograd.grad(ours, inputs)
    exact = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum"), inputs)
    for a, b in zip(got, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)  # bf16 matmuls: to ~1% of the fp32 gradient


def test_chunked_nll_bf16_weight_gradient_accumulates_in_fp32():
    """Full fine-tuning under bf16: the head's gradient is a bf16 GEMM per chunk summed in fp32."""
    hidden, weight, targets = _problem(n=64, dtype=torch.bfloat16)
    ours = torch.autograd.grad(chunked_nll(hidden, weight, None, targets, 1), weight)[0]  # 64 chunks of one
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logits = F.linear(h.bfloat16(), w.bfloat16()).float()
    exact = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), w)[0]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, rtol=0.02, atol=0.02)


def test_chunked_nll_fp16_keeps_gradients_below_fp16_range():
    """Per-token gradients of ~1e-6 (a small head, a fairly confident model) are subnormal in fp16 until the loss
    scale (2^15 here) reaches them in backward; kept in fp32 until then, they survive."""
    g = torch.Generator().manual_seed(0)
    v, h, n, a = 11, 16, 8, 5e-4
    weight = (a * torch.linalg.qr(torch.randn(h, v, generator=g))[0].T).half()  # (V, H): orthogonal rows of norm a
    targets = torch.arange(n) % v
    margin = torch.linspace(4.0, 9.0, n)[:, None]  # target logit minus the others: p(target) 0.95 .. 0.9989
    hidden = (margin / a**2 * weight.float()[targets]).half().requires_grad_()  # entries up to ~5000
    scale = 2.0**15
    ours = torch.autograd.grad(scale * chunked_nll(hidden, weight, None, targets, 3), hidden)[0]
    # the exact gradient of the same fp16 logits
    probs = F.linear(hidden.detach(), weight).double().softmax(dim=-1)
    probs[torch.arange(n), targets] -= 1.0
    want = scale * probs @ weight.double()  # (N, H)
    assert (want.abs().amax(dim=1) < 6e-5 * scale).all()  # every row subnormal in fp16 before the scale
    assert ours.dtype == torch.float16
    error = (ours.double() - want).abs() / want.abs().amax(dim=1, keepdim=True)  # relative to each row's size
    assert error.max() < 0.005, error.amax(dim=1)


def test_safety_logits_are_fp32_under_bf16_autocast():
    """bf16 logits between 16 and 32 are 0.125 apart; the K columns are computed in fp32."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 64, generator=g)
    rows = torch.randn(3, 64, generator=g) * 0.4  # logits of ~ +-5 to +-30
    exact = (hidden.double() @ rows.double().T).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ((hidden @ rows.T).float() - exact).abs().max() > 0.01  # what bf16 would give
        ours = logits_from_hidden(hidden, rows, None)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)


def test_head_tap_safety_logits_are_fp32_under_bf16_autocast(model, tokenizer):
    batch = batch_of(tokenizer, chat_examples(tokenizer)[:2])
    ids = torch.as_tensor(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    seen = {}
    model.lm_head.register_forward_pre_hook(lambda _m, args: seen.setdefault("hidden", args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16), head_tap(model, ids, batch["labels"]) as tap:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    exact = seen["hidden"].double() @ model.lm_head.weight[ids].double().T  # (B, T, K)
    assert tap["safety"].dtype == torch.float32
    torch.testing.assert_close(tap["safety"].double(), exact, rtol=1e-5, atol=1e-6)
