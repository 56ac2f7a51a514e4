"""Your own data pipeline and a transformers Trainer, with STR and the cached reference.

A user who tokenizes data their own way and brings their own collator swaps `Trainer` for `SafetyTrainer` and
builds the reference cache from the same tokenized examples; batches are matched to cached rows by their token
ids (`KeyedReference`), so no `example_idx` column is needed. Offline and tiny; runs on a CPU in seconds.

    python examples/own_trainer.py
"""

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from logitguard import CachedReference, KeyedReference, SafetyTrainer, build_reference_cache

VOCAB = 64
SAFETY_IDS = [5, 9]  # with a real tokenizer: logitguard.SafetyTokens.from_words(tokenizer, "I,cannot").ids


def my_examples(n: int = 12, seed: int = 0) -> list[dict]:
    """Your own tokenization: here random ids, labels on the second half of each sequence."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (8 + i % 5,), generator=g).tolist()
        half = len(ids) // 2
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * half + ids[half:]})
    return out


def my_collator(rows: list[dict]) -> dict:
    """Your own collator: right padding, attention mask, -100 labels on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    return {
        "input_ids": torch.tensor([r["input_ids"] + [0] * p for r, p in zip(rows, pad)]),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)]),
        "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad)]),
    }


class NoTokenizer:
    """build_reference_cache fingerprints a tokenizer; this script has none (ids are made directly)."""

    pad_token_id = 0
    chat_template = "none"
    all_special_tokens: list[str] = []

    def get_vocab(self):
        return {}


def main():
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, pad_token_id=0, **shape))
    examples = my_examples()
    with tempfile.TemporaryDirectory() as out:
        # 1. the reference cache, from the aligned model before the adapter, on your tokenized examples
        folder = build_reference_cache(model, NoTokenizer(), examples, SAFETY_IDS, f"{out}/cache", max_length=64)
        reference = KeyedReference(CachedReference(folder, SAFETY_IDS), examples)
        # 2. your usual PEFT model and Trainer, with SafetyTrainer and three extra arguments
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
        trainer = SafetyTrainer(
            model=model, args=args, train_dataset=examples, data_collator=my_collator,
            safety_ids=SAFETY_IDS, reference=reference, reg_weight=0.3,
        )  # fmt: skip
        trainer.train()
        last = [row for row in trainer.state.log_history if "reg" in row][-1]
        print(f"ce={last['ce']:.4f} reg={last['reg']:.6f}")


if __name__ == "__main__":
    main()
