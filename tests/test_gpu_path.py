"""The GPU user's path, run on the CPU as far as it goes: devices, precision, QLoRA, gradient checkpointing,
DataParallel, Trainer flags as config keys."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import chat_examples
from test_trainer import lora, make_trainer, one_step_update

from logitguard.cli import main
from logitguard.config import ConfigError, build_config
from logitguard.models import DTYPES, load_model, resolve_dtype, resolve_precision
from logitguard.tokens import SafetyTokens


def test_step_counts_are_summed_on_the_batches_device(model, tokenizer, tmp_path):
    """The class of bug behind 'first step on CUDA crashes': a tensor made on the CPU meeting batches elsewhere.
    The meta device stands in for the accelerator."""
    examples = chat_examples(tokenizer)[:4]
    trainer = make_trainer(tmp_path, lora(model), tokenizer, examples, 0.0, [5], None)
    collate = trainer.data_collator
    batches = [{k: v.to("meta") for k, v in collate(examples[i : i + 2]).items()} for i in (0, 2)]
    _, _ = trainer.get_batch_samples(iter(batches), 2, torch.device("meta"))
    assert trainer._step_counts.device.type == "meta"


def fake_cuda(monkeypatch, major: int | None) -> None:
    """A CUDA GPU of compute capability `major`.x (None: none), faked where torch asks the driver, not where
    logitguard asks torch: whether CUDA is there, the device's properties, and whether a bf16 tensor can be made on
    it (yes on every CUDA GPU: below 8.0 bf16 is emulated)."""
    present = major is not None
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: present)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: present)


@pytest.mark.parametrize(
    "precision, dtype, major, method, expect",
    [
        ("auto", "auto", None, "lora", ("fp32", "float32")),  # CPU
        ("auto", "auto", 8, "lora", ("bf16", "bfloat16")),  # A100
        ("auto", "auto", 9, "lora", ("bf16", "bfloat16")),  # H100, H200
        ("auto", "auto", 7, "lora", ("fp16", "float16")),  # V100, T4: bf16 only emulated
        ("auto", "auto", 7, "full", ("fp16", "float32")),  # trained weights stay fp32 for the scaler
        ("auto", "auto", 9, "full", ("bf16", "float32")),  # and as master weights under bf16
        ("auto", "float16", None, "lora", ("fp16", "float16")),  # a named half dtype picks its precision
        ("fp32", "auto", 9, "lora", ("fp32", "float32")),
    ],
)
def test_precision_and_dtype_rules(monkeypatch, precision, dtype, major, method, expect):
    fake_cuda(monkeypatch, major)
    if major is not None:
        assert torch.cuda.is_bf16_supported()  # counting emulation, every GPU here would say yes
    resolved = resolve_precision(precision, dtype)
    assert (resolved, resolve_dtype(dtype, resolved, method)) == expect


@pytest.mark.parametrize("how", ["trainer", "accelerate"])
def test_a_cpu_run_on_a_gpu_machine_trains_in_fp32(monkeypatch, how):
    """`trainer: {use_cpu: true}` or `accelerate launch --cpu` on a machine with an H200: auto precision is the
    CPU's fp32 (bf16 autocast on a CPU is emulated, slower), and the model loads on the CPU."""
    from logitguard.models import run_device, run_dtype, run_precision, wants_cpu

    fake_cuda(monkeypatch, 9)
    trainer = {"use_cpu": True} if how == "trainer" else {}
    if how == "accelerate":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    cfg = build_config({"model": "m", "data": "d", "trainer": trainer})
    assert wants_cpu(cfg.trainer) and (run_precision(cfg), run_dtype(cfg)) == ("fp32", "float32")
    assert run_device(cfg) == torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    gpu = build_config({"model": "m", "data": "d"})
    assert not wants_cpu(gpu.trainer) and (run_precision(gpu), run_dtype(gpu)) == ("bf16", "bfloat16")


def test_pure_half_precision_is_refused():
    with pytest.raises(ConfigError, match="pure half precision"):
        build_config({"model": "m", "data": "d", "dtype": "float16", "precision": "fp32"})


