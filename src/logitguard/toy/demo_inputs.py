"""The demo's files mined from the toy aligned model (`{toy_demo}` in an experiment file), made once beside it.

    mined_tokens.json     the toy's 5 refusal tokens by log-odds (`logitguard tokens mine`), from 60 harmful and
                          60 benign training prompts (the held-out ones stay unseen)
    pact_tokens.json      PACT's 50 tokens and weights by its authors' rule, from the aligned toy and its base
    anchor_prompts.jsonl  the first 64 harmful training prompts with the toy's refusals: the anchors of anchored
                          regularization, the refusals safety mixing adds, SaLoRA's safety data

They follow from the toy's weights and corpus, so they live in the toy's folder (named by its recipe's hash) and
are made the first time a run needs them; a half-written folder is never left (written aside, then renamed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

FOLDER = "demo"
MINED_TOP = 5
PACT_TOP = 50  # PACT's default set size
MINING_PROMPTS = 60
ANCHORS = 64


def demo_inputs(toy: str | Path, progress: bool = True) -> Path:
    """The folder of the demo's files for this toy model, made if it is not there yet."""
    folder = Path(toy) / FOLDER
    if folder.is_dir():
        return folder
    from ..eval.prompts import read_prompts
    from ..mining import mine_pact_tokens, mine_tokens
    from ..models import load_model, load_tokenizer
    from .model import BASE_FOLDER

    corpus = Path(toy) / "corpus"
    harmful = read_prompts(corpus / "harmful_train.jsonl")[:MINING_PROMPTS]
    benign = read_prompts(corpus / "benign_train.jsonl")[:MINING_PROMPTS]
    tmp = folder.with_name(FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer, model = load_tokenizer(str(toy)), load_model(str(toy), "float32")
    tokens, _ = mine_tokens(model, tokenizer, harmful, benign, top=MINED_TOP, progress=progress)
    tokens.save(tmp / "mined_tokens.json")
    base = load_model(str(Path(toy) / BASE_FOLDER), "float32")
    pact, _ = mine_pact_tokens(model, tokenizer, harmful, base_model=base, top=PACT_TOP, progress=progress)
    pact.save(tmp / "pact_tokens.json")
    lines = (corpus / "harmful_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:ANCHORS]
    (tmp / "anchor_prompts.jsonl").write_text("".join(lines), encoding="utf-8")
    tmp.rename(folder)
    return folder
