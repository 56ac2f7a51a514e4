"""Loading models and tokenizers from local folders or hub names, and attaching the fine-tuning method."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from . import adapters
from .errors import ConfigError, LogitguardError

METHODS = tuple(adapters.REGISTRY)  # what `method:` takes (logitguard.adapters)
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


def world_size() -> int:
    """How many processes train together (1 outside torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train_device() -> torch.device:
    """The device this process trains on: its accelerator under `accelerate launch` or alone, else the CPU."""
    return process_state().device


def wants_cpu(trainer: dict) -> bool:
    """Whether a run trains on the CPU on a machine that may have an accelerator: the Trainer's `use_cpu` (under
    `trainer:`) or `accelerate launch --cpu` (ACCELERATE_USE_CPU)."""
    return bool(trainer.get("use_cpu")) or _env_flag("ACCELERATE_USE_CPU")


def resolve_precision(precision: str, dtype: str = "auto", cpu: bool = False) -> str:
    """bf16 | fp16 | fp32 for `precision` auto: the half dtype the user named, else bf16 on a GPU that computes in
    it (compute capability 8.0 and up), fp16 on other accelerators, fp32 on the CPU (where half-precision autocast is
    slower, not faster), also a CPU run on a machine with a GPU (`cpu`). A T4 or V100 can hold bf16 tensors
    (emulated), which is not a reason to train in them."""
    if precision != "auto":
        return precision
    if dtype in ("bfloat16", "float16"):
        return "bf16" if dtype == "bfloat16" else "fp16"
    if cpu:
        return "fp32"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp16" if torch.accelerator.is_available() else "fp32"


def run_precision(cfg) -> str:
    """A TrainConfig's compute precision, where it trains."""
    return resolve_precision(cfg.precision, cfg.dtype, wants_cpu(cfg.trainer))


def run_device(cfg) -> torch.device:
    """The device a TrainConfig's run loads its model on: the CPU where it asks for it (wants_cpu), else
    train_device()."""
    return torch.device("cpu") if wants_cpu(cfg.trainer) else train_device()


def release_memory() -> None:
    """Return the accelerator memory of objects just dropped (a model evaluated, a trainer finished) before the
    next large one loads: a collection first, as reference cycles keep modules alive, then the caching
    allocator's blocks."""
    import gc

    gc.collect()
    if torch.accelerator.is_available():
        torch.accelerator.empty_cache()


def checkpoint_dtype(name: str, trust_remote_code: bool = False) -> str | None:
    """The dtype a model's checkpoint is stored in (a DTYPES name; None when its config does not say)."""
    from transformers import AutoConfig

    _refuse_remote_code(name, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # offline, gated, mistyped, or its own code not trusted
        raise _explain(name, "model config", e) from e
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return next((key for key, value in DTYPES.items() if value == stored and key != "auto"), None)


def run_dtype(cfg) -> str:
    """The dtype a TrainConfig's run loads its frozen weights (and its reference model) in."""
    return resolve_dtype(cfg.dtype, run_precision(cfg), cfg.method)


def resolve_dtype(dtype: str, precision: str, method: str = "lora") -> str:
    """The dtype the frozen weights are loaded in. auto: the compute precision's dtype, so a model stored in
    fp16 (Llama-2) is not trained in pure fp16 by accident. Weights that are trained (method full) stay fp32
    under fp16 and bf16 alike, and autocast computes in half: the loss scaler unscales fp32 gradients only, and a
    bf16 weight drops every update below 2^-8 of itself (LoRA adapters are fp32 through PEFT's own upcast)."""
    if dtype != "auto":
        return dtype
    if adapters.get(method).whole_model and precision in ("fp16", "bf16"):
        return "float32"
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


# --- sharded training: FSDP and DeepSpeed ZeRO-3 ------------------------------------------------------------

_set_aside: list = []  # transformers' DeepSpeed configs that whole_model() has unset, innermost last


def _deepspeed_config():
    """The DeepSpeed config transformers holds now (a weak reference that TrainingArguments sets), or None."""
    from transformers.integrations import deepspeed

    ref = getattr(deepspeed, "_hf_deepspeed_config_weak_ref", None)
    return ref() if ref is not None else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def sharding(args=None) -> str | None:
    """How training will shard the model's weights across processes: "zero3", "fsdp", or None. Read before any
    Accelerator exists: from transformers' DeepSpeed config (also one that `whole_model` has set aside), the
    environment `accelerate launch` sets, and the TrainingArguments `args` (`fsdp`, as torchrun users pass it)."""
    configs = [_deepspeed_config(), *_set_aside]
    stage3_env = _env_flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if stage3_env or any(c is not None and c.is_zero3() for c in configs):
        return "zero3"
    if _env_flag("ACCELERATE_USE_FSDP") or getattr(args, "fsdp", None):
        return "fsdp"
    return None


@contextlib.contextmanager
def whole_model():
    """Load, fingerprint and build caches from the whole model in this process, with transformers' DeepSpeed config
    unset, and put it back after. TrainingArguments installs that config under `accelerate launch` with DeepSpeed
    whatever `zero3_init_flag` says, and `from_pretrained` then partitions the weights as it loads them (zero.Init):
    the reference cache would hash empty tensors and run its forward outside the engine. The Trainer's engine
    partitions the whole model when it is prepared."""
    from transformers.integrations import deepspeed

    held = _deepspeed_config()
    deepspeed.unset_hf_deepspeed_config()
    _set_aside.append(held)
    try:
        yield
    finally:
        _set_aside.pop()
        if held is not None:
            deepspeed.set_hf_deepspeed_config(held)


def quantization_config(quantize: str, compute_dtype: str, sharded: str | None = None):
    """bitsandbytes settings of QLoRA: NF4 with double quantization and the compute dtype, or 8-bit. Under FSDP
    the 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage), as the FSDP-QLoRA recipe does: FSDP
    shards floating-point tensors only, and left as uint8 the 4-bit weights stay whole on every GPU."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[compute_dtype] if compute_dtype != "auto" else torch.float32
    storage = {"bnb_4bit_quant_storage": compute} if sharded == "fsdp" else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        **storage,
    )


def _check_sharded_quantization(quantize: str, sharded: str | None) -> None:
    if quantize == "none" or sharded is None:
        return
    if sharded == "zero3":
        raise ConfigError(
            f"quantize: {quantize} under DeepSpeed ZeRO-3 is not supported: logitguard loads the model whole to build "
            "its reference cache, and bitsandbytes weights are partitioned only while they load (zero.Init); use "
            "FSDP or ZeRO-2 with quantize, or quantize: none under ZeRO-3"
        )
    if quantize == "8bit":
        raise ConfigError("quantize: 8bit weights cannot be sharded by FSDP; use quantize: 4bit (stored in the "
                          "compute dtype, which FSDP shards) or quantize: none")  # fmt: skip


def load_model(
    name: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantize: str = "none",
    device=None,
    sharded: str | None = "auto",
):
    """A causal LM from a local folder or hub name. `device`: where to put it (a quantized model is placed
    while loading, as bitsandbytes quantizes on the target device). `sharded`: "fsdp", "zero3" or None, as
    `sharding(args)` says; "auto" reads it from the environment. A quantized model that FSDP will shard gets no
    device map (bitsandbytes places it on this process's GPU) and its 4-bit weights in the compute dtype."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    sharded = sharding() if sharded == "auto" else sharded
    _check_sharded_quantization(quantize, sharded)
    _refuse_remote_code(name, trust_remote_code)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, dtype, sharded)
        if sharded is None:
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
    kind = adapters.get(method)
    if kind.whole_model:
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
        target_modules=list(target_modules) if target_modules else None,
        **{"lora_dropout": dropout, **kind.lora_options},  # the kind's own: DoRA, PiSSA's init, no dropout
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"cannot attach {method} with target_modules={target_modules}: {e}") from e