def test_a_model_stored_in_fp16_is_not_trained_in_pure_fp16(model_dir, tmp_path):
    from logitguard.config import load_config
    from logitguard.train import train

    fp16_dir = tmp_path / "fp16"
    load_model(str(model_dir), "float16").save_pretrained(fp16_dir)
    values = {"model": str(fp16_dir), "data": "tests/assets/chat.jsonl", "output_dir": str(tmp_path / "o")}
    cfg = load_config(None, {**values, "max_length": 64, "save_steps": 100})
    from transformers import AutoTokenizer

    result = train(cfg, progress=False, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    trained = result["trainer"].model
    # what auto picks here, by the function the code asks: fp32 on a CPU, bf16 from compute capability 8.0, else fp16
    frozen = DTYPES[resolve_dtype("auto", resolve_precision("auto"))]
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {torch.float32}  # adapters: fp32
    assert {p.dtype for p in trained.parameters() if not p.requires_grad} == {frozen}  # never fp16 under fp32 compute


def test_bf16_mixed_precision_trains_fp32_adapters_on_bf16_weights(model_dir, tmp_path):
    from logitguard.config import load_config
    from logitguard.train import train

    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "precision": "bf16",
                             "output_dir": str(tmp_path / "o"), "max_length": 64, "save_steps": 100,
                             "learning_rate": 1e-2})  # fmt: skip
    result = train(cfg, progress=False)
    trainer = result["trainer"]
    assert trainer.args.bf16 and not trainer.args.fp16
    kinds = {("lora_" in n, p.dtype) for n, p in trainer.model.named_parameters()}
    assert kinds == {(True, torch.float32), (False, torch.bfloat16)}
    losses = [row["ce"] for row in trainer.state.log_history if "ce" in row]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_fp16_precision_goes_through_the_trainers_scaler():
    from logitguard.config import build_config
    from logitguard.train import training_arguments

    cfg = build_config({"model": "m", "data": "d", "precision": "fp16", "output_dir": "/tmp/x"})
    args = training_arguments(cfg, progress=False)
    assert args.fp16 and not args.bf16  # the Trainer adds autocast and a GradScaler for fp16


def test_gradient_checkpointing_gives_the_same_update(tokenizer, tmp_path):
    examples = chat_examples(tokenizer)[:4]
    ids = list(SafetyTokens.from_words(tokenizer, "I,cannot").ids)
    plain = one_step_update(tmp_path, tokenizer, examples, ids, batch_size=2, accum=2)
    ckpt = one_step_update(tmp_path, tokenizer, examples, ids, batch_size=2, accum=2, gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    assert any(v.abs().max() > 0 for v in plain.values())
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-4, atol=1e-6)


def test_dataparallel_is_refused(monkeypatch, model, tokenizer, tmp_path):
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ConfigError, match="accelerate launch"):
        make_trainer(tmp_path, lora(model), tokenizer, chat_examples(tokenizer), 1.0, [5], None)


def test_trainer_flags_are_config_keys():
    cfg = build_config({"model": "m", "data": "d", "warmup_steps": 3, "report_to": ["tensorboard"], "bf16": True,
                        "num_train_epochs": 2})  # fmt: skip
    assert cfg.trainer == {"warmup_steps": 3, "report_to": ["tensorboard"]}
    assert (cfg.precision, cfg.epochs) == ("bf16", 2.0)
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        build_config({"model": "m", "data": "d", "warmup_step": 3})
    with pytest.raises(ConfigError, match="set it as 'precision'"):
        build_config({"model": "m", "data": "d", "trainer": {"bf16": True}})


def test_trainer_flags_from_the_command_line(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    flags = ["--max-length", "64", "--max-steps", "2", "--lr-scheduler-type", "constant", "--reg-weight", "0.5"]
    code = main(
        ["train", "--model", str(model_dir), "--data", "tests/assets/chat.jsonl", "--output-dir", str(out)] + flags
    )
    assert code == 0
    config = (out / "config.yaml").read_text()
    assert "max_steps: 2" in config and "lr_scheduler_type: constant" in config
    assert json.loads(capsys.readouterr().out.splitlines()[-2])["global_step"] == 2


def test_qlora_4bit_trains_the_adapter_on_a_quantized_model(tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_llama

    from logitguard.config import load_config
    from logitguard.train import train

    model_dir = tmp_path / "model"  # bitsandbytes' CPU 4-bit kernel packs 64 output features at a time
    tiny_llama(len(tokenizer), hidden=64).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "quantize": "4bit",
                             "gradient_checkpointing": True, "output_dir": str(tmp_path / "o"), "max_length": 64,
                             "cache_dir": str(tmp_path / "cache"),  # built here: the build must not break backward
                             "save_steps": 100, "learning_rate": 1e-2, "target_modules": "q_proj,v_proj",
                             "logging_steps": 1})  # fmt: skip
    result = train(cfg, progress=False)
    model = result["trainer"].model
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    assert q_proj.lora_B["default"].weight.abs().max() > 0, result["trainer"].state.log_history  # it learned
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
    reg = [row["reg"] for row in result["trainer"].state.log_history if "reg" in row]
    assert reg and all(r >= 0 for r in reg)


