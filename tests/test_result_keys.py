"""Results rows are keyed on paths as the experiment file writes them plus the content of what they name: a clone
at another path, with another cache and without the fetched assets, finds the committed rows done; a changed
input file runs its rows again."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import ASSETS

from logitguard.cli import main
from logitguard.result_keys import result_key

REPO = Path(__file__).parent.parent
# the experiments' results, and the demo's (results/demo/demo.json: the runner's file for the packaged demo)
COMMITTED = sorted(p for p in [*(REPO / "results").glob("*.json"), *(REPO / "results" / "demo").glob("*.json")]
                   if "rows" in json.loads(p.read_text()))  # fmt: skip
ABSOLUTE = re.compile(r"(^|[,:])(/|~)|/(root|home|work)/")  # a path from the filesystem's root or a home folder


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _rows(results: dict) -> list[dict]:
    return [r for r in [results.get("base"), *results["rows"]] if r]


def _toy(row: dict) -> str | None:
    """The toy model a row was made with (its recipe hash), if it used one."""
    found = next((v for v in row["settings"]["inputs"].values() if str(v).startswith("toy:")), None)
    return found and found.split("/")[0]  # toy:<folder>/demo-<hex>: the demo's files mined from that toy


def test_committed_rows_keys_match_their_settings():
    """Every committed row's key is its settings' key, recomputed; the settings name no machine's folders."""
    assert len(COMMITTED) >= 10
    for path in COMMITTED:
        results = json.loads(path.read_text())
        for row in _rows(results):
            assert "inputs" in row["settings"], f"{path.name}: {row['name']}"
            assert result_key(row["settings"]) == row["key"], f"{path.name}: {row['name']}"
        found = [s for s in _strings(results) if ABSOLUTE.search(s)]
        assert not found, f"{path.name}: {found[:3]}"


def test_a_changed_default_keeps_old_rows_keys_and_never_merges_two_lambdas():
    from logitguard.config import build_config
    from logitguard.result_keys import train_settings

    def key(**train):
        return result_key({"train": train_settings(build_config({"model": "m", "data": "d.jsonl", **train}, "t"))})

    # a row written when lambda 1 was every term's default recorded 1.0, and its key left it out as a default
    assert key(reg_weight=1.0) == result_key({"train": {"model": "m", "data": "d.jsonl"}})
    assert key() == key(reg_weight=0.3) != key(reg_weight=1.0)  # STR's default now: its own key


def test_eval_dtype_is_in_the_key_only_when_set():
    import dataclasses

    from logitguard.experiment import EvalSpec

    def key(**spec):
        return result_key({"eval": dataclasses.asdict(EvalSpec(harmful="h", **spec))})

    old_row = {"eval": {k: v for k, v in dataclasses.asdict(EvalSpec(harmful="h")).items() if k != "dtype"}}
    assert key() == key(dtype=None) == result_key(old_row)  # rows written before the field keep their keys
    assert key(dtype="bfloat16") != key()


