"""SaLoRA (Li et al. 2025, "SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation"): a fixed safety projection and
a task-informed initialisation of LoRA, as the paper describes and its authors' code (homles11/SaLoRA) computes.

Per adapted Linear module with weight W (out x in), PEFT scaling s = alpha / r:

1. Safety subspace. The aligned model runs over `salora_safety_samples` (128) safety conversations (harmful prompt
   + refusal, chat-templated); a forward hook keeps the module's output features y = W x at the response positions
   (the assistant tokens, as the authors' code does). V_s (out x r_s, r_s = `salora_safety_rank` = 32) are the top
   r_s left singular vectors of the activation matrix Y = [y_1 ... y_N] (out x N), computed as the top eigenvectors
   of Y Y^T, accumulated batch by batch. The fixed safety module is C = I - V_s V_s^T.
2. Task subspace. The same on `salora_task_samples` (128) rows of the fine-tuning data gives V_t (out x d_t,
   d_t = `salora_task_rank` = 32) and P_t = V_t V_t^T.
3. Initialisation (PiSSA's principal factors, projected onto the task subspace): W = U S V^T, and with the top r
   singular triplets, B0 = P_t U_r S_r^(1/2) / sqrt(s), A0 = S_r^(1/2) V_r^T / sqrt(s). The base weight becomes the
   residual W_res = W - s C B0 A0, so the model starts exactly where the aligned model is.
4. Training: y = W_res x + s C B A x. C is applied to the adapter's output by a forward hook on lora_B (through
   V_s: out - (out V_s) V_s^T); C is a non-persistent buffer, never trained and never saved.
5. After training, B <- C B. Relative to the original aligned W the trained update is
   s C B A - s C B0 A0 = s [C B, -C B0] [A; A0], so the saved adapter is a plain PEFT LoRA adapter of rank 2r (alpha
   2 alpha, the same scaling) that loads on the aligned model itself, as PEFT converts PiSSA. Its update lies in
   the complement of the safety subspace: V_s^T dW = 0.

Checkpoints written during training hold the training-time factors (A, B on the residual base), which resuming
needs; only the final output folder is folded.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn

from ..data import ChatCollator, load_rows, to_messages, tokenize_rows
from ..errors import ConfigError
from ..files import write_json_atomic
from ..reference import eval_mode

ADAPTER_FILE = "adapter_model.safetensors"
SAMPLE_SEED = 0
GRAM_BUDGET_BYTES = 1 << 30  # the (out x out) matrices of one pass over the samples; more modules take more passes


def projection(v_safe: torch.Tensor) -> torch.Tensor:
    """C = I - V_s V_s^T (out x out) for orthonormal columns V_s (out x r_s)."""
    v = v_safe.float()
    return torch.eye(v.shape[0], device=v.device) - v @ v.T


def project(x: torch.Tensor, v_safe: torch.Tensor) -> torch.Tensor:
    """C x for x (out x k), without forming C."""
    v = v_safe.to(x.dtype)
    return x - v @ (v.T @ x)


def top_directions(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(the top-k eigenvectors of a Gram matrix Y Y^T, i.e. the top-k left singular vectors of Y, as columns in
    decreasing order; the share of the trace they hold)."""
    values, vectors = torch.linalg.eigh(gram.double())
    top = vectors[:, -k:].flip(1)
    share = float(values[-k:].sum() / values.clamp_min(0).sum().clamp_min(1e-300))
    return top.float(), share