def test_release_trainer_frees_the_model_for_the_next_run(model_dir, tmp_path):
    import gc
    import weakref

    from logitguard.config import load_config
    from logitguard.train import release_trainer, train

    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "max_steps": 1,
                             "output_dir": str(tmp_path / "o"), "max_length": 64})  # fmt: skip
    result = train(cfg, progress=False)
    alive = weakref.ref(result["trainer"].model)
    release_trainer(result.pop("trainer"))
    gc.collect()
    assert alive() is None  # nothing (trainer, optimizer, accelerator) still holds the model


def test_train_prints_the_chosen_token_table_first(model_dir, tmp_path, capsys):
    code = main(["train", "--model", str(model_dir), "--data", "tests/assets/chat.jsonl", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "o"), "--max-length", "64", "--safety-words", "I,cannot"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("chosen") < out.index('"global_step"')  # the table comes before training
    saved = json.loads((tmp_path / "o" / "safety_tokens.json").read_text())
    assert saved["words"] == ["I", "cannot"] and all(t.strip("Ġ▁ ") for t in saved["tokens"])


def test_push_to_hub_uploads_the_adapter_with_its_tokens_and_config(model_dir, tmp_path, monkeypatch):
    """No network here: the Trainer's hub calls are replaced by recorders; what matters is what the folder holds
    when the Trainer uploads it."""
    from transformers import Trainer

    from logitguard.config import load_config
    from logitguard.train import train

    pushed = []
    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, token=None: None)
    monkeypatch.setattr(Trainer, "_push_from_checkpoint", lambda self, folder: None)
    monkeypatch.setattr(Trainer, "push_to_hub", lambda self, *a, **k: pushed.append(sorted(
        p.name for p in Path(self.args.output_dir).iterdir())))  # fmt: skip
    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "max_steps": 1,
                             "output_dir": str(tmp_path / "o"), "max_length": 64, "push_to_hub": True,
                             "hub_model_id": "me/adapter"})  # fmt: skip
    train(cfg, progress=False)
    assert len(pushed) == 1
    assert {"adapter_model.safetensors", "safety_tokens.json", "config.yaml"} <= set(pushed[0])


def test_eval_mode_keeps_4bit_layers_out_of_their_cpu_inference_path():
    """Every no-grad pass before training (reference, anchors' refusals, mixing, mining) goes through eval_mode,
    which leaves bitsandbytes' 4-bit layers in training mode (their eval path loses backward on a CPU)."""
    from torch import nn

    from logitguard.reference import eval_mode

    class Linear4bit(nn.Linear):  # stands in for bitsandbytes.nn.Linear4bit: its name and module
        __module__ = "bitsandbytes.nn.modules"

    class Wrapper(nn.Linear):  # PEFT's LoRA layer around it has the same name, and is put in eval mode
        __module__ = "peft.tuners.lora.bnb"

    Wrapper.__name__ = "Linear4bit"
    model = nn.Sequential(nn.Dropout(0.1), Linear4bit(2, 2), Wrapper(2, 2)).train()
    with eval_mode(model):
        assert not model[0].training and model[1].training and not model[2].training
    assert model.training and model[1].training
    model.eval()
    with eval_mode(model):
        assert model[1].training
    assert not model.training and not model[1].training  # restored as it was


def test_full_fine_tune_in_bf16_keeps_fp32_weights_that_take_tiny_updates(model_dir, tmp_path):
    """A bf16 weight drops every update below 2^-8 of itself; trained weights stay fp32 and autocast computes in
    bf16, as the Trainer's mixed precision means."""
    from safetensors.torch import load_file

    from logitguard.config import load_config
    from logitguard.train import train

    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "method": "full",
                             "precision": "bf16", "reg_weight": 0, "output_dir": str(tmp_path / "o"), "max_length": 64,
                             "max_steps": 1, "optim": "sgd", "learning_rate": 1e-4, "lr_scheduler_type": "constant",
                             "save_steps": 100})  # fmt: skip
    result = train(cfg, progress=False)
    assert result["trainer"].args.bf16
    trained = {n: p.detach().cpu() for n, p in result["trainer"].model.named_parameters()}  # beside the file's
    assert {p.dtype for p in trained.values()} == {torch.float32}
    original = load_file(model_dir / "model.safetensors")
    # updates smaller than bf16 could hold (under 2^-9 of the weight: rounding to bf16 would undo them) were kept
    kept = [((w - original[n]).abs() < original[n].abs() * 2**-9) & (w != original[n]) for n, w in trained.items()]
    assert sum(int(k.sum()) for k in kept) > 0