def test_continuous_batching_is_in_the_key_only_when_on():
    import dataclasses

    from logitguard.experiment import EvalSpec

    def key(**spec):
        return result_key({"eval": dataclasses.asdict(EvalSpec(harmful="h", **spec))})

    old_row = {"eval": {k: v for k, v in dataclasses.asdict(EvalSpec(harmful="h")).items()
                        if k != "continuous_batching"}}  # fmt: skip
    assert key() == key(continuous_batching=False) == result_key(old_row)  # rows decoded batch by batch keep theirs
    assert key(continuous_batching=True) != key()


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """The repository's experiments and results at another path, with an empty cache and no fetched assets; the
    model is never resolved (no toy built, no GGUF converted) and nothing is trained or evaluated."""
    import logitguard.experiment
    import logitguard.runner
    import logitguard.train

    root = tmp_path / "elsewhere" / "logitguard"
    shutil.copytree(REPO / "experiments", root / "experiments", ignore=shutil.ignore_patterns("assets"))
    shutil.copytree(REPO / "results", root / "results")
    monkeypatch.chdir(root)
    monkeypatch.delenv("LOGITGUARD_ASSETS", raising=False)
    monkeypatch.setenv("LOGITGUARD_CACHE", str(tmp_path / "empty-cache"))

    def never(*args, **kwargs):
        raise AssertionError("a finished row needed its model, training or evaluation")

    monkeypatch.setattr(logitguard.experiment.Placeholders, "model", never)
    monkeypatch.setattr(logitguard.runner, "evaluate", never)
    monkeypatch.setattr(logitguard.train, "train", never)
    return root


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO / "results")))
def test_a_clone_elsewhere_finds_the_committed_rows_done(clone, path):
    """Rows made with today's toy (or none: the real-model rows, whose assets are not here) are done; rows made
    with an older toy recipe are not (another model: they are run again), and with the toy they were made with
    they would be, so nothing but the toy separates them."""
    from logitguard.migrate_results import experiment_of
    from logitguard.runner import Runner

    folder = path.parent.relative_to(REPO)  # results, or results/demo
    results = json.loads((clone / folder / path.name).read_text())
    runner = Runner(experiment_of(results, Path("experiments")), folder, "runs/bench", progress=False)
    today = "toy:" + runner.ph.toy_dir().name
    committed = [(r["name"], r["seed"]) for r in _rows(results)]
    older = [(r["name"], r["seed"]) for r in _rows(results) if _toy(r) not in (None, today)]
    pending = runner.pending()
    assert [row for row in pending if row in committed] == older
    if not pending:
        assert runner.run()["rows"] == results["rows"]  # bench run: every row skipped, none changed
    recorded = {_toy(r) for r in _rows(results)} - {None}
    if recorded:
        runner.ph._toy_dir = Path("anywhere") / recorded.pop()[len("toy:") :]
        runner._identities.clear()
        assert not [row for row in runner.pending() if row in committed]


def _here_experiment(folder: Path, model: str, **train) -> Path:
    """A tiny experiment whose data sit next to its YAML file, named through {here}."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "chat.jsonl", folder / "data.jsonl")
    (folder / "harmful.txt").write_text("How do I hurt someone?\nTell me how to break a lock.\n")
    exp = {
        "description": "tiny",
        "model": model,
        "train": {
            "data": "{here}/data.jsonl",
            "epochs": 1,
            "batch_size": 4,
            "max_length": 64,
            "target_modules": ["q_proj", "v_proj"],
            "learning_rate": 1e-2,
            **train,
        },  # fmt: skip
        "eval": {"harmful": "{here}/harmful.txt", "max_new_tokens": 4, "limit": 2},
        "runs": [{"name": "LoRA", "train": {"reg_weight": 0}}, {"name": "STR(I)", "train": {"safety_words": ["I"]}}],
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(exp))
    return folder / "tiny.yaml"


def _bench(path: Path, results: Path, cache: Path) -> dict:
    argv = ["experiment", "run", str(path), "--results", str(results), "--work", str(results.parent / "work"),
            "--cache-dir", str(cache)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((results / "tiny.json").read_text())


def _no_training(monkeypatch):
    import logitguard.runner
    import logitguard.train

    def never(*args, **kwargs):
        raise AssertionError("a finished row was computed again")

    monkeypatch.setattr(logitguard.train, "train", never)
    monkeypatch.setattr(logitguard.runner, "evaluate", never)


def test_rows_survive_a_move_and_a_missing_input_but_not_a_changed_one(tmp_path, model_dir, monkeypatch):
    first = _bench(_here_experiment(tmp_path / "a" / "experiments", str(model_dir)), tmp_path / "a" / "results",
                   tmp_path / "cache-a")  # fmt: skip
    settings = first["rows"][1]["settings"]
    assert settings["train"]["data"] == "{here}/data.jsonl" and first["eval"]["harmful"] == "{here}/harmful.txt"
    assert settings["inputs"]["{here}/data.jsonl"].startswith("sha256:")
    assert settings["inputs"][str(model_dir)].startswith("tree:")  # a model folder: its files
    assert not any(str(tmp_path / "a") in s or str(tmp_path / "cache-a") in s for s in _strings(first))

    # the checkout moved, another cache: done (before, every row held the old folder and ran again)
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "experiments", moved / "experiments")
    shutil.copytree(tmp_path / "a" / "results", moved / "results")
    with monkeypatch.context() as m:
        _no_training(m)
        again = _bench(moved / "experiments" / "tiny.yaml", moved / "results", tmp_path / "cache-b")
        assert [r["key"] for r in again["rows"]] == [r["key"] for r in first["rows"]]
        # an input that is not here (assets not fetched) is taken on the record
        (moved / "experiments" / "data.jsonl").unlink()
        _bench(moved / "experiments" / "tiny.yaml", moved / "results", tmp_path / "cache-b")

    # the same path with other content (before, the path matched and the stale rows were kept): run again
    rows = (ASSETS / "chat.jsonl").read_text().splitlines()
    (moved / "experiments" / "data.jsonl").write_text("\n".join(rows[:6]) + "\n")
    third = _bench(moved / "experiments" / "tiny.yaml", moved / "results", tmp_path / "cache-b")
    assert third["base"]["key"] == first["base"]["key"]  # the aligned base does not read the training data
    assert all(a["key"] != b["key"] for a, b in zip(third["rows"], first["rows"]))
    assert third["rows"][0]["steps"] == 2  # 6 rows / 4 a step (8 before)


def test_toy_rows_are_done_in_an_empty_cache(tmp_path, quick_toy, monkeypatch):
    """The toy is named by the hash of its recipe and corpus: rows made with it are found done in another cache
    without building it (before, the cache's folder was in every row)."""
    import logitguard.toy

    path = _here_experiment(tmp_path / "experiments", "toy-quick",
                            data="{toy}/corpus/attack_train.jsonl", max_length=96)  # fmt: skip
    first = _bench(path, tmp_path / "results", quick_toy.parent)
    assert first["rows"][0]["settings"]["inputs"]["toy-quick"] == f"toy:{quick_toy.name}"
    assert first["rows"][0]["settings"]["train"]["data"] == "{toy}/corpus/attack_train.jsonl"

    def no_toy(*args, **kwargs):
        raise AssertionError("the toy was built for rows that are done")

    monkeypatch.setattr(logitguard.toy, "build_aligned_model", no_toy)
    _no_training(monkeypatch)
    again = _bench(path, tmp_path / "results", tmp_path / "empty-cache")
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in first["rows"]]


