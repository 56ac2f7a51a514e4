"""GGUF models: converted once to a safetensors folder in the cache, exactly (weights, tokenizer, template),
reused on the second load, converted again when the file changes; and no remote code unless asked."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from logitguard.models import ModelLoadError, gguf_folder, load_model, load_tokenizer

# transformers' GGUF names for a Qwen2 model's tensors
_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(key: str) -> str:
    stem, kind = key.rsplit(".", 1)
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER[module]}.{kind}"


def write_tiny_gguf(path, tokenizer, seed: int = 0) -> dict:
    """A float32 GGUF of a tiny random Qwen2 model with the test tokenizer; returns its state dict."""
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    state = Qwen2ForCausalLM(config).state_dict()
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    for key, value in state.items():
        writer.add_tensor(_gguf_name(key), value.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def test_gguf_converts_once_exactly(tmp_path, tokenizer, monkeypatch):
    state = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer)
    folder = gguf_folder(tmp_path / "tiny.gguf", tmp_path / "cache", progress=False)
    model, tok = load_model(str(folder), "float32"), load_tokenizer(str(folder))
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)
    text = "I cannot help with that."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template

    from transformers import AutoModelForCausalLM

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert gguf_folder(tmp_path / "tiny.gguf", tmp_path / "cache", progress=False) == folder  # cached
    # the same bytes fetched again elsewhere (another clone: other path, other mtime) are the same model, so
    # the folder (each run's `model` setting, part of the runner's keys) stays the same
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "tiny.gguf", tmp_path / "elsewhere" / "tiny.gguf")
    stat = (tmp_path / "elsewhere" / "tiny.gguf").stat()
    os.utime(tmp_path / "elsewhere" / "tiny.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert gguf_folder(tmp_path / "elsewhere" / "tiny.gguf", tmp_path / "cache", progress=False) == folder
    monkeypatch.undo()

    write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer, seed=1)  # replaced file: a new conversion
    again = gguf_folder(tmp_path / "tiny.gguf", tmp_path / "cache", progress=False)
    assert again != folder
    assert not torch.equal(load_model(str(again), "float32").lm_head.weight, model.lm_head.weight)


def test_train_from_a_gguf_file(tmp_path, tokenizer):
    from helpers import ASSETS

    from logitguard.config import build_config
    from logitguard.train import train

    write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer)
    cfg = build_config(
        {"gguf_file": str(tmp_path / "tiny.gguf"), "data": str(ASSETS / "chat.jsonl"), "epochs": 1,
         "batch_size": 4, "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
         "target_modules": ["q_proj", "v_proj"], "trainer": {"save_strategy": "no"}, "dtype": "float32"}
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert result["global_step"] > 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "gguf_file" in saved and str(tmp_path / "cache" / "gguf") in saved  # the converted folder trained


def test_gguf_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf_folder(tmp_path / "missing.gguf", tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"not gguf")
    with pytest.raises(ModelLoadError, match="pass it as --gguf-file"):
        load_model(str(tmp_path / "model.gguf"))


def test_remote_code_is_refused_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}})
    )
    (tmp_path / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(tmp_path))