class FakeZero3Config:
    """What transformers' DeepSpeed global points to after TrainingArguments under `accelerate launch` with ZeRO-3
    (an HfDeepSpeedConfig; deepspeed itself is not installed here)."""

    config = {"zero_optimization": {"stage": 3}}

    def is_zero3(self):
        return True


@pytest.fixture
def zero3_config():
    from transformers.integrations import deepspeed

    fake = FakeZero3Config()  # held here: transformers keeps only a weak reference
    deepspeed.set_hf_deepspeed_config(fake)
    yield fake
    deepspeed.unset_hf_deepspeed_config()


def test_zero3_loads_and_builds_the_cache_from_the_whole_model(zero3_config, model_dir, tmp_path, monkeypatch):
    """With the config installed, from_pretrained would partition the weights as it loads them (zero.Init; here:
    fail to import deepspeed). logitguard loads, fingerprints and builds the cache with it unset, and puts it back
    for the Trainer, whose engine partitions the model."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    import logitguard.train as train_module
    from logitguard.config import load_config

    class Stop(Exception):
        pass

    seen = {}

    def trainer_instead(**kwargs):
        seen.update(zero3=is_deepspeed_zero3_enabled(), reference=kwargs["reference"], model=kwargs["model"])
        raise Stop

    monkeypatch.setattr(train_module, "SafetyTrainer", trainer_instead)
    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "max_length": 64,
                             "output_dir": str(tmp_path / "o"), "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    with pytest.raises(Stop):
        train_module.train(cfg, progress=False)
    assert seen["zero3"]  # restored before the Trainer
    assert seen["reference"] is not None and (Path(seen["reference"].folder) / "manifest.json").is_file()
    assert all(p.numel() > 0 for p in seen["model"].parameters())  # whole, not partitioned


@pytest.mark.parametrize("marks", [("ds_id", "ds_status", "ds_shape"), ("ds_shape",)])
def test_fingerprint_refuses_weights_that_zero3_partitioned(model, marks):
    from logitguard.cache import model_fingerprint
    from logitguard.reference import ReferenceError

    weight = model.model.layers[0].self_attn.q_proj.weight
    values = {"ds_id": 7, "ds_status": "NOT_AVAILABLE", "ds_shape": weight.shape}  # as DeepSpeed marks a partition
    for name in marks:
        setattr(weight, name, values[name])
    weight.data = torch.empty(0, dtype=weight.dtype)  # what a process holds of a partitioned weight outside a gather
    with pytest.raises(ReferenceError, match="partitioned across processes") as e:
        model_fingerprint(model)
    assert "\n" not in str(e.value) and "q_proj" in str(e.value)


def test_quantize_under_zero3_is_refused_in_one_line(zero3_config, model_dir, tmp_path):
    from logitguard.config import load_config
    from logitguard.train import train

    cfg = load_config(None, {"model": str(model_dir), "data": "tests/assets/chat.jsonl", "quantize": "4bit",
                             "output_dir": str(tmp_path / "o"), "max_length": 64})  # fmt: skip
    with pytest.raises(ConfigError, match="quantize: 4bit under DeepSpeed ZeRO-3") as e:
        train(cfg, progress=False)  # it said the model "could not be fetched from the hub"
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "env, quantize, refusal",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "4bit", "DeepSpeed ZeRO-3"),
        ({"ACCELERATE_USE_FSDP": "true"}, "8bit", "cannot be sharded by FSDP"),
    ],
)
def test_quantizations_that_cannot_be_sharded_are_refused(monkeypatch, model_dir, env, quantize, refusal):
    """The environment `accelerate launch` sets for a ZeRO-3 or an FSDP config."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=refusal):
        load_model(str(model_dir), "bfloat16", quantize=quantize)


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype(tokenizer, tmp_path, monkeypatch):
    """FSDP shards floating-point tensors only: the FSDP-QLoRA recipe stores the 4-bit weights in the compute dtype
    and pins no device map (bitsandbytes places the model on this process's GPU)."""
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_llama
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"  # bitsandbytes' CPU 4-bit kernel packs 64 output features at a time
    tiny_llama(len(tokenizer), hidden=64).save_pretrained(model_dir)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    calls, load = [], AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(k) or load(cls, *a, **k)))  # fmt: skip
    model = load_model(str(model_dir), "bfloat16", quantize="4bit", device=torch.device("cpu"))
    assert "device_map" not in calls[0]
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.bfloat16


