"""`logitguard experiment run EXP`: train and evaluate every run of an experiment file into results/EXP.json.

The results file holds the experiment's settings, library versions, the base model's evaluation and one
row per run (and seed): metrics, train time, step time, safety token ids. It is rewritten atomically after
each row, and a row whose settings are unchanged is not run again, so a killed or repeated run resumes.
Rows record paths as the experiment file writes them plus the content hash of each input (result_keys.py),
so a clone at another path, or without the fetched assets, finds them done.
Runs on the same data share one reference cache, built once for the union of their token ids.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

from . import adapters
from .config import TrainConfig, build_config
from .errors import ConfigError, suggest
from .experiment import EvalSpec, Experiment, Placeholders, RunSpec, packaged_name
from .files import ContentHashes, read_results, write_json_atomic
from .report import ROW_DTYPE
from .result_keys import (
    TOY_MODELS,
    holdout_identity,
    input_paths,
    matches,
    result_key,
    run_identity,
    set_identity,
    shape_key,
    train_settings,
)

_key = result_key  # the old name

# Bump when what a row measures changes, so old rows are run again instead of mixed with new ones.
RUNNER_VERSION = 1


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_folder(name: str, seed: int | None) -> str:
    """The folder a run's row trains in, under its experiment's work folder."""
    return slug(name) + (f"-seed{seed}" if seed is not None else "")


def versions() -> dict:
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "logitguard": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def evaluate(
    model_dir: str,
    adapter: str | None,
    spec: EvalSpec,
    folder: Path,
    progress: bool = True,
    trust_code: bool = False,
    dtype_of: str | None = None,
    hashes: ContentHashes | None = None,
) -> dict:
    """Every measure the spec asks for, on one model (plus adapter): eval/pipeline.py, as `logitguard eval` runs
    it; records go to `folder` (redacted), and each finished stage to `folder`/stages, so an evaluation killed
    mid-way resumes at its first unfinished stage (eval/stages.py; not a judged one). The row's metrics,
    with its per-item outcomes under "items".
    trust_code: the model folder's own code may run (train.trust_remote_code, which trained it).
    dtype_of: the checkpoint whose stored dtype an unset eval dtype follows (load_model_for_eval).
    hashes: remembers the model's file hashes for the stages' key (the runner's ContentHashes)."""
    from .eval import load_model_for_eval
    from .eval.pipeline import judge_measured, measure, read_inputs
    from .eval.stages import evaluation_key
    from .models import release_memory

    if spec.engine:  # generation on an OpenAI-compatible server: see _evaluate_with_engine
        return _evaluate_with_engine(model_dir, adapter, spec, folder, progress, trust_code, dtype_of, hashes)
    if not any((spec.harmful, spec.loss_data, spec.exact_match, spec.commonsense, spec.utility)):
        return {}  # a timing-only experiment (Table 6): nothing to load
    inputs = read_inputs(spec)  # set names from $LOGITGUARD_ASSETS, else experiments/assets
    model, tokenizer = (
        load_model_for_eval(model_dir, adapter, spec.dtype, trust_remote_code=trust_code, dtype_of=dtype_of)
        if _needs_model(spec)
        else (None, None)
    )
    # writes the records to folder; the judge (Llama Guard, 8B at the paper's scale) loads once the model is gone.
    # A judge reads whole responses, which are never kept on disk: a judged evaluation is not resumed
    resume = None if spec.judge else evaluation_key(model_dir, adapter, model, spec, inputs, hashes)
    unjudged = dataclasses.replace(spec, judge=None)
    result = measure(model, tokenizer, unjudged, inputs, folder, progress=progress, resume=resume)
    about = {STAGES: result.seconds, DTYPE: result.dtype, RESUMED: result.resumed}
    del model
    if spec.judge:
        release_memory()
        judge_measured(result, spec.judge, folder, progress)
    # per-item outcomes (paired statistics, stats.py); what it says of itself (ABOUT), which _row moves out
    return {**result.metrics, **({"items": result.items} if result.items else {}), **about}


def _evaluate_with_engine(
    model_dir: str,
    adapter: str | None,
    spec: EvalSpec,
    folder: Path,
    progress: bool,
    trust_code: bool,
    dtype_of,
    hashes: ContentHashes | None,
) -> dict:
    """evaluate() with every generation sent to spec.engine (eval/endpoint.py); the model is loaded only when
    the spec also asks for held-out loss or multiple-choice scoring."""
    import contextlib

    from .eval.endpoint import generation_engine, parse_engine

    engine = parse_engine(spec.engine)
    # the server serves the aligned model; a run's adapter is loaded into it for this evaluation only
    with generation_engine(engine), engine.adapter(adapter) if adapter else contextlib.nullcontext():
        return evaluate(
            model_dir, adapter, dataclasses.replace(spec, engine=None), folder, progress, trust_code, dtype_of, hashes
        )


def _needs_model(spec: EvalSpec) -> bool:
    """False inside an engine's block when everything the spec asks for is generation."""
    from .eval.endpoint import engine_for, in_process_parts

    return engine_for(None) is None or bool(in_process_parts(spec.loss_data, spec.commonsense, spec.utility))


# what evaluate() says of itself, carried in its metrics as far as _row, which puts it beside them in the row:
STAGES = "stage_seconds"  # its timings per stage
DTYPE = "loaded_dtype"  # the dtype it ran in: an unset eval.dtype resolves per machine, and is not in the key
RESUMED = "resumed_stages"  # stages read back from a run killed mid-way (their seconds are that run's)
ABOUT = {STAGES: "eval_stage_seconds", DTYPE: ROW_DTYPE, RESUMED: "eval_resumed_stages"}  # {carried: in the row}


class Runner:
    """Runs one experiment (one variant) into `results_dir/<experiment id>.json`."""

    def __init__(self, exp: Experiment, results_dir="results", work_dir="runs/bench", cache_dir=None, progress=True):
        self.exp, self.progress = exp, progress
        self.ph = Placeholders(exp, cache_dir, progress)
        self.hashes = ContentHashes(Path(self.ph.cache_dir) / "content-hashes.json")
        self.results_path = Path(results_dir) / f"{exp.id}.json"
        self.work = Path(work_dir) / exp.id
        # the model as the experiment file writes it (`toy`, a GGUF file, a folder or hub name): what rows record
        self.written_model = exp.gguf_file or exp.model
        self._model: str | None = None
        self._spec: EvalSpec | None = None
        self._identities: dict[str, str | None] = {}
        old = read_results(self.results_path)
        # rows by their settings without inputs (recomputed from the stored settings, so rows survive a change of
        # the key's normalization); the inputs are then checked against this machine's files
        self.done: dict[str, list[dict]] = {}
        for row in [old.get("base"), *old.get("rows", [])]:
            if isinstance(row, dict) and isinstance(row.get("settings"), dict):
                self.done.setdefault(shape_key(row["settings"]), []).append(row)
        legacy = sum(1 for rows in self.done.values() for r in rows if "inputs" not in r["settings"])
        if legacy:  # written before result_keys.py: their absolute paths never match, so they would run again
            print(f"{self.results_path}: {legacy} rows hold absolute paths (an older logitguard); run `logitguard "
                  "experiment migrate --checkout <where they were run>` once to keep them", flush=True)  # fmt: skip
        # the aligned model's evaluation is the same measurement in every experiment that evaluates the same
        # model with the same settings (the scenarios of one model): computed once, found in a sibling file
        self.shared_bases = _sibling_bases(Path(results_dir), self.results_path)
        self.rows: list[dict] = []
        self.selected: list[str] = []
        # rows of runs left out by `--only` stay in the file (a partial invocation adds rows, never drops them)
        self.kept_rows = [r for r in old.get("rows", []) if isinstance(r, dict) and "name" in r]
        self.base: dict | None = None
        self.extra: dict = {}  # more top-level fields for the results file (a sweep's grid, say)
        self.cache_seconds = old.get("cache_seconds")

    @property
    def model(self) -> str:
        """The aligned model's folder, made when a row first needs it (the toy built, a GGUF file converted): rows
        found done need neither."""
        if self._model is None:
            self._model = self.ph.model()
        return self._model

    @property
    def spec(self) -> EvalSpec:
        """The evaluation settings with paths filled in (and {holdout} written), when a row first needs them."""
        if self._spec is None:
            self._spec = self._with_holdout(self.ph.eval_spec())
        return self._spec

    def config(self, run: RunSpec, seed: int | None) -> TrainConfig:
        values = {**self.ph(self.exp.train), **self.ph(run.train)}
        if seed is not None:
            values["seed"] = seed
        folder = self.work / run_folder(run.name, seed)
        values.update(model=self.model, output_dir=str(folder), cache_dir=self.ph.cache_dir)
        return build_config(values, f"{self.exp.id}: {run.name}")

    def written_config(self, run: RunSpec, seed: int | None) -> TrainConfig:
        """The run's config with paths as the experiment file writes them: what its row's settings record."""
        values = {**self.exp.train, **run.train, **({"seed": seed} if seed is not None else {})}
        values["model"] = self.written_model
        return build_config(values, f"{self.exp.id}: {run.name}")

    @staticmethod
    def settings(cfg: TrainConfig) -> dict:
        return train_settings(cfg)  # output, cache and checkpoint folders left out: where, not what

    def run(self, only: list[str] | None = None) -> dict:
        runs = self._selected(only)
        self._check_engine(runs)
        self.base = self._row("aligned base", None, self._base_settings(), self._eval_base, shared=self.shared_bases)
        self._save()
        self.selected = [r.name for r in runs]
        self._prebuild_caches([r for r in runs if r.safelora is None and r.stages is None])
        for run, seed, settings, compute in self._planned(runs):
            self.rows.append(self._row(run.name, seed, settings, compute))
            self._save()
        return self._save()

    def _selected(self, only: list[str] | None) -> list[RunSpec]:
        """The runs `only` names (every run when None), in the file's order; an unknown name is a ConfigError."""
        names = [r.name for r in self.exp.runs]
        for name in only or []:  # before any model is loaded: a typo fails in a second
            if name not in names:
                raise ConfigError(f"{self.exp.id}: --only {name!r} names no run{suggest(name, set(names))}; "
                                  f"runs: {', '.join(names)}")  # fmt: skip
        return [r for r in self.exp.runs if not only or r.name in only]

    def pending(self, only: list[str] | None = None) -> list[tuple[str, int | None]]:
        """(name, seed) of the rows `run(only)` would compute, in order; nothing is built, converted or computed."""
        runs = self._selected(only)
        todo = []
        base = self._keyed(self._base_settings())
        shared = [row for _, row in self.shared_bases.get(shape_key(base), [])]
        if self._find(base, self.done) is None and not any(matches(r["settings"], base["inputs"]) for r in shared):
            todo.append(("aligned base", None))
        for run, seed, settings, _ in self._planned(runs):
            if self._find(self._keyed(settings), self.done) is None:
                todo.append((run.name, seed))
        return todo

    def _base_settings(self) -> dict:
        return {"model": self.written_model, "eval": dataclasses.asdict(self.exp.eval)}  # as written

    def _planned(self, runs: list[RunSpec]):
        """(run, seed, settings as written, compute) of each row of these runs."""
        eval_settings = dataclasses.asdict(self.exp.eval)
        for run in runs:
            for seed in run.seeds or [None]:
                if run.safelora is not None:
                    yield run, seed, *self._safelora(run, seed, eval_settings)
                elif run.stages is not None:
                    yield run, seed, *self._continual(run, seed, eval_settings)
                else:
                    settings = {"train": self.settings(self.written_config(run, seed)), "eval": eval_settings}
                    yield run, seed, settings, lambda r=run, s=seed, w=settings: self._train_eval(self.config(r, s), w)

    def _check_engine(self, runs: list[RunSpec]) -> None:
        """An eval.engine server serves the aligned model and loads adapters into it: a run that trains a whole
        model (full fine-tuning, continual stages) cannot be evaluated there. Refused before any training."""
        if not self.exp.eval.engine:  # as written: the check needs no model built and no path filled in
            return
        whole = [
            r.name
            for r in runs
            if r.stages or (r.safelora is None and adapters.get(self.written_config(r, None).method).whole_model)
        ]
        if whole:
            raise ConfigError(
                f"{self.exp.id}: eval.engine cannot evaluate {', '.join(whole)}: they train a whole model, which "
                "the server does not serve; leave eval.engine out (in-process) or serve each model and use "
                "`logitguard eval --engine`"
            )

    def _row(self, name: str, seed: int | None, settings: dict, compute, shared: dict | None = None) -> dict:
        settings = self._keyed(settings)
        done = self._find(settings, self.done)
        if done is not None:
            print(f"== {self.exp.id} / {name}: done, skipped", flush=True)
            return done
        for source, row in (shared or {}).get(shape_key(settings), []):
            if matches(row["settings"], settings["inputs"]):
                print(f"== {self.exp.id} / {name}: the same evaluation is in {source}, reused", flush=True)
                row = {**row, "reused_from": source}
                self.done.setdefault(shape_key(settings), []).append(row)
                return row
        print(f"\n== {self.exp.id} / {name}" + (f" (seed {seed})" if seed is not None else ""), flush=True)
        computed = compute()
        metrics = computed.get("metrics", {})
        about = {field: metrics.pop(key) for key, field in ABOUT.items() if key in metrics}  # not measures
        row = {"name": name, "seed": seed, "key": result_key(settings), **computed, "settings": settings}
        row.update({field: value for field, value in about.items() if value})
        self.done.setdefault(shape_key(settings), []).append(row)
        return row

    def _keyed(self, settings: dict) -> dict:
        """The settings a row records: as written, plus the runner version and the identity of every input."""
        settings = {**settings, "runner_version": RUNNER_VERSION}
        return {**settings, "inputs": {path: self._identity(path) for path in input_paths(settings)}}

    @staticmethod
    def _find(settings: dict, done: dict[str, list[dict]]) -> dict | None:
        """A finished row with these settings whose inputs match the files here (those not here: on the record)."""
        return next((r for r in done.get(shape_key(settings), []) if matches(r["settings"], settings["inputs"])), None)

    def _identity(self, written: str) -> str | None:
        """What a path as written names, on this machine (result_keys.py); None when it is not here."""
        from .eval.datasets import default_assets, is_set_name

        if written not in self._identities:
            if written in TOY_MODELS or written == "{toy}" or written.startswith("{toy}/"):
                # the toy's folder name hashes its recipe and corpus: known before (and without) building it
                found = "toy:" + self.ph.toy_dir().name
            elif written == "{toy_demo}" or written.startswith("{toy_demo}/"):
                # the demo's mined files: the toy's, and how they were mined
                from .toy.demo_inputs import folder_name

                found = f"toy:{self.ph.toy_dir().name}/{folder_name()}"
            elif written == "{holdout}":
                found = holdout_identity(self.exp.train, self._identity)
            elif written.startswith("{run:") and written.endswith("}"):
                other = next((r for r in self.exp.runs if r.name == written[5:-1]), None)
                train = self.settings(self.written_config(other, None)) if other else None
                found = run_identity(train, self._identity) if other else None
            elif is_set_name(written):  # read from $LOGITGUARD_ASSETS, else experiments/assets, as evaluation does
                found = set_identity(written, default_assets(), self.hashes)
            else:
                found = self.hashes(self.ph.local(written))
            self._identities[written] = found
        return self._identities[written]

    def _with_holdout(self, spec: EvalSpec) -> EvalSpec:
        """Fill {holdout} with the rows the training config holds out (the same for every run)."""
        fields = {k: v for k, v in dataclasses.asdict(spec).items() if isinstance(v, str) and "{holdout}" in v}
        if not fields:
            return spec
        from .data import apply_columns, load_rows, split_holdout, write_holdout
        from .train import HOLDOUT_SEED

        cfg = build_config({"model": self.model, **self.ph(self.exp.train)}, self.exp.id)
        if cfg.holdout < 1:
            raise ConfigError(f"{self.exp.id}: eval uses {{holdout}} but train.holdout is {cfg.holdout}")
        rows = apply_columns(load_rows(cfg.data, cfg.data_split), cfg.columns)
        held = split_holdout(rows, cfg.holdout, HOLDOUT_SEED)[1]
        path = write_holdout(held, self.work / "holdout.jsonl")
        return dataclasses.replace(spec, **{k: v.replace("{holdout}", str(path)) for k, v in fields.items()})

    def _reuse_training(self, cfg: TrainConfig, settings: dict) -> str | None:
        """A variant that evaluates the same training on other sets need not train again: when this run's folder
        holds no training yet and another variant's results file has a row with the same train settings and
        training inputs, whose folder holds its final checkpoint, that folder is copied here (its evaluation
        left behind) and training resumes at its end, 0 steps. Returns where it came from, for the row."""
        import shutil

        from .files import checkpoint_step, last_complete_checkpoint

        out = Path(cfg.output_dir)
        if (out / "config.yaml").is_file():
            return None
        keyed = self._keyed(settings)
        wanted = {"train": keyed["train"]}  # the model is a train setting
        inputs = {path: keyed["inputs"].get(path) for path in input_paths(wanted)}
        for path, contents in _other_results(self.results_path.parent, self.results_path):
            if path.stem.split("--")[0] != self.exp.name:  # another experiment file's results
                continue
            rows = contents.get("rows", [])
            for row in rows if isinstance(rows, list) else []:
                recorded = row.get("settings") if isinstance(row, dict) else None
                if not isinstance(recorded, dict) or "trained_in" in row or "reused_from" in row:
                    continue
                if {"train": recorded.get("train")} != wanted:
                    continue
                if not matches({"inputs": {p: recorded.get("inputs", {}).get(p) for p in inputs}}, inputs):
                    continue
                source = self.work.parent / path.stem / run_folder(row["name"], row.get("seed"))
                last = last_complete_checkpoint(source) if source.is_dir() else None
                if last is None or checkpoint_step(last) != row.get("steps"):
                    continue  # its folder is gone, or holds no checkpoint of its final step: train here
                print(f"== training reused from {source} (the same settings, finished there)", flush=True)
                shutil.copytree(source, out, ignore=shutil.ignore_patterns("eval", "merged"), dirs_exist_ok=True)
                return f"{path.stem}/{source.name}"
        return None

    def _evaluate(
        self, model: str, adapter: str | None, folder: Path, trust_code: bool | None = None, like_aligned=False
    ) -> dict:
        """evaluate() with this experiment's eval settings; the model's own code runs where the row's training
        (else the experiment's train settings) says trust_remote_code. like_aligned: a whole model saved by full
        fine-tuning holds its float32 master weights, and the eval dtype left to "auto" would evaluate it in
        float32 on an accelerator while the aligned row ran in the checkpoint's dtype (bf16, say): twice the
        memory and not the same measurement. It is then evaluated in the aligned checkpoint's dtype."""
        if trust_code is None:
            trust_code = bool(self.exp.train.get("trust_remote_code", False))
        dtype_of = self.model if like_aligned else None
        return evaluate(model, adapter, self.spec, folder, self.progress, trust_code, dtype_of, self.hashes)

    def _eval_base(self) -> dict:
        start = time.perf_counter()
        metrics = self._evaluate(self.model, None, self.work / "aligned-base" / "eval")
        return {"metrics": metrics, "eval_seconds": time.perf_counter() - start}

    def _train_eval(self, cfg: TrainConfig, settings: dict) -> dict:
        from .controllers import thinned
        from .train import release_trainer, start_over_if_stale, train

        trained_in = self._reuse_training(cfg, settings)
        start_over_if_stale(cfg)
        result = train(cfg, progress=self.progress)
        final = {key: _last_logged(result["trainer"], key) for key in ("ce", "reg")}
        release_trainer(result.pop("trainer"))  # model, optimizer and their accelerator memory, before evaluation
        start = time.perf_counter()
        # full fine-tuning saves a whole model, the PEFT methods an adapter on the aligned model
        whole = adapters.get(cfg.method).whole_model
        model, adapter = (cfg.output_dir, None) if whole else (self.model, cfg.output_dir)
        metrics = self._evaluate(model, adapter, Path(cfg.output_dir) / "eval", cfg.trust_remote_code, whole)
        return {
            "metrics": metrics,
            **({"trained_in": trained_in} if trained_in else {}),
            "train_seconds": result["train_seconds"],  # across a resume (train_clock)
            "steps": result["global_step"],
            "step_seconds": result["step_seconds"],
            **({"resumed_at_step": result["global_step"] - result["steps_run"]} if result["resumed_from"] else {}),
            "eval_seconds": time.perf_counter() - start,
            "safety_ids": result["safety_ids"],
            "final_ce": final["ce"],
            "final_reg": final["reg"],
            # str_budget / safety_target: where lambda went (the row's setting is only where it started)
            **({"lambda_controller": thinned(result["lambda_controller"])} if result["lambda_controller"] else {}),
        }

    def _safelora(self, run: RunSpec, seed: int | None, eval_settings: dict) -> tuple[dict, object]:
        from .safelora import safe_lora

        source = next(r for r in self.exp.runs if r.name == run.safelora["of"])
        written = {k: v for k, v in run.safelora.items() if k != "of"}
        settings = {"of": self.settings(self.written_config(source, seed)), "safelora": written, "eval": eval_settings}
        other = None
        if written["unaligned"].startswith("{run:") and written["unaligned"].endswith("}"):  # another run's model
            other = next((r for r in self.exp.runs if r.name == written["unaligned"][5:-1]), None)
            if other is None:
                raise ConfigError(f"{run.name}: safelora.unaligned names no run: {written['unaligned']}")

        def compute():
            cfg = self.config(source, seed)
            options = self.ph(written)
            unaligned = self.config(other, None).output_dir if other else options["unaligned"]
            if not (Path(cfg.output_dir) / "adapter_config.json").is_file():
                raise ConfigError(f"{run.name}: run {source.name!r} first (its adapter is not in {cfg.output_dir})")
            out = self.work / run_folder(run.name, seed)
            report = safe_lora(self.model, unaligned, cfg.output_dir, out, options.get("num_layers", 10))
            metrics = self._evaluate(self.model, str(out), out / "eval", cfg.trust_remote_code)
            return {"metrics": metrics, "projected": sum(m["projected"] for m in report["modules"])}

        return settings, compute

    def _continual(self, run: RunSpec, seed: int | None, eval_settings: dict) -> tuple[dict, object]:
        """Train the stages in order, each on the previous stage's merged model, with the reference taken from
        the original aligned model; evaluate the model after the last stage."""
        written = []
        for k, stage in enumerate(run.stages):
            cfg = self.written_config(RunSpec(f"{run.name} stage {k + 1}", {**run.train, **stage}), seed)
            if cfg.reg_weight > 0:
                cfg = dataclasses.replace(cfg, reference_model=self.written_model)
            written.append(self.settings(cfg) | {"model": None})  # each stage starts from the one before
        settings = {"stages": written, "eval": eval_settings}

        def compute():
            from .train import train

            cfgs, start_model = [], self.model
            for k, stage in enumerate(run.stages):
                staged = RunSpec(f"{run.name} stage {k + 1}", {**run.train, **self.ph(stage)})
                cfg = dataclasses.replace(self.config(staged, seed), model=start_model)
                if cfg.reg_weight > 0:
                    cfg = dataclasses.replace(cfg, reference_model=self.model)
                cfgs.append(cfg)
                start_model = str(Path(cfg.output_dir) / "merged")
            seconds, steps = 0.0, 0
            for cfg in cfgs:
                if not (Path(cfg.output_dir) / "merged" / "config.json").is_file():
                    result = train(cfg, progress=self.progress)
                    seconds, steps = seconds + result["train_seconds"], steps + result["global_step"]
                    _merge(cfg, Path(cfg.output_dir) / "merged")
            final = str(Path(cfgs[-1].output_dir) / "merged")
            metrics = self._evaluate(final, None, Path(cfgs[-1].output_dir) / "eval", cfgs[-1].trust_remote_code)
            return {"metrics": metrics, "train_seconds": seconds, "steps": steps, "stages": len(cfgs)}

        return settings, compute

    def _prebuild_caches(self, runs: list[RunSpec]) -> None:
        """One reference cache per dataset, for the union of the token ids of the runs on it."""
        from .train import prebuild_caches

        pending = [self.config(r, s) for r in runs for s in (r.seeds or [None]) if not self._is_done(r, s)]
        seconds = prebuild_caches(pending, self.progress) if pending else None
        if seconds is not None:  # all done, or every cache found complete: the recorded build time stays
            self.cache_seconds = seconds

    def _is_done(self, run: RunSpec, seed: int | None) -> bool:
        settings = {"train": self.settings(self.written_config(run, seed)), "eval": dataclasses.asdict(self.exp.eval)}
        return self._find(self._keyed(settings), self.done) is not None

    def _all_rows(self) -> list[dict]:
        """This invocation's rows, plus the earlier rows of the experiment's other runs, in the file's run order."""
        order = {r.name: i for i, r in enumerate(self.exp.runs)}
        kept = [r for r in self.kept_rows if r["name"] in order and r["name"] not in self.selected]
        return sorted(self.rows + kept, key=lambda r: order.get(r["name"], len(order)))

    def _save(self) -> dict:
        results = {
            "experiment": self.exp.name,
            "variant": self.exp.variant,
            "description": self.exp.description,
            "config_file": _relative(self.exp.path),
            "model": self.written_model,
            "eval": dataclasses.asdict(self.exp.eval),
            "versions": versions(),
            "base": self.base,
            "rows": self._all_rows(),
            "cache_seconds": self.cache_seconds,
            "paper": self.exp.paper,
            **({"target": self.exp.target} if self.exp.target else {}),
            **({"run_targets": self.exp.run_targets} if self.exp.run_targets else {}),
            **self.extra,
        }
        write_json_atomic(self.results_path, results)
        self.hashes.save()
        return results


def _relative(path: Path) -> str:
    """Relative to the working folder (the repository root, run as documented), else the file's name: a results
    file never holds a machine's folders. A file shipped in the package: its place in the package."""
    packaged = packaged_name(path)
    if packaged:
        return packaged
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _other_results(folder: Path, own: Path):
    """(path, contents) of each results file in `folder` but `own`, in name order; unreadable files are skipped:
    they are not this run's to judge."""
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path == own:
            continue
        try:
            contents = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(contents, dict):
            yield path, contents


def _sibling_bases(folder: Path, own: Path) -> dict[str, list[tuple[str, dict]]]:
    """{settings key without inputs: [(file name, row)]} of the aligned-base rows in the other results files of
    `folder`."""
    found: dict[str, list[tuple[str, dict]]] = {}
    for path, contents in _other_results(folder, own):
        base = contents.get("base")
        if isinstance(base, dict) and isinstance(base.get("settings"), dict) and "reused_from" not in base:
            found.setdefault(shape_key(base["settings"]), []).append((path.name, base))
    return found


def _merge(cfg: TrainConfig, out: Path) -> None:
    """Fold the stage's adapter into its start model's weights and save a plain model folder (the next stage's
    start)."""
    import shutil

    from peft import PeftModel

    from .models import load_model, load_tokenizer

    start = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(start, cfg.output_dir).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    load_tokenizer(cfg.output_dir, cfg.trust_remote_code).save_pretrained(str(tmp))
    tmp.rename(out)


def _last_logged(trainer, key: str):
    values = [row[key] for row in trainer.state.log_history if key in row]
    return values[-1] if values else None
