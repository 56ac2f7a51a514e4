"""Loading models and tokenizers from local folders or hub names, and attaching the fine-tuning method."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import LogitguardError

METHODS = ("lora", "dora", "pissa", "full", "salora")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZE = ("none", "4bit", "8bit")


class ModelLoadError(LogitguardError, OSError):
    """A model, tokenizer or adapter could not be loaded; the message says what was looked for."""


def _explain(name: str, what: str, err: Exception) -> ModelLoadError:
    path = Path(name)
    if "trust_remote_code" in str(err):
        hint = (
            f"{name} ships its own model code, which logitguard does not run unless asked; read that code, "
            "then pass --trust-remote-code (config key trust_remote_code: true)"
        )
    elif path.is_file() and path.suffix.lower() == ".gguf":
        hint = f"{name} is a GGUF file; pass it as --gguf-file (config key gguf_file) instead of as the model"
    elif path.exists():
        hint = f"{name} exists but holds no loadable {what} (expected config.json / tokenizer files there)"
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        hint = f"no such folder {name}"
    else:
        hint = f"{name!r} is not a local folder and could not be fetched from the hub (offline, or no such repo)"
    return ModelLoadError(f"cannot load {what}: {hint}. Underlying error: {type(err).__name__}: {err}")


def gguf_folder(gguf_path: str, cache_dir: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """A safetensors model folder converted once from a GGUF file (transformers dequantizes it).

    The conversion takes a minute for a 0.5B model and the result lives in `cache_dir/gguf/`, named by the
    sha256 of the file's bytes and the dtype, so the second load is a plain safetensors load and a replaced
    GGUF file is converted again. Content, not path or modification time: the folder's path is the model in
    every run's settings, so the same file fetched again (another clone, another machine) keeps the runner's
    finished results and reference caches valid. Hashing costs about a second per GB. Written to a temporary
    folder and renamed, so a killed conversion leaves nothing half-done.
    """
    import hashlib
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import file_sha256

    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    if dtype not in DTYPES or dtype == "auto":
        raise ValueError(f"dtype for a GGUF conversion must be one of float32, bfloat16, float16; got {dtype!r}")
    digest = file_sha256(path)
    key = hashlib.sha256(f"{digest}|{dtype}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    if progress:
        print(f"converting {path.name} to safetensors in {folder} (once)", flush=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"cannot convert GGUF file {path}: {type(e).__name__}: {e}") from e
    # The weights are already dequantized to plain tensors; only the loader's GGUF marker blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "gguf_source.txt").write_text(f"{path}\nsha256 {digest}\n")
    tmp.rename(folder)
    return folder


def _refuse_remote_code(name: str, trust_remote_code: bool) -> None:
    """A local folder whose config maps to its own Python code is refused unless the user asked for it."""
    config = Path(name) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text()).get("auto_map")
    except (json.JSONDecodeError, AttributeError):
        return  # transformers reports a broken config.json itself
    if auto_map:
        raise ModelLoadError(
            f"{name} ships its own model code ({sorted(set(auto_map.values()))}), which logitguard does not run "
            "unless asked; read that code, then pass --trust-remote-code (config key trust_remote_code: true)"
        )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _refuse_remote_code(name, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _explain(name, "a tokenizer", e) from e


def process_state():
    """accelerate's state of this process. cpu=True where no accelerator exists lets `accelerate launch` run
    several CPU processes (gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def train_device() -> torch.device:
    """The device this process trains on: its accelerator under `accelerate launch` or alone, else the CPU."""
    return process_state().device


def resolve_precision(precision: str, dtype: str = "auto") -> str:
    """bf16 | fp16 | fp32 for `precision` auto: the half dtype the user named, else bf16 on a GPU that has it, fp16 on
    other accelerators, fp32 on the CPU (where half-precision autocast is slower, not faster)."""
    if precision != "auto":
        return precision
    if dtype in ("bfloat16", "float16"):
        return "bf16" if dtype == "bfloat16" else "fp16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp16" if torch.accelerator.is_available() else "fp32"


def resolve_dtype(dtype: str, precision: str, method: str = "lora") -> str:
    """The dtype the frozen weights are loaded in. auto: the compute precision's dtype, so a model stored in
    fp16 (Llama-2) is not trained in pure fp16 by accident. Weights that are trained (method full) stay fp32
    under fp16: the loss scaler unscales fp32 gradients only (LoRA adapters are fp32 through PEFT's own upcast)."""
    if dtype != "auto":
        return dtype
    if method == "full" and precision == "fp16":
        return "float32"
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def quantization_config(quantize: str, compute_dtype: str):
    """bitsandbytes settings of QLoRA: NF4 with double quantization and the compute dtype, or 8-bit."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype] if compute_dtype != "auto" else torch.float32,
    )


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, quantize: str = "none", device=None):
    """A causal LM from a local folder or hub name. `device`: where to put it (a quantized model is placed
    while loading, as bitsandbytes quantizes on the target device)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    _refuse_remote_code(name, trust_remote_code)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, dtype)
        kwargs["device_map"] = {"": torch.device(device) if device is not None else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ImportError as e:
        raise ModelLoadError(f"cannot load {name} in {quantize}: {e} (pip install 'logitguard[qlora]')") from e
    except (OSError, ValueError) as e:
        raise _explain(name, "a causal language model", e) from e
    return model.to(device) if device is not None and quantize == "none" else model


def model_folder(name: str) -> Path:
    """The local folder of a model given as a folder or a hub name (fetched through the hub cache, as
    transformers does; offline, a name that is already in the cache resolves)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; all mean "not available"
        raise _explain(name, "model weights", e) from e


def attach_method(
    model,
    method: str,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    gradient_checkpointing: bool = False,
):
    """Wrap `model` for training: a PEFT adapter (LoRA, DoRA, PiSSA; for `salora` a LoRA adapter that
    `logitguard.methods.salora.apply` then initialises) or, for `full`, all weights trainable.
    A quantized model first gets PEFT's k-bit preparation (norms in fp32, input gradients for checkpointing)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        # PiSSA's and SaLoRA's adapters start as singular directions of W; dropout would perturb that start
        lora_dropout=0.0 if method in ("pissa", "salora") else dropout,
        target_modules=list(target_modules) if target_modules else None,
        use_dora=method == "dora",
        init_lora_weights="pissa" if method == "pissa" else True,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        from .config import ConfigError  # here, not at the top: config imports this module

        raise ConfigError(f"cannot attach {method} with target_modules={target_modules}: {e}") from e
