"""`logitguard train`: config -> data -> safety tokens -> reference -> adapter -> SafetyTrainer -> outputs.

Output folder: the adapter (or full weights) as safetensors, `safety_tokens.json`, `config.yaml` (the
resolved config), `metrics.jsonl` (the Trainer's log history) and `checkpoint-*` folders for resuming.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from . import adapters
from .cache import build_reference_cache
from .config import ConfigError, TrainConfig, save_config
from .controllers import steer
from .data import (
    ChatCollator,
    apply_columns,
    ensure_chat_template,
    load_rows,
    split_holdout,
    tokenize_rows,
    write_holdout,
)
from .deprecated import spelled_now
from .files import resume_checkpoint, write_json_atomic, write_text_atomic
from .methods import mixing, salora
from .models import (
    attach_method,
    gguf_folder,
    load_model,
    load_tokenizer,
    process_state,
    run_device,
    run_dtype,
    run_precision,
    sharding,
    whole_model,
)
from .regularizers import get as get_regularizer
from .regularizers.references import build_kwargs
from .tokens import SafetyTokens
from .train_clock import TrainClock
from .trainer import SafetyTrainer

# Fixed, not cfg.seed: runs that differ only in seed hold out the same rows, so their eval losses compare.
HOLDOUT_SEED = 0


def resolve_tokens(cfg: TrainConfig, tokenizer) -> SafetyTokens:
    """The configured safety token set, or random tokens of the same size for the control."""
    if cfg.token_file:
        tokens = SafetyTokens.load(cfg.token_file)
        tokens.check_against(tokenizer)
    else:
        tokens = SafetyTokens.from_words(
            tokenizer, cfg.safety_words, cfg.token_strategy, allow_punctuation=cfg.allow_punctuation
        )
    if cfg.random_tokens:  # the control keeps the set's weights (pact), only the ids are random
        drawn = SafetyTokens.random(tokenizer, len(tokens), seed=cfg.seed, exclude=tokens)
        tokens = dataclasses.replace(drawn, weights=tokens.weights)
    return tokens


@dataclasses.dataclass
class TrainingData:
    examples: list[dict]  # tokenized: what the run trains on
    rows: list[dict]  # the rows they came from (after column mapping, hold-out and mixing)
    held_out: list[dict]
    mix_report: dict | None


def training_examples(cfg: TrainConfig, tokenizer, progress: bool = False, model=None) -> TrainingData:
    """Exactly what a run trains on: rows, column mapping, hold-out, safety-data mixing, tokenization.
    `model`: the aligned model, for mixing in its own refusals."""
    rows = apply_columns(load_rows(cfg.data, cfg.data_split), cfg.columns)
    rows, held_out = split_holdout(rows, cfg.holdout, HOLDOUT_SEED)
    rows, mix_report = mixing.apply(cfg, model, tokenizer, rows, progress)  # safety rows join the data rows
    return TrainingData(tokenize_rows(tokenizer, rows, cfg.max_length, progress), rows, held_out, mix_report)


def prebuild_caches(cfgs: list[TrainConfig], progress: bool = True) -> float | None:
    """Build once the reference caches that these runs (of one aligned model) will ask for: one per distinct
    training data, holding the union of the runs' token ids, from exactly the examples training tokenizes, on
    the training device and in the dtype training loads. A run then finds its cache complete. Returns the seconds
    it took, or None when every cache was already complete (finding them is not a build time)."""
    cfgs = [c for c in cfgs if c.reg_weight > 0 and c.reference == "cache" and not c.reference_cache]
    if not cfgs:
        return None
    start = time.perf_counter()
    first = cfgs[0]
    tokenizer = load_tokenizer(first.model, first.trust_remote_code)
    ensure_chat_template(tokenizer)
    groups: dict[tuple, list[TrainConfig]] = {}
    for c in cfgs:
        key = cache_group(c)
        groups.setdefault(key, []).append(c)
    models: dict[tuple, object] = {}
    built = False
    for group in groups.values():
        c = group[0]
        dtype = run_dtype(c)
        where = (c.reference_model or c.model, dtype, c.quantize)
        with whole_model():  # as in train(): a whole model, not one partitioned by a DeepSpeed config left installed
            if where not in models:
                models[where] = load_model(where[0], dtype, c.trust_remote_code, c.quantize, run_device(c))
            ids = list(dict.fromkeys(i for r in group for i in resolve_tokens(r, tokenizer).ids))
            examples = training_examples(c, tokenizer, model=models[where]).examples
            folder = build_reference_cache(
                models[where], tokenizer, examples, ids, Path(c.cache_dir) / "reference", c.max_length,
                dtype=c.reference_dtype, batch_size=c.batch_size, progress=progress,
                **_cache_extras(group),
            )  # fmt: skip
            built = built or folder.built
    return time.perf_counter() - start if built else None


def cache_group(c: TrainConfig) -> tuple:
    """Runs with equal groups read one cache: the same reference model and dtype, and everything that decides the
    examples training tokenizes: the data, its split and hold-out, and the safety rows mixed into it (a mixed run
    trains on other examples than a plain one on the same file)."""
    mixing = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name.startswith("safety_mix")}
    seeded = c.seed if (c.holdout or c.safety_mix) else None
    return (c.reference_model or c.model, c.data, c.data_split, json.dumps(c.columns, sort_keys=True), c.holdout,
            c.max_length, c.reference_dtype, c.dtype, c.precision, c.quantize, c.cache_dir,
            json.dumps(mixing, sort_keys=True), seeded)  # fmt: skip


def _cache_extras(cfgs: list[TrainConfig]) -> dict:
    """The per-token extras (cache.py) a group of runs reads, so one build serves them all."""
    kinds = [(get_regularizer(c.regularizer).reference, c) for c in cfgs]
    return dict(label_logp=any(k == "label_logp" for k, _ in kinds),
                topk=max([c.kl_topk for k, c in kinds if k == "topk"], default=0))  # fmt: skip


def make_reference(cfg: TrainConfig, model, tokenizer, examples, tokens: SafetyTokens, progress: bool = True):
    """The reference for this run, as the regularizer's registry entry builds it. A cache is built here, before any
    adapter is attached, on the device the model trains on (each rank its share of the shards under `accelerate
    launch`)."""
    if cfg.reg_weight == 0:
        return None
    entry = get_regularizer(cfg.regularizer)
    if len(tokens) < entry.min_tokens:  # refused before any cache is built (the trainer would refuse it after)
        raise ConfigError(f"the {entry.name} regularizer compares distributions over the safety tokens: it needs >= 2")
    if cfg.reference in ("online", "paper"):
        return entry.online(tokens.ids, tokenizer, cfg.method, cfg, paper=cfg.reference == "paper")
    if cfg.reference_model:  # continual learning: anchor to the original aligned model, not this stage's start
        dtype = run_dtype(cfg)
        model = load_model(cfg.reference_model, dtype, cfg.trust_remote_code, cfg.quantize, _device(model))
    start = time.perf_counter()
    reference = entry.cached(model, tokenizer, examples, tokens.ids, cfg, **build_kwargs(cfg, progress))
    seconds = time.perf_counter() - start
    if progress and seconds > 1.0:  # a reused cache returns at once: nothing to report
        n = sum(len(ex["input_ids"]) for ex in examples)
        print(f"reference cache: {n} tokens in {seconds:.1f} s ({n / seconds:,.0f} tokens/s on {_device(model)})")
    return reference


def make_anchors(cfg: TrainConfig, model, tokenizer, tokens: SafetyTokens):
    """The anchored regularizer's anchors (refusals generated once and cached), or None."""
    if not cfg.anchor_prompts:
        return None
    from .anchors import Anchors, anchor_conversations, tokenize_anchors
    from .eval.prompts import read_prompts

    prompts = read_prompts(cfg.anchor_prompts)[: cfg.anchor_count]
    examples = tokenize_anchors(
        tokenizer, anchor_conversations(model, tokenizer, prompts, cfg.cache_dir), cfg.max_length
    )
    return Anchors(
        model, examples, tokenizer.pad_token_id, list(tokens.ids), cfg.anchor_regularizer, cfg.anchors_per_step,
        cfg.anchor_weight, cfg.anchor_kl_tokens, cfg.temperature, cfg.seed,
    )  # fmt: skip


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Examples:
    """A list of tokenized examples as a map-style dataset (no column dropping, no copies)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def training_arguments(cfg: TrainConfig, progress: bool = True):
    from transformers import TrainingArguments

    precision = run_precision(cfg)
    values = dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=not progress,
        # mixed precision through the Trainer: autocast, plus a loss scaler for fp16
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # PEFT needs no input-grad trick without reentrancy
        # without an accelerator, use_cpu makes `accelerate launch` processes form a gloo process group
        use_cpu=not torch.accelerator.is_available(),
    )
    values.update(cfg.trainer)
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as e:  # a bad value under trainer:, e.g. an unknown scheduler name
        raise ConfigError(f"trainer: {e}") from None


def train(cfg: TrainConfig, progress: bool = True, model=None, tokenizer=None) -> dict:
    """Run one fine-tune. `model` / `tokenizer` may be passed in-process (already loaded) to skip loading."""
    from transformers import set_seed

    set_seed(cfg.seed)
    if cfg.gguf_file:
        cfg = dataclasses.replace(cfg, model=str(gguf_folder(cfg.gguf_file, cfg.cache_dir, progress=progress)))
    out = Path(cfg.output_dir)
    args = training_arguments(cfg, progress)  # a bad trainer value fails before anything is loaded
    tokenizer = tokenizer or load_tokenizer(cfg.model, cfg.trust_remote_code)
    ensure_chat_template(tokenizer)
    device = run_device(cfg)
    dtype = run_dtype(cfg)
    # Under DeepSpeed ZeRO-3 everything up to the Trainer uses the whole model (its engine partitions it after).
    with whole_model():
        if model is None:
            model = load_model(cfg.model, dtype, cfg.trust_remote_code, cfg.quantize, device, sharding(args))
        elif not getattr(model, "is_quantized", False):
            model = model.to(device)
        tokens = resolve_tokens(cfg, tokenizer)
        main = process_state().is_main_process
        if progress and main:
            print(tokens.table(), flush=True)
        data = training_examples(cfg, tokenizer, progress, model)
        examples, rows, held_out, mix_report = data.examples, data.rows, data.held_out, data.mix_report
        reference = make_reference(cfg, model, tokenizer, examples, tokens, progress)
        anchors = make_anchors(cfg, model, tokenizer, tokens)  # from the aligned model, before the adapter
        model = attach_method(
            model, cfg.method, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.gradient_checkpointing
        )
        model, salora_report = salora.apply(cfg, model, tokenizer, rows, progress)  # SaLoRA's projection and init
    trainer = SafetyTrainer(
        model=model,
        args=args,
        train_dataset=_Examples(examples),
        data_collator=ChatCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        safety_ids=list(tokens.ids),
        reference=reference,
        reg_weight=cfg.reg_weight,
        regularizer=cfg.regularizer,
        temperature=cfg.temperature,
        positions=cfg.positions,
        first_response_tokens=cfg.first_response_tokens,
        first_response_weight=cfg.first_response_weight,
        chunked_ce=cfg.chunked_ce,
        anchors=anchors,
        regularizer_kwargs=get_regularizer(cfg.regularizer).kwargs(cfg, tokens) or None,
    )
    # Nothing is written into the output folder before this point, so a refused run overwrites nothing there.
    _check_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if held_out:  # kept for eval loss on data the run never saw, as the paper does with Alpaca
        write_holdout(held_out, out / "holdout.jsonl")
    pissa_init = out / "pissa_init"
    if adapters.get(cfg.method).converts_on_save and not pissa_init.exists():
        _save_pissa_init(model, pissa_init)
    monitor, controller = steer(cfg, tokenizer, trainer)  # the safety monitor, then a lambda controller if asked
    resume = resume_checkpoint(out) if cfg.resume else None  # the last one saved whole
    # written before training: checkpoints pushed to the hub during training and a killed run's folder carry them
    if main:
        tokens.save(out / "safety_tokens.json")
        save_config(cfg, out / "config.yaml")
        if mix_report:
            write_json_atomic(out / "safety_mix.json", mix_report)
    clock = TrainClock(resume)
    trainer.add_callback(clock)
    result = trainer.train(resume_from_checkpoint=resume)
    timing = clock.result(trainer.state.global_step)
    _save_outputs(cfg, trainer, model, tokenizer, out, pissa_init)
    if salora_report and trainer.is_world_process_zero():  # B <- C B: a plain LoRA adapter on the aligned model
        salora.fold(model, out, salora_report)
    if trainer.args.push_to_hub:  # the folder, with safety_tokens.json and config.yaml beside the adapter
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    return {
        "output_dir": str(out),
        **timing,  # train_seconds and step_seconds over the whole run, across a resume; steps_run
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "safety_ids": list(tokens.ids),
        "safety_monitor": monitor.history if monitor else None,
        "lambda_controller": controller.report() if controller else None,
        "safety_mix": mix_report,
        "salora": salora_report,
        "trainer": trainer,
    }


# Settings a resumed run may change: where it logs and saves, how long it trains, what it watches.
RESUMABLE_CHANGES = {"output_dir", "resume", "logging_steps", "save_steps", "epochs", "trainer"}
TRAINER_RESUMABLE = {"max_steps", "report_to", "logging_dir", "run_name", "save_total_limit", "disable_tqdm",
                     "push_to_hub", "hub_model_id", "hub_strategy"}  # fmt: skip


def resume_conflicts(cfg: TrainConfig, out: Path) -> list[str]:
    """The settings in which `out`'s checkpoints differ from `cfg` (empty when there is nothing to resume, or
    when only logging, saving, length of training or the monitor changed)."""
    import yaml

    saved = out / "config.yaml"
    if not cfg.resume or not saved.is_file() or resume_checkpoint(out) is None:
        return []
    old = yaml.safe_load(saved.read_text()) or {}
    old = spelled_now(old)  # saved before a rename (str_weight: reg_weight)
    new = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))
    # a key added to TrainConfig after those checkpoints were saved had its default then
    defaults = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(TrainConfig(model="m", data="d"))))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    # the monitor only watches, and may change on a resume, unless safety_target steers lambda by its probe
    steered = new.get("safety_target") is not None or new.get("safety_target_drop") is not None
    differ = [k for k in new if k not in RESUMABLE_CHANGES and (steered or not k.startswith("monitor_"))
              and old.get(k) != new[k]]  # fmt: skip
    old_trainer, new_trainer = (
        {k: v for k, v in (d.get("trainer") or {}).items() if k not in TRAINER_RESUMABLE} for d in (old, new)
    )
    return sorted(differ + (["trainer"] if old_trainer != new_trainer else []))


def start_over_if_stale(cfg: TrainConfig) -> None:
    """For runners that own their output folders (bench, demo): a run whose settings changed since its
    checkpoints were written starts from scratch instead of being refused."""
    import shutil

    stale = resume_conflicts(cfg, Path(cfg.output_dir))
    if stale:
        print(f"{cfg.output_dir}: settings changed ({', '.join(stale)}); training this run from scratch", flush=True)
        shutil.rmtree(cfg.output_dir)


def _check_resume(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume checkpoints that were trained with other settings: the Trainer would silently continue
    the old run (with a changed learning rate, it trained 0 steps and kept the old adapter)."""
    differ = resume_conflicts(cfg, out)
    if differ:
        moved = ""
        if differ == ["reg_weight"]:  # the error path only: one more small read
            import yaml

            old = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("reg_weight")
            if old == 1.0 and cfg.reg_weight == get_regularizer(cfg.regularizer).default_weight != 1.0:
                # a run started before this term's default lambda moved from 1 (STR's), resumed without reg_weight
                moved = (f" ({cfg.regularizer}'s default lambda is {cfg.reg_weight:g} now, it was 1: set reg_weight 1 "
                         "to resume)")  # fmt: skip
        raise ConfigError(
            f"{out} holds checkpoints of a run with other settings ({', '.join(differ)}){moved}; resuming would "
            "continue that run. Use another output_dir, or resume: false to train from scratch there"
        )


def release_trainer(trainer) -> None:
    """Drop the trainer's model, optimizer and scheduler and return their accelerator memory, so the next run of a
    sweep does not start with a 7B model and its optimizer state still resident."""
    from .models import release_memory

    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    release_memory()


def _save_pissa_init(model, folder: Path) -> None:
    """PEFT's recipe: save the initial PiSSA adapter so the final one converts to plain LoRA on the
    original base weights (PiSSA rewrites them)."""
    config = model.peft_config["default"]
    config.init_lora_weights = True
    model.save_pretrained(str(folder))
    config.init_lora_weights = "pissa"


def _save_outputs(cfg, trainer, model, tokenizer, out: Path, pissa_init: Path) -> None:
    """trainer.save_model runs on every rank: under FSDP and ZeRO-3 gathering the weights is collective."""
    converts = adapters.get(cfg.method).converts_on_save
    if not converts:
        trainer.save_model(str(out), _internal_call=True)  # pushed once, below, with everything beside it
    if not trainer.is_world_process_zero():
        return
    if converts:
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(pissa_init))
    tokenizer.save_pretrained(str(out))
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in trainer.state.log_history))
