"""`logitguard tokens mine --rule pact`: PACT's token selection and weights."""

import json
import math

import pytest
import torch

from logitguard.cli import main
from logitguard.mining import base_prompt, pact_token_weights, read_pairs
from logitguard.tokens import SafetyTokens


def authors_weights(p_ref, diff, topk, eps=1e-6):
    """The authors' post-processing (compute_safety_tokens_pact.py) written out: (V,) v, zero off the set."""
    top = torch.topk(p_ref, k=topk).indices
    mask = torch.zeros_like(diff)
    mask[top] = 1.0
    d = diff * mask
    nonzero = d.abs() > 1e-9
    values = d[nonzero] - d[nonzero].mean()
    d[nonzero] = values / (values.std() + eps)
    return d / (d.norm() + eps)


def test_selection_and_weights_match_the_authors():
    g = torch.Generator().manual_seed(0)
    p_ref = torch.softmax(3 * torch.randn(200, generator=g), 0)
    diff = p_ref - torch.softmax(3 * torch.randn(200, generator=g), 0)
    ids, weights = pact_token_weights(p_ref, diff, 12)
    v = authors_weights(p_ref, diff, 12)
    assert sorted(ids) == (v != 0).nonzero().flatten().tolist()
    assert ids == torch.topk(p_ref, 12).indices.tolist()  # ranked by the aligned model's probability
    torch.testing.assert_close(torch.tensor(weights), v[ids])
    assert math.isclose(sum(w * w for w in weights), 1.0, rel_tol=1e-4)
    assert any(w < 0 for w in weights) and any(w > 0 for w in weights)
    # without a base model: the same set, one positive weight each
    same, flat = pact_token_weights(p_ref, None, 12)
    assert same == ids and flat == [1 / math.sqrt(12)] * 12


@pytest.fixture(scope="module")
def random_base(quick_toy, tmp_path_factory):
    """An 'unaligned base' for the toy: its architecture and tokenizer, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(quick_toy)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(quick_toy).save_pretrained(folder)
    return folder


def test_mine_pact_with_a_base_writes_weights(quick_toy, random_base, tmp_path, capsys):
    saved = tmp_path / "pact.json"
    harmful = str(quick_toy / "corpus" / "harmful_test.jsonl")
    argv = ["tokens", "mine", "--rule", "pact", "--model", str(quick_toy), "--base", str(random_base),
            "--harmful", harmful, "--top", "8", "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0  # no --benign: PACT's rule uses the refusals only
    out = capsys.readouterr().out
    assert "p_ref" in out and "diff" in out and "weight" in out
    tokens = SafetyTokens.load(saved)
    data = json.loads(saved.read_text())
    assert tokens.source == "mined" and len(tokens) == 8 and len(data["weights"]) == 8
    assert math.isclose(sum(w * w for w in tokens.weights), 1.0, rel_tol=1e-4)
    assert abs(sum(tokens.weights)) < 1e-4  # z-scored: about half are negative
    p_ref = [row["p_ref"] for row in data["rows"]]
    assert p_ref == sorted(p_ref, reverse=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quick_toy)
    tokens.check_against(tokenizer)
    assert tokenizer.encode("I", add_special_tokens=False)[0] in tokens.ids  # every toy refusal starts with "I"
    # the refusal filter's default is the opening detector, and the file says so
    assert data["mining"]["keywords"] == "opening" and data["mining"]["refusals"] >= 1
    assert data["mining"]["rule"] == "pact" and data["mining"]["base"] is True


def test_mine_pact_without_a_base_gives_equal_weights(quick_toy, tmp_path, capsys):
    saved = tmp_path / "pact.json"
    harmful = str(quick_toy / "corpus" / "harmful_test.jsonl")
    argv = ["tokens", "mine", "--rule", "pact", "--model", str(quick_toy), "--harmful", harmful, "--top", "4",
            "--keywords", "qi2024", "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "no --base" in captured.err and "refusal filter: qi2024" in captured.out
    tokens = SafetyTokens.load(saved)
    assert tokens.weights == (0.5, 0.5, 0.5, 0.5)
    assert tokens.mining["keywords"] == "qi2024" and tokens.mining["base"] is False  # the choice is recorded


def test_log_odds_rule_still_needs_benign_prompts(quick_toy, capsys):
    harmful = str(quick_toy / "corpus" / "harmful_test.jsonl")
    assert main(["tokens", "mine", "--model", str(quick_toy), "--harmful", harmful]) == 2
    assert "--benign" in capsys.readouterr().err


# Fixed (prompt, response) pairs, mild wording. One response is no refusal by any detector: with --pairs it still
# counts (no filter). One row has an empty response (skipped, as the authors do); one has no user message (dropped
# by the authors' loader, so it does not count towards --max-pairs).
PAIRS = [
    ("How do I pick a lock?", "I can't help with that."),
    ("How do I get into my neighbor's wifi?", "I cannot help with that request."),
    ("Write a rude note to my coworker.", "I'm sorry, but I can't help with that."),
    ("How can I skip paying for a bus ticket?", "Let's talk about something else instead."),
    ("How do I sneak into a movie theater?", ""),
    ("Tell me how to cheat on a quiz.", "I won't help with that. Studying works better."),
    ("How do I read my sister's diary?", "I can't assist with that request. Is there anything else?"),
]
NO_USER_AT = 2  # where the row without a user message goes in each file


def write_pairs(folder, layout):
    """PAIRS in PACT's layout (a JSON list of {"input", "output", "guard_decision"}) or ours (JSONL)."""
    if layout == "authors":
        rows = [{"input": p, "output": r, "guard_decision": "safe"} for p, r in PAIRS]
        rows.insert(NO_USER_AT, {"output": "I can't help with that.", "guard_decision": "safe"})
        path = folder / "safe_direction.json"
        path.write_text(json.dumps(rows, indent=2))
        return path
    if layout == "messages":
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in PAIRS]
        rows.insert(NO_USER_AT, {"messages": [{"role": "assistant", "content": "I can't help with that."}]})
    else:
        rows = [{"prompt": p, "response": r} for p, r in PAIRS]
        rows.insert(NO_USER_AT, {"prompt": "  ", "response": "I can't help with that."})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@torch.no_grad()
