"""SaLoRA (method salora): the projection, subspaces and initialisation against direct formulas; the model is unchanged
at initialisation; after training the saved adapter is plain LoRA with B <- C B whose update has no component in
the safety directions, where plain LoRA's has. Safety samples are mildly worded."""

import json
import math

import pytest
import torch
from conftest import tiny_llama
from helpers import ASSETS
from safetensors.torch import load_file

from logitguard.cli import main
from logitguard.config import ConfigError, load_config
from logitguard.data import load_rows, tokenize_rows
from logitguard.methods import salora
from logitguard.methods.salora import init_factors, output_grams, project, projection, residual, top_directions
from logitguard.models import attach_method

TARGETS = ["q_proj", "v_proj", "o_proj"]


def orthonormal(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0]


def write_safety(path, n=10):
    prompts = ["Tell me how to do a bad thing.", "Help me break a rule.", "How can I be mean to someone?",
               "Show me how to trick a friend.", "Explain how to cheat at a game."]  # fmt: skip
    refusals = ["I cannot help with that.", "I'm sorry, but I can't help with that."]
    rows = [{"messages": [{"role": "user", "content": f"{prompts[i % 5]} ({i})"},
                          {"role": "assistant", "content": refusals[i % 2]}]} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_projection_against_the_direct_formula():
    v = orthonormal(12, 3)
    c = projection(v)
    torch.testing.assert_close(c, torch.eye(12) - v @ v.T)
    torch.testing.assert_close(c @ c, c, atol=1e-6, rtol=0)  # idempotent
    torch.testing.assert_close(c, c.T)
    torch.testing.assert_close(c @ v, torch.zeros(12, 3), atol=1e-6, rtol=0)  # annihilates V_s
    x = torch.randn(12, 5)
    torch.testing.assert_close(project(x, v), c @ x, atol=1e-6, rtol=0)
    torch.testing.assert_close(v.T @ project(x, v), torch.zeros(3, 5), atol=1e-6, rtol=0)


def test_top_directions_are_the_top_left_singular_vectors():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(10, 200, generator=g) * torch.linspace(5, 0.5, 10)[:, None]  # out x N activation matrix
    v, share = top_directions(y @ y.T, 3)
    u, s, _ = torch.linalg.svd(y, full_matrices=False)
    torch.testing.assert_close(v @ v.T, u[:, :3] @ u[:, :3].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(3), atol=1e-5, rtol=0)
    assert share == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_initialisation_against_the_direct_formula():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 10, generator=g)
    v_task, v_safe, rank, scaling = orthonormal(12, 4, seed=3), orthonormal(12, 2, seed=4), 3, 2.0
    b0, a0 = init_factors(w, v_task, rank, scaling)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    p_task = v_task @ v_task.T
    torch.testing.assert_close(b0, p_task @ u[:, :rank] @ torch.diag(s[:rank].sqrt()) / math.sqrt(scaling))
    torch.testing.assert_close(a0, torch.diag(s[:rank].sqrt()) @ vh[:rank] / math.sqrt(scaling))
    torch.testing.assert_close(scaling * b0 @ a0, p_task @ u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
    w_res = residual(w, v_safe, b0, a0, scaling)
    torch.testing.assert_close(w_res + scaling * projection(v_safe) @ b0 @ a0, w, atol=1e-5, rtol=0)
    b_plain, _ = init_factors(w, None, rank, scaling)  # no task projection: PiSSA's factors
    torch.testing.assert_close(b_plain, u[:, :rank] @ torch.diag(s[:rank].sqrt()) / math.sqrt(scaling))


def direct_activations(model, tokenizer, rows, names, max_length=64):
    """{name: Y (out x N)}: each conversation alone (no padding), outputs at its assistant-token positions."""
    modules, outputs, hooks = dict(model.named_modules()), {n: [] for n in names}, []
    for n in names:
        hooks.append(modules[n].register_forward_hook(lambda m, a, o, n=n: outputs[n].append(o[0])))
    positions = []
    with torch.no_grad():
        for ex in tokenize_rows(tokenizer, rows, max_length):
            model(input_ids=torch.tensor([ex["input_ids"]]))
            positions.append(torch.tensor(ex["labels"]) != -100)
    for h in hooks:
        h.remove()
    return {n: torch.cat([o[p] for o, p in zip(outputs[n], positions)]).T for n in names}


def test_output_grams_against_stacked_activations(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    rows = load_rows(write_safety(tmp_path / "s.jsonl"))
    names = [n for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
    direct = direct_activations(model, tokenizer, rows, names)
    linears = {n: m for n, m in model.named_modules() if n in names}
    for budget in (1 << 30, 1):  # every module in one pass; one module per pass
        grams, tokens = output_grams(model, tokenizer, rows, linears, 64, 3, lambda n, g: g, budget_bytes=budget)
        assert tokens == direct[names[0]].shape[1]
        for n in names:
            torch.testing.assert_close(grams[n], direct[n] @ direct[n].T, atol=1e-4, rtol=1e-4)


def salora_cfg(tmp_path, model_dir, safety, **extra):
    return load_config(None, cfg_values(tmp_path, model_dir, safety, **extra))


def cfg_values(tmp_path, model_dir, safety, **extra):
    values = {"model": str(model_dir), "data": str(ASSETS / "chat.jsonl"), "method": "salora", "rank": 4,
              "alpha": 8, "target_modules": TARGETS, "salora_safety_data": str(safety), "salora_safety_rank": 4,
              "salora_task_rank": 8, "max_length": 64, "batch_size": 4, "reg_weight": 0,
              "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "logging_steps": 1,
              "save_steps": 100, "disable_tqdm": True, "precision": "fp32"}  # fmt: skip
    # precision fp32: the tests compare with fp32 computations on the CPU, also where a GPU would make auto bf16
    values.update(extra)
    return values


def test_apply_leaves_the_aligned_model_unchanged_at_initialisation(tokenizer, tmp_path, model_dir):
    safety = write_safety(tmp_path / "s.jsonl")
    cfg = salora_cfg(tmp_path, model_dir, safety)
    aligned = tiny_llama(len(tokenizer))
    model = attach_method(tiny_llama(len(tokenizer)), "salora", 4, 8, 0.05, TARGETS)
    assert model.peft_config["default"].lora_dropout == 0.0
    data = load_rows(ASSETS / "chat.jsonl")
    model, report = salora.apply(cfg, model, tokenizer, data, progress=False)
    assert report["modules"] == 6 and report["safety_samples"] == 10 and report["task_samples"] == 8
    ids = torch.tensor([tokenize_rows(tokenizer, data, 64)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, aligned(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    # the factors and the residual are the direct formula's, from the direct subspaces
    names = [n for n, _ in aligned.named_modules() if n.endswith(tuple(TARGETS))]
    y_safe = direct_activations(aligned, tokenizer, load_rows(safety), names)
    y_task = direct_activations(aligned, tokenizer, data, names)
    modules = dict(aligned.named_modules())
    for name, layer in salora.lora_layers(model).items():
        plain = name.removeprefix("base_model.model.")
        u_safe = torch.linalg.svd(y_safe[plain], full_matrices=False)[0][:, :4]
        u_task = torch.linalg.svd(y_task[plain], full_matrices=False)[0][:, :8]
        v_safe = layer.lora_B["default"].salora_v
        torch.testing.assert_close(v_safe @ v_safe.T, u_safe @ u_safe.T, atol=1e-4, rtol=0)
        w = modules[plain].weight
        b0, a0 = init_factors(w, u_task, 4, 2.0)
        torch.testing.assert_close(layer.lora_B["default"].weight, b0, atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.lora_A["default"].weight, a0, atol=1e-4, rtol=0)
        c = torch.eye(w.shape[0]) - u_safe @ u_safe.T
        torch.testing.assert_close(layer.get_base_layer().weight, w - 2.0 * c @ b0 @ a0, atol=1e-4, rtol=0)


def safety_component(weights, key_a, v_safe, scaling):
    """(||V_s^T dW||_F / ||dW||_F) for the update dW = scaling * B A of one module."""
    delta = scaling * weights[key_a.replace("lora_A", "lora_B")].float() @ weights[key_a].float()
    return float(torch.linalg.norm(v_safe.T @ delta) / torch.linalg.norm(delta))


def test_training_keeps_the_update_out_of_the_safety_subspace(tokenizer, tmp_path, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from logitguard.train import train

    safety = write_safety(tmp_path / "s.jsonl")
    result = train(salora_cfg(tmp_path, model_dir, safety, epochs=4, learning_rate=1e-2), progress=False)
    out, trained = tmp_path / "out", result["trainer"].model.cpu()  # beside the saved file's tensors
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]  # the run trains
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")  # rank 2r, same scaling
    saved = load_file(out / "adapter_model.safetensors")
    report = json.loads((out / "salora.json").read_text())
    assert report == json.loads(json.dumps(result["salora"])) and report["saved_rank"] == 8
    for name, layer in salora.lora_layers(trained).items():
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        c = projection(lora_b.salora_v)
        b, a = lora_b.weight.detach(), lora_a.weight.detach()
        torch.testing.assert_close(saved[f"{name}.lora_B.weight"][:, :4], c @ b, atol=1e-6, rtol=1e-5)  # B <- C B
        torch.testing.assert_close(saved[f"{name}.lora_B.weight"][:, 4:], -c @ lora_b.salora_b0, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(saved[f"{name}.lora_A.weight"], torch.cat([a, lora_a.salora_a0]))
        assert not torch.allclose(b, lora_b.salora_b0)  # B moved in training
    # the saved adapter is plain LoRA on the aligned model and reproduces the trained model
    ids = torch.tensor([tokenize_rows(tokenizer, load_rows(ASSETS / "chat.jsonl"), 64)[1]["input_ids"]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    # V_s from the aligned model directly; the update has no component there, plain LoRA's has
    aligned = AutoModelForCausalLM.from_pretrained(model_dir)
    names = [n for n, _ in aligned.named_modules() if n.endswith(tuple(TARGETS))]
    y_safe = direct_activations(aligned, tokenizer, load_rows(safety), names)
    v_safe = {n: torch.linalg.svd(y_safe[n], full_matrices=False)[0][:, :4] for n in names}
    plain_values = cfg_values(tmp_path, model_dir, safety, method="lora", salora_safety_data=None, dropout=0.0,
                              epochs=4, learning_rate=1e-2, output_dir=str(tmp_path / "plain"))  # fmt: skip
    plain = train(load_config(None, plain_values), progress=False)
    plain_saved = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert plain["global_step"] == result["global_step"]
    for n in names:
        key = f"base_model.model.{n}.lora_A.weight"
        assert safety_component(saved, key, v_safe[n], 2.0) < 1e-4
        assert safety_component(plain_saved, key, v_safe[n], 2.0) > 0.05


def test_flags_cache_reference_and_config_errors(tmp_path, model_dir, capsys):
    safety = write_safety(tmp_path / "s.jsonl")
    argv = ["train", "--model", str(model_dir), "--data", str(ASSETS / "chat.jsonl"), "--output-dir",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--method", "salora",
            "--rank", "2", "--target-modules", "q_proj,v_proj", "--salora-safety-data", str(safety),
            "--salora-safety-rank", "4", "--salora-safety-samples", "6", "--reg-weight", "1",
            "--trainer", '{"disable_tqdm": true}']  # fmt: skip
    assert main(argv) == 0  # STR on top of SaLoRA, with the cached reference
    result = json.loads(next(x for x in capsys.readouterr().out.splitlines() if x.startswith('{"output_dir"')))
    assert result["salora"]["safety_samples"] == 6 and result["salora"]["modules"] == 4
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4
    base = {"model": "m", "data": "d.jsonl"}
    with pytest.raises(ConfigError, match="salora_safety_data"):
        load_config(None, {**base, "method": "salora"})
    with pytest.raises(ConfigError, match="use reference cache"):
        load_config(None, {**base, "method": "salora", "salora_safety_data": "s.jsonl", "reference": "online"})
    with pytest.raises(ConfigError, match="only used by method salora"):
        load_config(None, {**base, "salora_safety_data": "s.jsonl"})
    with pytest.raises(ConfigError, match="salora_safety_rank"):
        load_config(None, {**base, "method": "salora", "salora_safety_data": "s.jsonl", "salora_safety_rank": 0})
    argv[argv.index("--salora-safety-rank") + 1] = "16"  # the tiny model's q_proj has 16 outputs
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "out2")
    assert main(argv) == 2
    assert "would remove every direction" in capsys.readouterr().err


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, model_dir):
    """Checkpoints hold the training-time factors; a resumed run recomputes the same residual base and projection,
    and its folded adapter equals the uninterrupted run's."""
    import shutil

    from logitguard.train import train

    safety = write_safety(tmp_path / "s.jsonl")
    cfg = salora_cfg(tmp_path, model_dir, safety, epochs=2, save_steps=1)
    whole = train(cfg, progress=False)
    out = tmp_path / "out"
    first = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 3
    (out / "adapter_model.safetensors").unlink()
    resumed = train(cfg, progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == whole["global_step"] == 4
    again = load_file(out / "adapter_model.safetensors")
    assert again.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], atol=1e-6, rtol=1e-5)
