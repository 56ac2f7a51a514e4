"""Batched chat generation for evaluation, and loading a base model (plus an optional adapter) to evaluate.

Generation is greedy by default (the decoding the STR paper and PACT score), left-padded so every prompt in
a batch ends at the same position, and uses the KV cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# "name" or "owner/name" with the characters the hub allows; anything else must be a local path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def generate_responses(
    model,
    tokenizer,
    prompts: list[str] | list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    greedy: bool = True,
    progress: bool = True,
    inference_mode: bool = True,
    stop=None,
    fast: bool = True,
    synced_gpus: bool = False,
) -> list[str]:
    """One response per prompt, in the order given.

    A prompt is a user message string or a messages list; the chat template is applied with the generation
    prompt. Only the new tokens are decoded (special tokens skipped, whitespace stripped). Works for a plain
    model and a PEFT model alike. The tokenizer's padding side and pad token, and the model's training
    mode, are restored afterwards; a tokenizer with no chat template gets logitguard's fallback (as training
    does). `inference_mode=False` runs under plain no_grad: for a model that trains on afterwards under FSDP,
    whose parameter buffers must not become inference tensors.

    Greedy decoding runs decode.greedy_decode (ended rows leave the batch; inside decode.joining(True) waiting
    prompts take their places) unless the model's generation config asks for a logits processor or `fast` is False
    (then `model.generate`, the reference path). `stop`: a `StopRule` that ends a response once its text is
    complete (greedy_decode only; the text up to and including the stop is what generate would have produced
    first). `synced_gpus`: every process of a sharded model (FSDP, ZeRO-3) generates at once, and each forward is a
    collective; a process whose rows have all ended keeps running forwards until every process's have
    (`model.generate`'s synced_gpus; greedy_decode has no such loop, so it is not used), else one process leaves
    the loop while the others wait in an all-gather.
    """
    from .endpoint import engine_for  # a server generating in the model's place (--engine, eval/endpoint.py)

    if (engine := engine_for(model)) is not None:
        return engine.generate(prompts, max_new_tokens, batch_size, greedy, progress)
    with torch.inference_mode(inference_mode), torch.no_grad():
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, greedy, progress, stop,
                         fast and not synced_gpus, {"synced_gpus": True} if synced_gpus else {})  # fmt: skip


class StopRule:
    """Ends a response when `complete(text)` is true, checked only after a token containing `marker`."""

    def __init__(self, complete, marker: str):
        self.complete, self.marker = complete, marker

    def bind(self, tokenizer):
        from .decode import marker_ids

        return (lambda ids: self.complete(tokenizer.decode(ids, skip_special_tokens=True))), marker_ids(
            tokenizer, self.marker
        )


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, greedy, progress, stop, fast, extra) -> list[str]:
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    from ..data import ensure_chat_template
    from ..reference import eval_mode
    from .decode import eos_ids, greedy_decode, plain_greedy, prefix_cache, shared_prefix
    from .finite import FirstStepCheck

    if not prompts:
        return []
    if not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer)  # the same fallback template that training used
    texts = [
        tokenizer.apply_chat_template(_as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    # Longest first: batches hold similar lengths (less padding), and an out-of-memory shows up at once.
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))

    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = {} if not greedy else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if getattr(model.generation_config, "eos_token_id", None) is None:
        extra["eos_token_id"] = tokenizer.eos_token_id
    responses: list[str] = [""] * len(texts)
    loop = fast and greedy and plain_greedy(model.generation_config)
    try:
        if loop:
            eos = eos_ids(model, tokenizer)
            stop_fn, check_after = stop.bind(tokenizer) if stop is not None else (None, None)
            shared = shared_prefix(ids)
            with eval_mode(model), tqdm(total=len(order), desc="generate", disable=not progress) as bar:
                prefix = prefix_cache(model, ids[0][:shared])
                new = greedy_decode(
                    model, [ids[i] for i in order], max_new_tokens, eos, tokenizer.pad_token_id, stop_fn, check_after,
                    prefix, shared, batch_size, on_end=lambda _: bar.update(1),
                )  # fmt: skip
            for i, text in zip(order, tokenizer.batch_decode(new, skip_special_tokens=True)):
                responses[i] = text.strip()
            return responses
        with eval_mode(model):
            for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
                idx = order[start : start + batch_size]
                # The template already holds BOS where the model wants one; add_special_tokens would double it.
                enc = tokenizer(
                    [texts[i] for i in idx],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                    return_token_type_ids=False,
                ).to(model.device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    logits_processor=LogitsProcessorList([FirstStepCheck(model)]),
                    **sampling,
                    **extra,
                )
                new = out[:, enc["input_ids"].shape[1] :]  # (B, <= max_new_tokens): left padding aligns prompts
                for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    responses[i] = text.strip()
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return responses


def _check_local(name: str, marker: str, what: str) -> None:
    """A clear error for a path that cannot be what was asked for, before transformers / peft guess."""
    from ..models import ModelLoadError

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name} is a file; expected {what}")
        if not (path / marker).is_file():
            hint = ""
            if marker == "config.json" and (path / "adapter_config.json").is_file():
                hint = " It holds adapter_config.json: pass it as the adapter and the base model as the model."
            raise ModelLoadError(f"{name} has no {marker}; expected {what}.{hint}")
        return
    if not _HUB_NAME.match(name):
        raise ModelLoadError(f"{name} does not exist and is not a hub name like 'owner/name'; expected {what}")


def load_model_for_eval(
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    merge: bool = True,
    trust_remote_code: bool = False,
    dtype_of: str | Path | None = None,
):
    """(model, tokenizer) ready for `generate_responses`: a causal LM from a local folder or hub name, with
    the PEFT adapter at `adapter_path` attached when given.

    dtype: a name in `logitguard.models.DTYPES`; None means `default_eval_dtype`: the checkpoint's own dtype on
    an accelerator (float16 for a bf16 checkpoint on a GPU without bf16 arithmetic) and float32 on CPU
    (half-precision matmuls are emulated, and slow, on most CPUs). bfloat16 on a CPU with bf16 instructions
    (AVX512-BF16, AMX) is several times faster than float32 (docs/evaluation.md); its greedy outputs are not
    bit-equal to float32's, so it is a setting of the row (eval.dtype), not a default.
    dtype_of: the checkpoint whose stored dtype a None dtype follows (default: model_path). A full fine-tune's
    folder holds float32 master weights; evaluated like its aligned checkpoint, it runs in the dtype the
    aligned model's row ran in, not at twice the memory.
    device: None means the current accelerator if there is one, else CPU.
    merge: fold the adapter into the weights (this loaded copy; the files are untouched) so a decode step runs no
    adapter matmuls. Float32 weights fold as they are. A half dtype on CPU folds in float32 and rounds each
    folded weight once into the model loaded in that dtype (the base weights are rounded to half anyway; the
    update is not rounded twice). On an accelerator in half precision the adapter stays separate, as trained.
    The tokenizer comes from the adapter folder when it holds one (training saves the tokenizer it used,
    including any fallback chat template), else from the model.
    trust_remote_code: run the model folder's own code (config.json's auto_map), as training was told to.
    """
    from ..data import ensure_chat_template
    from ..models import ModelLoadError, load_model, load_tokenizer

    model_path = str(model_path)
    _check_local(model_path, "config.json", "a model folder with config.json, or a hub model name")
    if adapter_path is not None:
        adapter_path = str(adapter_path)
        _check_local(adapter_path, "adapter_config.json", "an adapter folder with adapter_config.json")
    if device is None:
        device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = default_eval_dtype(dtype_of or model_path, device, trust_remote_code)

    has_tokenizer = adapter_path is not None and (Path(adapter_path) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_path if has_tokenizer else model_path, trust_remote_code)
    ensure_chat_template(tokenizer)
    half = dtype in ("bfloat16", "float16")
    fold_first = merge and half and adapter_path is not None and device.type == "cpu"
    if half and device.type == "cpu":
        warn_emulated(dtype)
    model = load_model(model_path, "float32" if fold_first else dtype, trust_remote_code)
    if adapter_path is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_path)
        except (OSError, ValueError, RuntimeError) as e:  # missing files, wrong base (shape mismatch), offline hub
            raise ModelLoadError(f"cannot attach the adapter {adapter_path} to {model_path}: {e}") from e
        if merge and all(p.dtype == torch.float32 for p in model.parameters()):
            model = model.merge_and_unload()
    if fold_first:
        model = _rounded_copy(model, model_path, dtype, trust_remote_code)
    return model.to(device).eval(), tokenizer


def default_eval_dtype(checkpoint: str | Path, device: str | torch.device, trust_remote_code: bool = False) -> str:
    """The dtype evaluation loads `checkpoint` in when none is set: float32 on CPU; on an accelerator the dtype
    the checkpoint is stored in ("auto" where its config does not say), except that a bfloat16 checkpoint runs in
    float16 on a GPU without bf16 arithmetic (T4, V100), as training's precision "auto" does there: bf16 would be
    emulated, several times slower. A model whose activations overflow float16 then stops at the first
    non-finite logit with a one-line error (eval/finite.py) naming eval dtype float32 as the fix."""
    from ..models import checkpoint_dtype

    device = torch.device(device)
    if device.type == "cpu":
        return "float32"
    stored = checkpoint_dtype(str(checkpoint), trust_remote_code) or "auto"
    if stored == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "float16"
    return stored


def loaded_dtype(model) -> str:
    """The dtype a loaded model computes in, by name ("bfloat16"). An unset eval dtype resolves per machine
    (default_eval_dtype: float32 on CPU, float16 on a T4), so what an evaluation ran in is recorded beside its
    numbers: rows evaluated in different dtypes differ by rounding as well as by training."""
    return str(model.dtype).removeprefix("torch.")


def _rounded_copy(folded, model_path: str, dtype: str, trust_remote_code: bool):
    """The folded float32 weights copied into the model loaded in `dtype`: each weight rounded once. Not
    folded.to(dtype): that also rounds the buffers a half-precision load keeps in float32 (the rotary
    frequencies) and leaves config.dtype float32, which sends attention down a path several times slower."""
    from ..models import load_model

    model = load_model(model_path, dtype, trust_remote_code)
    model.load_state_dict(folded.state_dict())
    return model


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU has instructions for `dtype` matmuls (bfloat16: AVX512-BF16 or AMX; float16: AVX512-FP16
    or AMX-FP16); without them torch emulates it, slower than float32."""
    mkldnn = torch.ops.mkldnn
    return bool(mkldnn._is_mkldnn_bf16_supported() if dtype == "bfloat16" else mkldnn._is_mkldnn_fp16_supported())


def warn_emulated(dtype: str) -> None:
    """One line when a half dtype on this CPU has no instructions behind it: it runs, but slower than float32."""
    import warnings

    if not cpu_has_native(dtype):
        warnings.warn(f"this CPU has no {dtype} instructions: evaluation in {dtype} is emulated and slower than "
                      "float32; leave eval dtype unset (float32 on CPU)", stacklevel=3)  # fmt: skip