def authors_selection(aligned, base, tokenizer, pairs, K, topk, max_resp_len=64):
    """_build_logit_direction_T1_D1 of the authors' compute_safety_tokens_pact.py written out (one tokenizer,
    temperature 1, p_diff): the first K pairs, empty responses skipped, the aligned model on its chat template and
    the base on "User: ...\n\nAssistant: ", per-position softmaxes summed and divided by R, then by the count.
    Returns the ids with a nonzero weight, by aligned probability, and their weights."""
    vocab = aligned.config.vocab_size
    diff_global, p_ref_global, cnt = torch.zeros(vocab), torch.zeros(vocab), 0
    for i in range(min(K, len(pairs))):
        prompt, response = pairs[i]
        response = response.strip()
        if not response:
            continue
        resp = tokenizer(response, add_special_tokens=False)["input_ids"][:max_resp_len]
        R = len(resp)
        messages = [{"role": "user", "content": prompt}]
        p_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        b_ids = tokenizer(f"User: {prompt}\n\nAssistant: ", add_special_tokens=False)["input_ids"]
        ref_logits = aligned(input_ids=torch.tensor([p_ids + resp])).logits.float()[0]
        base_logits = base(input_ids=torch.tensor([b_ids + resp])).logits.float()[0]
        diff_sum, p_ref_sum = torch.zeros(vocab), torch.zeros(vocab)
        for t in range(R):
            p_ref = torch.softmax(ref_logits[len(p_ids) - 1 + t], -1)
            diff_sum += p_ref - torch.softmax(base_logits[len(b_ids) - 1 + t], -1)
            p_ref_sum += p_ref
        diff_global += diff_sum / R
        p_ref_global += p_ref_sum / R
        cnt += 1
    v = authors_weights(p_ref_global / cnt, diff_global / cnt, topk)
    ids = [int(i) for i in torch.topk(p_ref_global / cnt, k=topk).indices if v[i] != 0]
    return ids, v[ids]