def init_factors(weight: torch.Tensor, v_task: torch.Tensor | None, rank: int, scaling: float):
    """(B0, A0): the top-`rank` singular factors of W, with B0's columns projected onto span(V_t), each factor
    divided by sqrt(scaling) so that scaling * B0 A0 = P_t U_r S_r V_r^T. No V_t: no task projection (PiSSA)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt() / math.sqrt(scaling)
    b0 = u[:, :rank] * root
    if v_task is not None:
        v = v_task.to(b0)
        b0 = v @ (v.T @ b0)
    a0 = root[:, None] * vh[:rank]
    return b0, a0


def residual(weight: torch.Tensor, v_safe: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor, scaling: float):
    """W_res = W - s C B0 A0."""
    return weight.float() - scaling * project(b0.float(), v_safe) @ a0.float()


def _sample(rows: list[dict], n: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    keep = set(random.Random(SAMPLE_SEED).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def lora_layers(model) -> dict[str, nn.Module]:
    """The PEFT LoRA Linear layers of `model`, by name."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module.get_base_layer(), nn.Linear) or getattr(module, "fan_in_fan_out", False):
            raise ConfigError(f"salora adapts Linear layers only; {name} is {type(module.get_base_layer()).__name__}")
        layers[name] = module
    if not layers:
        raise ConfigError("salora: no LoRA layers in the model (check target_modules)")
    return layers


@torch.no_grad()
def output_grams(model, tokenizer, rows: list[dict], linears: dict[str, nn.Linear], max_length: int,
                 batch_size: int, reduce, budget_bytes: int = GRAM_BUDGET_BYTES) -> tuple[dict, int]:  # fmt: skip
    """{name: reduce(name, G)} with G = sum over response tokens of y y^T, y = W x the output features (bias left
    out) of each Linear, and the number of tokens. Modules go in groups whose (out x out) fp32 matrices fit
    `budget_bytes`, one pass over `rows` per group; each G is reduced (to its top directions) and freed."""
    examples = tokenize_rows(tokenizer, rows, max_length)
    collate = ChatCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}
    groups, group, used = [], [], 0
    for name, linear in linears.items():
        size = linear.out_features**2 * 4
        if group and used + size > budget_bytes:
            groups.append(group)
            group, used = [], 0
        group.append(name)
        used += size
    groups.append(group)
    out, tokens, state = {}, 0, {}

    def hook(name):
        def fn(module, args, output):
            y = output if module.bias is None else output - module.bias
            y = y[state["mask"]].float()
            state["grams"][name].addmm_(y.T, y)

        return fn

    with eval_mode(model):
        for group in groups:
            state["grams"] = {
                n: torch.zeros(linears[n].out_features, linears[n].out_features, device=linears[n].weight.device)
                for n in group
            }
            handles = [linears[n].register_forward_hook(hook(n)) for n in group]
            tokens = 0
            try:
                for start in range(0, len(examples), batch_size):
                    batch = collate(examples[start : start + batch_size])
                    state["mask"] = (batch["labels"] != -100).to(device)
                    tokens += int(state["mask"].sum())
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          use_cache=False, **extra)  # fmt: skip
            finally:
                for h in handles:
                    h.remove()
            for n in group:
                out[n] = reduce(n, state["grams"].pop(n))
    return out, tokens


def _project_output(module, args, output):
    v = module.salora_v.to(output.dtype)
    return output - (output @ v) @ v.T


