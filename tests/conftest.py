"""Shared fixtures: a tiny byte-level BPE tokenizer with a chat template and tiny random Llama models.

Everything is built offline in a second; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run faster on one thread, and the test machines have two cores shared with other work.
torch.set_num_threads(1)

# In-process tests train on one GPU at most. With two visible, a plain process's TrainingArguments count n_gpu 2,
# which logitguard refuses (DataParallel: it says to use accelerate launch). device_count asks NVML, which does not
# initialize CUDA, so the narrowed setting still applies to this process; the tests that start several processes
# run them on the CPU (gloo).
if torch.cuda.device_count() > 1:
    os.environ["CUDA_VISIBLE_DEVICES"] = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]

ASSETS = Path(__file__).parent / "assets"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CORPUS = [
    "I cannot help with that. I can't assist with that request. I'm sorry, but I cannot do it.",
    "Sure, here is how to do it. The sky is blue. An apple is a fruit. Two plus two is four.",
    "Cannot? Can't! You can do it. What color is the sky? How do I kill a Python process?",
    "<|user|> <|assistant|> <|system|> synonym happy glad sad unhappy hello there name a color",
]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/logitguard: a reused cache would hide a build's effects."""
    import os

    os.environ["LOGITGUARD_CACHE"] = str(tmp_path_factory.mktemp("logitguard-cache"))


@pytest.fixture(autouse=True)
def _sandbox_where_namespaces_are_missing(monkeypatch):
    """A machine without user namespaces (many containers) has no mount namespace, and the sandbox's "auto" refuses
    to run model-written programs there unless the user names a weaker isolation: the tests name the guard, as such
    a user would. Where the guard cannot protect itself (Python 3.12+, os.access unable to look at links) it is
    refused for model output (guard_problem); the tests' programs are their own, so the hook's checks still run
    there. Both refusals are tested in test_sandbox."""
    from logitguard.eval import sandbox

    if not sandbox.mount_isolation():
        monkeypatch.setenv(sandbox.OPT_IN, "guard")
    monkeypatch.setattr(sandbox, "guard_problem", lambda version=None: "")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A saved tiny model folder with its tokenizer, as a user's local model path would be."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("model")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def quick_toy(tmp_path_factory) -> Path:
    """The quick toy aligned chat model (built once per test session, ~10 s)."""
    from logitguard.toy import build_aligned_model

    return build_aligned_model(tmp_path_factory.mktemp("toy"), seed=0, progress=False, quick=True)