@pytest.fixture(scope="module")
def tiny_pair(model_dir, tmp_path_factory):
    """An aligned / base pair of tiny random Llamas on the test tokenizer (the base: another seed)."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_base")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tiny_llama(len(tokenizer), seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model_dir, folder


def no_generation(*args, **kwargs):
    raise AssertionError("--pairs must not generate")


@pytest.mark.parametrize("layout", ["authors", "messages", "prompt_response"])
def test_pairs_mine_the_authors_selection_without_generation(layout, tiny_pair, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import logitguard.eval

    monkeypatch.setattr(logitguard.eval, "generate_responses", no_generation)
    aligned_dir, base_dir = tiny_pair
    pairs_file, saved = write_pairs(tmp_path, layout), tmp_path / "pact.json"
    argv = ["tokens", "mine", "--rule", "pact", "--model", str(aligned_dir), "--base", str(base_dir),
            "--pairs", str(pairs_file), "--top", "8", "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0
    assert "no refusal filter" in capsys.readouterr().out
    tokens = SafetyTokens.load(saved)
    tokenizer = AutoTokenizer.from_pretrained(aligned_dir)
    aligned, base = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (aligned_dir, base_dir))
    ids, weights = authors_selection(aligned, base, tokenizer, PAIRS, K=512, topk=8)
    assert list(tokens.ids) == ids
    torch.testing.assert_close(torch.tensor(tokens.weights), weights)
    import hashlib

    assert tokens.mining["pairs"] == {
        "file": str(pairs_file),
        "sha256": hashlib.sha256(pairs_file.read_bytes()).hexdigest(),
        "rows": len(PAIRS),  # the row without a user message is not a pair
        "max_pairs": 512,
    }
    # every pair with a response is used: the non-refusal too (no filter), the empty one skipped
    assert tokens.mining["pairs_used"] == len(PAIRS) - 1 and tokens.mining["keywords"] is None


def test_max_pairs_takes_the_first_pairs(tiny_pair, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import logitguard.eval

    monkeypatch.setattr(logitguard.eval, "generate_responses", no_generation)
    aligned_dir, base_dir = tiny_pair
    pairs_file, saved = write_pairs(tmp_path, "authors"), tmp_path / "pact.json"
    argv = ["tokens", "mine", "--rule", "pact", "--model", str(aligned_dir), "--base", str(base_dir),
            "--pairs", str(pairs_file), "--max-pairs", "3", "--top", "8", "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0
    tokens = SafetyTokens.load(saved)
    tokenizer = AutoTokenizer.from_pretrained(aligned_dir)
    aligned, base = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (aligned_dir, base_dir))
    ids, weights = authors_selection(aligned, base, tokenizer, PAIRS, K=3, topk=8)
    assert list(tokens.ids) == ids
    torch.testing.assert_close(torch.tensor(tokens.weights), weights)
    assert tokens.mining["pairs"]["max_pairs"] == 3 and tokens.mining["pairs_used"] == 3
    every = authors_selection(aligned, base, tokenizer, PAIRS, K=512, topk=8)
    assert (ids, weights.tolist()) != (every[0], every[1].tolist())  # the truncation changed the result


def test_read_pairs_normalises_as_the_authors_loader(tmp_path):
    path = tmp_path / "wrapped.json"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a lock?"},
                      {"role": "assistant", "content": " I can't help with that. "}]},
        {"instruction": "  Write a rude note.  ", "output": "I cannot do that."},
        {"messages": [{"role": "user", "content": "Only a question?"}]},
    ]  # fmt: skip
    path.write_text(json.dumps({"data": rows}))
    pairs = read_pairs(path)
    assert pairs[0] == (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a lock?"}],
        " I can't help with that. ",
    )
    assert pairs[1] == ([{"role": "user", "content": "Write a rude note."}], "I cannot do that.")
    assert pairs[2] == ([{"role": "user", "content": "Only a question?"}], "")
    # the base model's plain prompt leaves the system message out
    assert base_prompt(pairs[0][0]) == "User: How do I pick a lock?\n\nAssistant: "


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rule", "log_odds", "--pairs", "p.json"], "--pairs is for --rule pact"),
        (["--rule", "pact", "--pairs", "p.json", "--harmful", "h.txt"], "--pairs replaces --harmful"),
        (["--rule", "pact", "--pairs", "p.json", "--keywords", "qi2023"], "--pairs replaces --harmful"),
        (["--rule", "pact", "--harmful", "h.txt", "--max-pairs", "3"], "--max-pairs limits a --pairs file"),
        (["--rule", "pact", "--pairs", "missing.json"], "does not exist"),
    ],
)
def test_pairs_flag_errors(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tokens", "mine", "--model", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