def test_help_imports_no_bitsandbytes_and_its_kernel_warning_stays_quiet():
    """bitsandbytes logs, while it is imported on CPUs with AVX512-BF16 and no `kernels` package, that it could not
    fetch a CPU kernel; transformers' Trainer imports PEFT, which imports bitsandbytes. `--help` imports neither, and
    a training command's import (stood in for by the same logger and message) prints nothing."""
    code = (
        "import logging, sys\nfrom logitguard.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules)\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward from "
        "kernels-community: %s. Please make sure you already `pip install kernels`', 'No module named kernels')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: logitguard" in proc.stdout
    assert "bitsandbytes imported: False" in proc.stdout
    assert "gemm_4bit_forward" not in proc.stdout + proc.stderr


def test_an_unset_eval_dtype_is_the_checkpoints_own_on_an_accelerator_and_float16_without_bf16(tmp_path, monkeypatch):
    """default_eval_dtype: float32 on CPU; on an accelerator the stored dtype, except a bf16 checkpoint on a GPU
    without bf16 arithmetic (T4, V100), which runs in float16 as training's precision auto does there."""
    from conftest import tiny_llama

    from logitguard.eval.generate import default_eval_dtype

    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    tiny_llama(64).to(torch.bfloat16).save_pretrained(bf16)
    tiny_llama(64).save_pretrained(fp32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert default_eval_dtype(bf16, "cpu") == "float32"
    assert default_eval_dtype(bf16, "cuda") == "bfloat16"
    assert default_eval_dtype(fp32, "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert default_eval_dtype(bf16, "cuda") == "float16"
    assert default_eval_dtype(fp32, "cuda") == "float32"
    assert default_eval_dtype(bf16, "cpu") == "float32"


def test_a_full_fine_tune_is_evaluated_in_the_aligned_checkpoints_dtype_on_an_accelerator(tmp_path, monkeypatch):
    """Full fine-tuning saves its float32 master weights; with the eval dtype left unset the runner evaluates
    that row in the aligned checkpoint's dtype on an accelerator (as the aligned row and the adapters' rows run):
    it names the aligned checkpoint as dtype_of, which load_model_for_eval follows (on CPU default_eval_dtype is
    float32 whatever it is given; a dtype the file sets is used as it is)."""
    import yaml
    from conftest import tiny_llama

    from logitguard import runner as runner_module
    from logitguard.eval import generate
    from logitguard.experiment import load_experiment

    aligned, full = tmp_path / "aligned", tmp_path / "full"
    tiny_llama(64).to(torch.bfloat16).save_pretrained(aligned)
    tiny_llama(64).save_pretrained(full)
    exp_file = tmp_path / "x.yaml"
    exp_file.write_text(yaml.safe_dump({"description": "d", "model": str(aligned), "runs": [{"name": "full"}]}))
    runner = runner_module.Runner(load_experiment(str(exp_file)), tmp_path / "r", tmp_path / "w", progress=False)
    seen = []
    monkeypatch.setattr(runner_module, "evaluate", lambda *args: seen.append(args[6]))  # dtype_of
    runner._evaluate(str(full), None, tmp_path, like_aligned=True)
    runner._evaluate(str(aligned), "adapter", tmp_path)
    assert seen == [runner.model, None]

    # load_model_for_eval resolves an unset dtype from dtype_of when given, else from the folder it loads
    def resolved(checkpoint, device, trust):
        raise LookupError(str(checkpoint))

    monkeypatch.setattr(generate, "default_eval_dtype", resolved)
    for dtype_of, expected in ((str(aligned), str(aligned)), (None, str(full))):
        with pytest.raises(LookupError) as raised:
            generate.load_model_for_eval(full, dtype=None, dtype_of=dtype_of)
        assert str(raised.value) == expected


def test_the_runner_evaluates_only_a_full_fine_tunes_row_like_the_aligned_model(tmp_path, model_dir, monkeypatch):
    """The rule above is applied where it belongs: a full fine-tune's row (a whole model in float32 master weights),
    not an adapter's row (the aligned model's own weights plus the adapter) nor the aligned row."""
    from test_runner import _bench, _tiny_experiment

    from logitguard.runner import Runner

    calls = []
    original = Runner._evaluate

    def recording(self, model, adapter, folder, trust_code=None, like_aligned=False):
        calls.append((Path(folder).parent.name, like_aligned))
        return original(self, model, adapter, folder, trust_code, like_aligned)

    monkeypatch.setattr(Runner, "_evaluate", recording)
    runs = [{"name": "LoRA", "train": {"reg_weight": 0}}, {"name": "full", "train": {"method": "full"}}]
    _bench(tmp_path, _tiny_experiment(tmp_path, model_dir, runs))
    assert sorted(calls) == [("aligned-base", False), ("full", True), ("lora", False)]
