"""Safe LoRA (Hsu et al. 2024), the post-hoc projection baseline.

Per adapted module with weight W (out, in): V = W_aligned - W_unaligned, C = V V^T / ||V||_F (out, out).
The adapter's update dW = scale * B A is projected to C dW by replacing B with C B. Only the modules whose
update is least aligned with the safety subspace are projected: similarity = <C dW, dW>_F /
(||C dW||_F ||dW||_F), and the `num_layers` lowest (the paper's default: 10), or all below `threshold`.
Weights are read lazily from the safetensors files of the two model folders; no model is instantiated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import LogitguardError
from .files import write_json_atomic

ADAPTER_FILE = "adapter_model.safetensors"


class SafeLoRAError(LogitguardError, ValueError):
    """Inputs that Safe LoRA cannot use (missing weights, shapes that differ, an adapter that is not LoRA)."""


class WeightReader:
    """Lazy access to a model folder's tensors by name (single file or sharded with an index)."""

    def __init__(self, folder: str | Path):
        from .models import ModelLoadError, model_folder

        try:  # a local folder, or a hub name through the same hub cache transformers loads from
            self.folder = model_folder(str(folder))
        except ModelLoadError as e:
            raise SafeLoRAError(str(e)) from None
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").exists():
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                self.where = {k: self.folder / "model.safetensors" for k in f.keys()}
        else:
            raise SafeLoRAError(f"{self.folder} has no model.safetensors (or index); Safe LoRA needs safetensors")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise SafeLoRAError(f"{self.folder} has no weight {name!r}")
        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


def projection(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F with V = aligned - unaligned, in fp32."""
    if aligned.shape != unaligned.shape:
        raise SafeLoRAError(f"aligned {tuple(aligned.shape)} and unaligned {tuple(unaligned.shape)} differ")
    v = aligned.float() - unaligned.float()
    return v @ v.T / torch.linalg.norm(v).clamp_min(1e-12)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (torch.linalg.norm(a) * torch.linalg.norm(b)).clamp_min(1e-12))


def _module_weight_name(lora_a_key: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj.weight
    name = lora_a_key.removeprefix("base_model.model.")
    return name.replace(".lora_A.weight", ".weight").replace(".lora_A.default.weight", ".weight")


def safe_lora(
    aligned: str | Path,
    unaligned: str | Path,
    adapter: str | Path,
    out: str | Path,
    num_layers: int | None = 10,
    threshold: float | None = None,
) -> dict:
    """Write a projected copy of the adapter folder to `out`; return the per-module report."""
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise SafeLoRAError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise SafeLoRAError("Safe LoRA projects plain LoRA adapters (not DoRA or other PEFT types)")
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(str(adapter / ADAPTER_FILE))
    aligned_w, unaligned_w = WeightReader(aligned), WeightReader(unaligned)
    modules = []
    for key_a in sorted(k for k in weights if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        name = _module_weight_name(key_a)
        c = projection(aligned_w.get(name), unaligned_w.get(name))  # (out, out)
        delta = scale * weights[key_b].float() @ weights[key_a].float()  # (out, in)
        modules.append({"module": name, "key_b": key_b, "similarity": cosine(c @ delta, delta), "c": c})
    if threshold is not None:
        chosen = {m["module"] for m in modules if m["similarity"] < threshold}
    else:
        chosen = {m["module"] for m in sorted(modules, key=lambda m: m["similarity"])[: num_layers or 0]}
    for m in modules:
        m["projected"] = m["module"] in chosen
        if m["projected"]:
            b = weights[m["key_b"]]
            weights[m["key_b"]] = (m["c"] @ b.float()).to(b.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for f in adapter.iterdir():
        if f.is_file() and f.name != ADAPTER_FILE:
            shutil.copy2(f, out / f.name)
    tmp = out / f".{ADAPTER_FILE}.tmp"  # written whole, then renamed: a killed run leaves no half adapter
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_FILE)
    report = {
        "aligned": str(aligned),
        "unaligned": str(unaligned),
        "adapter": str(adapter),
        "rule": f"threshold {threshold}" if threshold is not None else f"{num_layers} lowest similarity",
        "modules": [{k: m[k] for k in ("module", "similarity", "projected")} for m in modules],
    }
    write_json_atomic(out / "safelora_report.json", report)
    return report
