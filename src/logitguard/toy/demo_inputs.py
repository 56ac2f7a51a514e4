"""The demo's files mined from the toy aligned model (`{toy_demo}` in an experiment file), made once beside it.

    mined_tokens.json     the toy's 5 refusal tokens by log-odds (`logitguard tokens mine`), from 60 harmful and
                          60 benign training prompts (the held-out ones stay unseen)
    pact_tokens.json      PACT's 50 tokens and weights by its authors' rule, from the aligned toy and its base
    anchor_prompts.jsonl  the first 64 harmful training prompts with the toy's refusals: the anchors of anchored
                          regularization, the refusals safety mixing adds, SaLoRA's safety data

They follow from the toy's weights and corpus and from how they are mined, so they live in the toy's folder (named
by its recipe's hash) under `demo-<hash of the mining settings and VERSION>`: a change to either makes a new folder
(and new row keys) instead of reusing stale files. Bump VERSION when the mining code changes what it picks. The
folder is written aside and renamed into place, so a half-written one is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = 1
MINED_TOP = 5
PACT_TOP = 50  # PACT's default set size
MINING_PROMPTS = 60
ANCHORS = 64


def folder_name() -> str:
    """The folder's name inside the toy's: known without building anything (the runner keys rows on it)."""
    settings = {"version": VERSION, "mined_top": MINED_TOP, "pact_top": PACT_TOP, "prompts": MINING_PROMPTS,
                "anchors": ANCHORS}  # fmt: skip
    return "demo-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def demo_inputs(toy: str | Path, progress: bool = True) -> Path:
    """The folder of the demo's files for this toy model, made if it is not there yet."""
    folder = Path(toy) / folder_name()
    if folder.is_dir():
        return folder
    from ..eval.prompts import read_prompts
    from ..mining import mine_pact_tokens, mine_tokens
    from ..models import load_model, load_tokenizer
    from .model import BASE_FOLDER

    corpus = Path(toy) / "corpus"
    harmful = read_prompts(corpus / "harmful_train.jsonl")[:MINING_PROMPTS]
    benign = read_prompts(corpus / "benign_train.jsonl")[:MINING_PROMPTS]
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=toy))  # one per process: two demos may race
    try:
        tokenizer, model = load_tokenizer(str(toy)), load_model(str(toy), "float32")
        tokens, _ = mine_tokens(model, tokenizer, harmful, benign, top=MINED_TOP, progress=progress)
        tokens.save(tmp / "mined_tokens.json")
        base = load_model(str(Path(toy) / BASE_FOLDER), "float32")
        pact, _ = mine_pact_tokens(model, tokenizer, harmful, base_model=base, top=PACT_TOP, progress=progress)
        pact.save(tmp / "pact_tokens.json")
        lines = (corpus / "harmful_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:ANCHORS]
        (tmp / "anchor_prompts.jsonl").write_text("".join(lines), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a shared cache's folder from its other users
        try:
            tmp.rename(folder)
        except OSError:  # another process put its (identical) folder there first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
