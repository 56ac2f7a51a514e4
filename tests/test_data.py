import pytest
from helpers import ASSETS

from logitguard.data import DataError, load_rows, to_messages, tokenize_conversation, tokenize_rows


def labelled_text(tokenizer, feats):
    return tokenizer.decode([t for t, lab in zip(feats["input_ids"], feats["labels"]) if lab != -100])


def test_labels_only_on_assistant_turns(tokenizer):
    rows = load_rows(ASSETS / "chat.jsonl")
    feats = tokenize_conversation(tokenizer, to_messages(rows[6]))  # two assistant turns
    text = labelled_text(tokenizer, feats)
    assert "A synonym for happy is glad." in text and "A synonym for sad is unhappy." in text
    assert "synonym for happy." not in text and "And for sad?" not in text
    assert text.count("</s>") == 2  # the end-of-turn token is learned, so generation stops


def test_alpaca_and_prompt_completion_rows(tokenizer):
    rows = load_rows(ASSETS / "alpaca.json")
    messages = to_messages(rows[1])
    assert messages[0]["content"] == "Add the numbers.\n\n2 and 3" and messages[1]["content"] == "2 plus 3 is 5."
    pc = to_messages({"prompt": "Hi", "completion": "Hello."})
    assert labelled_text(tokenizer, tokenize_conversation(tokenizer, pc)).startswith("Hello.")


def test_fallback_template_when_tokenizer_has_none(tokenizer):
    tokenizer.chat_template = None
    with pytest.warns(UserWarning, match="fallback"):
        feats = tokenize_conversation(
            tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        )
    assert labelled_text(tokenizer, feats).startswith("Hello.")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n\n{"messages": [oops]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        load_rows(path)


def test_bad_rows_name_where_and_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"text": "x"}\n')
    rows = load_rows(path)
    with pytest.raises(DataError, match="rows.jsonl:1: no assistant message"):
        to_messages(rows[0])
    with pytest.raises(DataError, match=r"rows.jsonl:2: unknown row schema with keys \['text'\]"):
        to_messages(rows[1])
    with pytest.raises(DataError, match="messages\\[0\\]"):
        to_messages({"messages": [{"role": "bot", "content": "x"}], "_where": "f:9"})


def test_missing_file_and_truncation(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "none.jsonl")
    rows = load_rows(ASSETS / "chat.jsonl")
    with pytest.warns(UserWarning, match="dropped"):
        examples = tokenize_rows(tokenizer, rows, max_length=20)
    assert all(len(e["input_ids"]) <= 20 for e in examples)
    assert [e["example_idx"] for e in examples] == list(range(len(examples)))


def test_column_mapping_for_parquet_and_jsonl(tmp_path):
    import datasets

    from logitguard.data import apply_columns

    datasets.Dataset.from_list(
        [{"question": "Name a color.", "answer": "Blue.", "id": 1}, {"question": "Say hi.", "answer": "Hi!", "id": 2}]
    ).to_parquet(str(tmp_path / "qa.parquet"))
    rows = apply_columns(load_rows(tmp_path / "qa.parquet"), {"prompt": "question", "completion": "answer"})
    assert to_messages(rows[1]) == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert rows[0]["id"] == 1  # unmapped columns kept
    with pytest.raises(DataError, match=r"qa.parquet row 0: no column 'reply' \(mapped to 'completion'\)"):
        apply_columns(load_rows(tmp_path / "qa.parquet"), {"prompt": "question", "completion": "reply"})


def test_commonsense_training_rows_are_alpaca_rows():
    """LLM-Adapters rows carry an extra `answer` field; training uses instruction -> output."""
    row = {"instruction": "Is ice cold?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is "
           "true", "answer": "true"}  # fmt: skip
    assert to_messages(row)[1] == {"role": "assistant", "content": "the correct answer is true"}


def test_split_holdout_is_seeded_and_disjoint():
    from logitguard.data import split_holdout

    rows = [{"i": i} for i in range(50)]
    train, held = split_holdout(rows, 10, seed=0)
    assert len(train) == 40 and len(held) == 10
    assert {r["i"] for r in train}.isdisjoint(r["i"] for r in held)
    assert held == split_holdout(rows, 10, seed=0)[1]
    assert held != split_holdout(rows, 10, seed=1)[1]
    assert split_holdout(rows, 0) == (rows, [])
    with pytest.raises(DataError, match="leaves nothing to train on"):
        split_holdout(rows, 50)


def test_sharegpt_conversations_are_read_whole_from_a_file_cut_mid_way():
    import json

    from logitguard.data import read_sharegpt, to_messages

    convs = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."}],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "?"}]},  # skipped
        {
            "id": "c",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
            ],
        },  # fmt: skip
        # the second piece of a split conversation: an answer with no request before it, skipped
        {
            "id": "e",
            "conversations": [
                {"from": "gpt", "value": "More."},
                {"from": "human", "value": "Thanks."},
                {"from": "gpt", "value": "Welcome."},
            ],
        },  # fmt: skip
        {"id": "d", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]},
    ]
    text = json.dumps(convs, indent=2)
    cut = text[: text.index('"d"') + 40]  # the last conversation arrives only in part
    rows, skipped = read_sharegpt(cut)
    assert [r["messages"][-1]["content"] for r in rows] == ["Apple.", "4"] and skipped == 2
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert read_sharegpt(text, limit=1)[0] == rows[:1]
    assert len(read_sharegpt(text)[0]) == 3  # the whole file: every clean conversation
    assert to_messages(convs[0])[1] == {"role": "assistant", "content": "Apple."}  # ShareGPT rows load directly
    with pytest.raises(DataError, match="row: an assistant message comes before any user message"):
        to_messages(convs[3])