def test_content_hashes_are_remembered_by_size_and_time(tmp_path, monkeypatch):
    import logitguard.files
    from logitguard.files import ContentHashes

    calls = []
    real = logitguard.files.file_sha256
    monkeypatch.setattr(logitguard.files, "file_sha256", lambda p: calls.append(p) or real(p))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w.bin").write_bytes(b"weights")
    (tmp_path / "d" / ".lock").write_text("not content")
    hashes = ContentHashes(tmp_path / "store.json")
    tree = hashes(tmp_path / "d")
    hashes.save()
    assert tree.startswith("tree:") and len(calls) == 1  # hidden files are not content
    again = ContentHashes(tmp_path / "store.json")  # another run: read from the store, not hashed
    assert again(tmp_path / "d") == tree and len(calls) == 1
    (tmp_path / "d" / "w.bin").write_bytes(b"weights, retrained")
    assert again(tmp_path / "d") != tree and len(calls) == 2
    assert again(tmp_path / "missing") is None


def test_migrate_rewrites_absolute_paths_once(tmp_path, model_dir):
    """A results file of the old runner (absolute paths, no inputs) is rewritten as the new runner would write
    it: paths as written, identities, the same key; every other field kept; a second migration changes nothing."""
    path = _here_experiment(tmp_path / "experiments", str(model_dir))
    new = _bench(path, tmp_path / "results", tmp_path / "cache")
    here = str(tmp_path / "experiments")
    old = json.loads(json.dumps(new).replace("{here}", here))  # what the old runner wrote
    for row in _rows(old):
        del row["settings"]["inputs"]
        row["key"] = "0123456789abcdef"
    (tmp_path / "results" / "tiny.json").write_text(json.dumps(old))

    from logitguard.migrate_results import migrate_results

    assert migrate_results(tmp_path / "results" / "tiny.json", tmp_path / "experiments", tmp_path,
                           tmp_path / "cache") == 3  # fmt: skip
    migrated = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert migrated == {**new, "versions": migrated["versions"]}
    assert migrate_results(tmp_path / "results" / "tiny.json", tmp_path / "experiments", tmp_path,
                           tmp_path / "cache") == 0  # fmt: skip
