"""`logitguard experiment migrate`: rewrite results files from before result_keys.py, whose settings hold the absolute
paths of the machine that ran them, into paths as the experiment file writes them plus each input's identity.

Every metric and every other field is kept; only paths change, and each row's `key` is recomputed. Run it once
where the rows were made (`--checkout`: the folder they were run from, `--cache-dir`: its logitguard cache), so
that their files are there to hash; a file that is not there is recorded as null (a clone's runner then runs the
rows that use it again, never skips them on a guess). A row already migrated is left alone.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from .experiment import PACKAGED, Experiment, load_experiment, packaged_name
from .files import ContentHashes, write_json_atomic
from .result_keys import holdout_identity, input_paths, result_key, run_identity, set_identity


def experiment_of(results: dict, experiments: Path) -> Experiment:
    """The experiment (its variant, a sweep's grid) a results file was written from."""
    name = results["experiment"]
    base = name.split("-sweep")[0]  # a sweep's file is named <experiment>-sweep[-<reference>]
    packaged = {packaged_name(p): p for p in PACKAGED.values()}  # the demo's: never a working folder's copy
    if results.get("config_file") in packaged:
        base = str(packaged[results["config_file"]])
    exp = load_experiment(base, results.get("variant"), experiments)
    if "sweep" in results:
        from .sweep import sweep_experiment

        s = results["sweep"]
        exp = sweep_experiment(exp, s["lambdas"], s["word_sets"], s["reference"])
    return exp


class Legacy:
    """Maps one results file's absolute paths back to the experiment file's forms, remembering where each was."""

    def __init__(self, exp: Experiment, exp_id: str, checkout: Path, cache_dir: Path, work: str, assets: Path):
        self.exp, self.work_id = exp, f"{work}/{exp_id}"
        self.here, self.assets, self.cache = checkout / "experiments", assets, cache_dir
        self.toy = re.compile(re.escape(str(cache_dir)) + r"/(toy-(full|quick)-[0-9a-f]{16})(/.*)?$")
        self.gguf = re.compile(re.escape(str(cache_dir)) + r"/gguf/(.+)-[0-9a-f]{16}/?$")
        self.converted: dict[str, str] = {}  # a GGUF file as written -> the folder it was converted to
        self.toy_folder: str | None = None  # the toy model these rows used (its name: recipe and corpus hash)

    def written(self, value: str) -> str:
        if "," in value:  # comma lists (harmful sets, eval-loss files)
            return ",".join(self.written(v) for v in value.split(","))
        form = self._form(value)
        if self.gguf.match(value):
            self.converted[form] = value
        return form

    def _form(self, value: str) -> str:
        from .runner import slug

        if m := self.toy.match(value):
            self.toy_folder = m.group(1)
            return f"{{toy}}{m.group(3)}" if m.group(3) else ("toy-quick" if m.group(2) == "quick" else "toy")
        if m := self.gguf.match(value):
            return self.exp.gguf_file if self.exp.gguf_file else f"{{assets}}/{m.group(1)}.gguf"
        for root, name in ((self.cache / "toy-commonsense", "{toy_commonsense}"), (self.assets, "{assets}"),
                           (self.here, "{here}")):  # fmt: skip
            if value == str(root) or value.startswith(f"{root}/"):
                return name + value[len(str(root)) :]
        if value == f"{self.work_id}/holdout.jsonl":
            return "{holdout}"
        for run in self.exp.runs:
            if value == f"{self.work_id}/{slug(run.name)}":
                return f"{{run:{run.name}}}"
        return value

    def local(self, written: str) -> Path:
        """Where a written path was on that machine."""
        for name, root in (("{toy_commonsense}", self.cache / "toy-commonsense"), ("{assets}", self.assets),
                           ("{here}", self.here)):  # fmt: skip
            written = written.replace(name, str(root))
        return Path(written)


def _walk(value, fix):
    if isinstance(value, dict):
        return {k: _walk(v, fix) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fix) for v in value]
    return fix(value) if isinstance(value, str) else value


def migrate_results(
    path: Path,
    experiments: Path,
    checkout: Path,
    cache_dir: Path,
    work: str = "runs/bench",
    assets: Path | None = None,
) -> int:
    """Migrate one results file in place; returns how many rows (aligned base included) it changed."""
    results = json.loads(path.read_text())
    if "rows" not in results:
        return 0  # not a runner's results file
    exp = experiment_of(results, experiments)
    exp_id = results["experiment"] + (f"--{results['variant']}" if results.get("variant") else "")
    legacy = Legacy(exp, exp_id, checkout, cache_dir, work, assets or checkout / "experiments" / "assets")
    hashes = ContentHashes(cache_dir / "content-hashes.json")
    rows = [r for r in [results.get("base"), *results["rows"]] if isinstance(r, dict)]
    todo = [r for r in rows if "inputs" not in r["settings"]]
    for row in todo:
        row["settings"] = _walk(row["settings"], legacy.written)
    # after all rows are rewritten, Safe LoRA rows last: their model is another row's settings and inputs
    for row in sorted(todo, key=lambda r: "safelora" in r["settings"]):
        row["settings"]["inputs"] = {p: _identity(p, row, rows, legacy, hashes) for p in input_paths(row["settings"])}
        row["key"] = result_key(row["settings"])
    for key in ("model", "eval"):
        results[key] = _walk(results.get(key), legacy.written)
    write_json_atomic(path, results)
    hashes.save()
    return len(todo)


def _identity(written: str, row: dict, rows: list[dict], legacy: Legacy, hashes: ContentHashes) -> str | None:
    if written in ("toy", "toy-quick") or written == "{toy}" or written.startswith("{toy}/"):
        return f"toy:{legacy.toy_folder}"
    if written == "{holdout}":
        return holdout_identity(legacy.exp.train, lambda p: _identity(p, row, rows, legacy, hashes))
    if written.startswith("{run:") and written.endswith("}"):
        other = [r for r in rows if r.get("name") == written[5:-1] and r.get("seed") is None]
        if not other:
            return None
        recorded = other[0]["settings"].get("inputs") or {}
        return run_identity(other[0]["settings"]["train"], lambda p: recorded.get(p))
    from .eval.datasets import parse_spec

    if parse_spec(written) is not None:  # a named eval set, read from the assets folder
        return set_identity(written, legacy.assets, hashes)
    local = legacy.local(written)
    if written.startswith("{toy_commonsense}") and not local.exists():  # written by code: write it again
        from .toy.commonsense import write_toy_commonsense

        folder = write_toy_commonsense(Path(tempfile.mkdtemp()) / "toy-commonsense")
        return hashes(folder / written[len("{toy_commonsense}") :].lstrip("/"))
    found = hashes(local)
    if found and written in legacy.converted:  # the converted folder's name holds its file's hash: check it
        import hashlib

        key = legacy.converted[written].rstrip("/").rsplit("-", 1)[1]
        if hashlib.sha256(f"{found[len('sha256:') :]}|float32".encode()).hexdigest()[:16] != key:
            print(f"{local} is not the GGUF file these rows were made with: recorded as unknown")
            return None
    return found