def apply(cfg, model, tokenizer, rows: list[dict], progress: bool = True):
    """(model, report): for method salora, initialise the PEFT LoRA model's adapters and base weights as SaLoRA
    does and fix the safety projection on each adapter's output; any other method: (model, None)."""
    if cfg.method != "salora":
        return model, None
    start = time.perf_counter()
    layers = lora_layers(model)
    for name, layer in layers.items():
        out_features, in_features = layer.get_base_layer().weight.shape
        if cfg.salora_safety_rank >= out_features:
            raise ConfigError(f"salora_safety_rank {cfg.salora_safety_rank} >= out_features {out_features} of {name}: "
                              "C = I - V_s V_s^T would remove every direction")  # fmt: skip
        if layer.r["default"] > min(out_features, in_features):
            raise ConfigError(f"rank {layer.r['default']} exceeds the shape {out_features} x {in_features} of {name}")
    safety_file = load_rows(cfg.salora_safety_data)
    for row in safety_file:
        to_messages(row)  # a malformed row fails here, naming its line
    safety_rows = _sample(safety_file, cfg.salora_safety_samples)
    task_rows = _sample(rows, cfg.salora_task_samples)
    linears = {name: layer.get_base_layer() for name, layer in layers.items()}
    shares = {}

    def safety(name, gram):
        v, shares[name] = top_directions(gram, cfg.salora_safety_rank)
        return v

    def task(name, gram):
        k = cfg.salora_task_rank
        return None if k >= gram.shape[0] else top_directions(gram, k)[0]  # the whole space: no projection

    if progress:
        print(f"salora: safety and task subspaces of {len(layers)} modules from {len(safety_rows)} safety and "
              f"{len(task_rows)} task samples", flush=True)  # fmt: skip
    v_safe, safety_tokens = output_grams(model, tokenizer, safety_rows, linears, cfg.max_length, cfg.batch_size,
                                         safety)  # fmt: skip
    v_task, task_tokens = output_grams(model, tokenizer, task_rows, linears, cfg.max_length, cfg.batch_size, task)
    with torch.no_grad():
        for name, layer in layers.items():
            base, scaling = layer.get_base_layer(), layer.scaling["default"]
            b0, a0 = init_factors(base.weight, v_task[name], layer.r["default"], scaling)
            base.weight.copy_(residual(base.weight, v_safe[name], b0, a0, scaling).to(base.weight.dtype))
            lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
            lora_a.weight.copy_(a0.to(lora_a.weight))
            lora_b.weight.copy_(b0.to(lora_b.weight))
            # fixed, never trained, never saved (non-persistent): fold reads them back
            lora_b.register_buffer("salora_v", v_safe[name].to(lora_b.weight.device), persistent=False)
            lora_b.register_buffer("salora_b0", b0.to(lora_b.weight), persistent=False)
            lora_a.register_buffer("salora_a0", a0.to(lora_a.weight), persistent=False)
            lora_b.register_forward_hook(_project_output)
    report = {
        "safety_data": cfg.salora_safety_data,
        "modules": len(layers),
        "safety_rank": cfg.salora_safety_rank,
        "task_rank": cfg.salora_task_rank,
        "safety_samples": len(safety_rows),
        "safety_tokens": safety_tokens,
        "task_samples": len(task_rows),
        "task_tokens": task_tokens,
        "safety_energy": sum(shares.values()) / len(shares),  # mean share of the activations' energy V_s holds
        "rank": next(iter(layers.values())).r["default"],
        "seconds": time.perf_counter() - start,
    }
    report["saved_rank"] = 2 * report["rank"]
    if progress:
        print(f"salora: V_s holds {report['safety_energy']:.1%} of the safety activations' energy on average; "
              f"set up in {report['seconds']:.1f} s", flush=True)  # fmt: skip
    return model, report


def fold(model, folder: str | Path, report: dict | None = None) -> None:
    """Rewrite the adapter saved in `folder` as plain LoRA on the aligned model: B' = [C B, -C B0], A' = [A; A0],
    r' = 2r, alpha' = 2 alpha; write `salora.json` (the report) beside it."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    weights = load_file(str(folder / ADAPTER_FILE))
    config = json.loads((folder / "adapter_config.json").read_text())
    layers = lora_layers(model)
    for name, layer in layers.items():
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        a, b = weights[key_a], weights[key_b]
        if a.shape[0] != config["r"]:
            raise ValueError(f"{folder}: {key_a} has rank {a.shape[0]}, not {config['r']}: already folded?")
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        v = lora_b.salora_v.detach().cpu().float()
        b0, a0 = lora_b.salora_b0.detach().cpu().float(), lora_a.salora_a0.detach().cpu().float()
        weights[key_b] = torch.cat([project(b.float(), v), -project(b0, v)], dim=1).to(b.dtype).contiguous()
        weights[key_a] = torch.cat([a.float(), a0], dim=0).to(a.dtype).contiguous()
    config["r"], config["lora_alpha"] = 2 * config["r"], 2 * config["lora_alpha"]
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {k: 2 * v for k, v in (config.get(key) or {}).items()}
    tmp = folder / f".{ADAPTER_FILE}.tmp"  # written whole, then renamed
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_FILE)
    write_json_atomic(folder / "adapter_config.json", config)
    if report is not None:
        write_json_atomic(folder / "salora.json", report)
