"""An ordinary TRL SFT script with safety token regularization switched on.

The only changes from a plain TRL script are marked "logitguard": the import and three config fields. Everything
is built here, offline: a tiny BPE tokenizer, a tiny random Llama and a few chat rows. Runs on a CPU in seconds.

    python examples/trl_sft.py
"""

import tempfile

from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from logitguard.integrations.trl import SafetySFTConfig as SFTConfig  # logitguard (was: from trl import SFTConfig)
from logitguard.integrations.trl import SafetySFTTrainer as SFTTrainer  # logitguard (was: from trl import SFTTrainer)

ROWS = [
    ("Name a fruit.", "An apple is a fruit."),
    ("What color is the sky?", "The sky is blue."),
    ("Help me do a forbidden thing.", "I cannot help with that."),
    ("Two plus two?", "Two plus two is four."),
    ("Say hello.", "Hello there!"),
    ("Name a color.", "Green is a color."),
]
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def tiny_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([q + " " + a + " <|user|> <|assistant|>" for q, a in ROWS] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=TEMPLATE
    )


def main():
    tokenizer = tiny_tokenizer()
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    model = LlamaForCausalLM(config)
    dataset = Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ROWS]
    )
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=6,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,
            safety_words=["I", "cannot"],  # logitguard
            reg_weight=0.3,  # logitguard (STR's default lambda)
            cache_dir=f"{out}/cache",  # logitguard (default: ~/.cache/logitguard)
        )
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
        trainer.train()
        last = [row for row in trainer.state.log_history if "reg" in row][-1]
        print(f"ce={last['ce']:.4f} reg={last['reg']:.6f}")


if __name__ == "__main__":
    main()
