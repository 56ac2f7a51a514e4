"""An evaluation killed mid-way (the session ends, the machine is taken back) starts again at its first unfinished
stage: pipeline.measure keeps each finished stage's part in `<folder>/stages/<stage>.json` under one key, reads it
back when the same evaluation runs again, and removes the folder once every stage is done.

The key covers what a stage's result depends on: the files that loading the model and the adapter reads (their
contents, not where they are), the dtype they were loaded in, the settings, every input read, and the code that
measures (logitguard's sources, torch and transformers). A stage under another key, or a damaged file, is measured
again. Two evaluations are not resumed: a judged one (the judge reads whole responses, and the kept safety records
are cut to ten words, as records.jsonl is) and one whose generation a server did (its model is not known here);
their callers pass no key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
import shutil
from pathlib import Path

from ..files import ContentHashes, write_json_atomic

# the files of a model or adapter folder that loading reads: weights, configs, tokenizer, chat template, model code.
# A run's folder holds more (metrics.jsonl, lambda_controller.json, checkpoints, eval/), rewritten when the runner
# calls train() again on a finished run: they are not the model.
LOADED = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_model.bin", "config.json",
          "adapter_config.json", "generation_config.json", "tokenizer*", "vocab*", "merges.txt", "*.tiktoken",
          "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.py")  # fmt: skip
# the spec's fields that name files: their contents are in the key (the inputs read), not the paths
PATH_FIELDS = ("harmful", "benign", "borderline", "loss_data", "exact_match", "commonsense", "judge", "engine")


class StageStore:
    """One evaluation's finished stages, each in `folder`/stages/<stage>.json with the key it was measured under."""

    def __init__(self, folder: str | Path, key: str):
        self.dir, self.key = Path(folder) / "stages", key

    def _path(self, stage: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9._-]", "_", stage) + ".json")

    def load(self, stage: str) -> dict | None:
        """The stage's part, if it was measured under this key; None when not, or when its file is damaged."""
        try:
            saved = json.loads(self._path(stage).read_text())
        except (OSError, ValueError):
            return None
        return saved.get("part") if isinstance(saved, dict) and saved.get("key") == self.key else None

    def save(self, stage: str, part: dict) -> None:
        """Kept as records.jsonl keeps them: harmful responses cut to ten words."""
        from .safety import redact_records

        kept = {**part, "records": redact_records(part["records"])} if "records" in part else part
        write_json_atomic(self._path(stage), {"key": self.key, "part": kept})

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def evaluation_key(
    model_path: str | None, adapter: str | None, model, spec, inputs, hashes: ContentHashes | None = None
) -> str | None:
    """The key an evaluation's stages are kept under (module docstring); None when generation goes to a server.
    `hashes`: remembers file hashes across runs (a 16 GB model is hashed once per change, not once per run); its
    store is saved here, before the evaluation a kill could interrupt."""
    import torch
    import transformers

    from .endpoint import engine_for
    from .generate import loaded_dtype

    if engine_for(None) is not None:
        return None
    hashes = hashes or ContentHashes()
    content = {
        "model": _loaded_files(model_path, hashes),
        "adapter": _loaded_files(adapter, hashes),
        "dtype": loaded_dtype(model) if model is not None else None,
        "commonsense": hashes(spec.commonsense) if spec.commonsense else None,  # read by its stage, not read_inputs
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k not in PATH_FIELDS},
        "inputs": dataclasses.asdict(inputs),
        "code": _source_hash(),
        "versions": [torch.__version__, transformers.__version__],
    }
    hashes.save()
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _loaded_files(path: str | None, hashes: ContentHashes):
    """{file name: content hash} of what loading reads from a local folder; a hub name as it is."""
    if path is None or not Path(path).expanduser().is_dir():
        return path
    return {
        p.name: hashes(p)
        for p in sorted(Path(path).expanduser().iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in LOADED)
    }


def _source_hash() -> str:
    """sha256 over logitguard's own sources: an evaluation resumed after the code changed is measured again."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
