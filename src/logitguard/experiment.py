"""Experiment files: one YAML per paper table or figure (experiments/*.yaml), loaded and checked up front.

    description: what the experiment reproduces
    paper: {source: "Table 2", metric: asr, rows: {"LoRA": 0.623}}   # the paper's numbers, for the report
    model: aligned model folder / hub name, or `toy` / `toy-quick` (the embedded toy model)
    gguf_file: optional GGUF file, converted once (then `model` is ignored)
    train: {TrainConfig keys shared by every run}
    eval: {EvalSpec keys}
    runs:
      - name: LoRA
        train: {reg_weight: 0}
        seeds: [0, 1, 2]                 # optional: one row per seed
      - name: Safe LoRA
        safelora: {of: LoRA, unaligned: PATH}   # post-hoc projection of another run's adapter
      - name: continual LoRA
        stages: [{data: task1.jsonl}, {data: task2.jsonl}]   # each stage merged before the next
    target: {refusal_drop: 0.03, utility: humaneval_pass@1, utility_of: LoRA, utility_gap: 0.03}  # verdict.py
    scenarios:                           # optional: settings shared by the runs of one scenario
      attack: {train: {data: attack.jsonl, epochs: 5}, target: {utility: null}}   # a run's `scenario: attack`
    variants:
      toy: {model: toy, train: {...}, eval: {...}, runs: [...]}   # merged over the top level

A run's training settings are the file's `train`, then its scenario's `train`, then its own; a scenario's `target`
is merged over the file's for its runs (the demo judges its attack runs on refusal alone). A variant may change a
scenario's keys like any other mapping.

Strings may use {toy} (the toy model folder, built on first use), {toy_demo} (the demo's files mined from the toy:
mined_tokens.json, pact_tokens.json, anchor_prompts.jsonl; toy/demo_inputs.py), {toy_commonsense} (toy data in the
LLM-Adapters commonsense format), {here} (the YAML file's folder), {assets} ($LOGITGUARD_ASSETS, default
experiments/assets) and, in a safelora section, {run:NAME} (another run's output folder).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import build_config, default_cache_dir
from .deprecated import renamed_keys
from .errors import ConfigError, suggest
from .verdict import Target

TOP_KEYS = {"description", "paper", "model", "gguf_file", "train", "eval", "runs", "variants", "target", "scenarios"}
RUN_KEYS = {"name", "train", "seeds", "safelora", "stages", "scenario"}
SCENARIO_KEYS = {"train", "target"}
# experiment files that ship inside the package (the demo's): found by name when experiments/ has no such file
PACKAGED = {"demo": Path(__file__).parent / "toy" / "demo.yaml"}


def packaged_name(path: str | Path) -> str | None:
    """A packaged experiment file's place in the package (`logitguard/toy/demo.yaml`), the same wherever logitguard
    is installed: what a results file records; None for any other file."""
    path = Path(path).resolve()
    if path not in {p.resolve() for p in PACKAGED.values()}:
        return None
    return path.relative_to(Path(__file__).resolve().parent.parent).as_posix()


@dataclass
class EvalSpec:
    harmful: str | None = None  # harmful prompts: refusal rate, keyword ASR (and HRR with a judge)
    benign: str | None = None  # benign prompts: over-refusal
    borderline: str | None = None  # safe but harmful-sounding prompts: over-refusal
    loss_data: str | None = None  # chat data: eval loss on assistant tokens (utility)
    exact_match: str | None = None  # chat data, a comma list: greedy exact match with the reference answer
    commonsense: str | None = None  # folder of LLM-Adapters test sets: multiple-choice accuracy
    commonsense_mode: str = "loglik"  # loglik (acc, acc_norm) | generate (DoRA's regex protocol)
    utility: str | None = None  # comma list of humaneval, gsm8k, hellaswag, truthfulqa (eval/utility_suite.py)
    utility_max_new_tokens: int = 512  # answer length for humaneval and gsm8k
    judge: str | None = None  # llama-guard:PATH | endpoint:URL[#model]
    # endpoint:URL[#MODEL]: generation on an OpenAI-compatible server (eval/endpoint.py); None: in-process.
    # Loss and multiple-choice scoring stay in-process. None is left out of the run key (runner._key).
    engine: str | None = None
    # the weights' dtype while evaluating: None is float32 on CPU and the aligned checkpoint's dtype on an accelerator
    # (a full fine-tune's rows too; float16 for bf16 on a GPU without it: eval.generate.default_eval_dtype; left out
    # of the run key); bfloat16 is several times faster on a CPU with bf16 instructions, not bit-equal
    dtype: str | None = None
    # waiting prompts join the rows in flight as rows end (eval/decode.py): faster, but a row's batch-mates change
    # its last bits, so it is part of the run key when true; false (the rows committed before it) decodes batch by
    # batch. `logitguard eval` turns it on unless --no-continuous-batching.
    continuous_batching: bool = False
    limit: int | None = None  # at most this many items per file
    max_new_tokens: int = 64
    batch_size: int = 16
    keywords: str = "qi2023"
    max_length: int = 256


EVAL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RunSpec:
    name: str
    train: dict = field(default_factory=dict)
    seeds: list[int] | None = None
    safelora: dict | None = None
    stages: list[dict] | None = None  # continual learning: train overrides per task, trained in order
    scenario: str | None = None  # its scenario's train settings are folded into `train` when the file loads


@dataclass
class Experiment:
    name: str
    variant: str | None
    description: str
    model: str
    gguf_file: str | None
    train: dict
    eval: EvalSpec
    runs: list[RunSpec]
    paper: dict
    path: Path
    target: dict | None = None  # what a run must reach (verdict.Target), for the report's verdict and frontier
    run_targets: dict = field(default_factory=dict)  # {run name: its scenario's target}, where it has one

    @property
    def id(self) -> str:
        return self.name + (f"--{self.variant}" if self.variant else "")


def find_experiment(name: str, root: str | Path = "experiments") -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = Path(root) / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    if name in PACKAGED:
        return PACKAGED[name]
    known = sorted(p.stem for p in Path(root).glob("*.yaml")) if Path(root).is_dir() else []
    known = sorted({*known, *PACKAGED})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)  # names are long: a loose cutoff
    hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(known)})"
    raise ConfigError(f"no experiment {name!r}: not a YAML file, and no {candidate}{hint}")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_keys(values: dict, allowed: set, where: str) -> None:
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(key, allowed)}")


def load_experiment(name: str, variant: str | None = None, root: str | Path = "experiments") -> Experiment:
    """Load and check an experiment (placeholders are left unresolved until `resolve`)."""
    path = find_experiment(name, root)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a mapping")
    _check_keys(raw, TOP_KEYS, str(path))
    _renamed_layers(raw, str(path))
    variants = raw.pop("variants", None) or {}
    own_scenarios = set(raw.get("scenarios") or {}) if isinstance(raw.get("scenarios"), dict) else set()
    if variant is not None:
        if variant not in variants:
            raise ConfigError(f"{path}: no variant {variant!r}; it has {sorted(variants)}")
        over = variants[variant]
        _check_keys(over, TOP_KEYS - {"variants"}, f"{path}: variant {variant}")
        _renamed_layers(over, f"{path}: variant {variant}")
        raw = _merge(raw, over)
    where = f"{path}" + (f" (variant {variant})" if variant else "")
    if not raw.get("model") and not raw.get("gguf_file"):
        raise ConfigError(f"{where}: 'model' is required")
    eval_values = raw.get("eval") or {}
    _check_keys(eval_values, {f.name for f in dataclasses.fields(EvalSpec)}, f"{where}: eval")
    if eval_values.get("dtype") not in (None, *EVAL_DTYPES):
        raise ConfigError(f"{where}: eval dtype {eval_values['dtype']!r} is not one of {', '.join(EVAL_DTYPES)}; "
                          "leave it out for float32 on CPU and the checkpoint's dtype on an accelerator")  # fmt: skip
    if not isinstance(eval_values.get("continuous_batching", False), bool):
        raise ConfigError(f"{where}: eval continuous_batching must be true or false, not "
                          f"{eval_values['continuous_batching']!r}")  # fmt: skip
    scenarios = _scenarios(raw.get("scenarios"), where)
    runs = []
    for i, run in enumerate(raw.get("runs") or []):
        if not isinstance(run, dict) or "name" not in run:
            raise ConfigError(f"{where}: runs[{i}] needs a 'name'")
        _check_keys(run, RUN_KEYS, f"{where}: runs[{i}] ({run['name']})")
        if run.get("scenario") is not None:
            if not isinstance(run["scenario"], str) or run["scenario"] not in scenarios:
                raise ConfigError(f"{where}: {run['name']}: no scenario {run['scenario']!r}"
                                  f"{suggest(str(run['scenario']), set(scenarios))}")  # fmt: skip
            run = {**run, "train": {**(scenarios[run["scenario"]].get("train") or {}), **(run.get("train") or {})}}
        runs.append(RunSpec(**run))
    if not runs:
        raise ConfigError(f"{where}: no runs")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: run names repeat: {names}")
    used = {r.scenario for r in runs}
    for name in set(scenarios) - own_scenarios:  # a variant's typo (`atack:`) would add a scenario nothing reads
        if name not in used:
            raise ConfigError(f"{where}: no run uses scenario {name!r}{suggest(name, {s for s in used if s})}")
    _check_target(raw.get("target"), names, f"{where}: target")
    scenario_targets = _scenario_targets(raw.get("target"), scenarios, names, where)
    exp = Experiment(
        name=path.stem,
        variant=variant,
        description=raw.get("description", ""),
        model=str(raw.get("model") or ""),
        gguf_file=raw.get("gguf_file"),
        train=raw.get("train") or {},
        eval=EvalSpec(**eval_values),
        runs=runs,
        paper=raw.get("paper") or {},
        path=path,
        target=dataclasses.asdict(Target.parse(raw["target"] or {}, where)) if "target" in raw else None,
        run_targets={r.name: scenario_targets[r.scenario] for r in runs if r.scenario in scenario_targets},
    )
    for run in runs:  # every run's training config must build (placeholders stand in for paths)
        if run.safelora is None:
            for stage in run.stages or [{}]:
                values = {"model": "m", "data": "d", **exp.train, **run.train, **stage, "output_dir": "o"}
                build_config(values, f"{where}: {run.name}")
        elif run.safelora.get("of") not in names:
            raise ConfigError(f"{where}: {run.name}: safelora.of must name another run, got {run.safelora}")
    return exp


def _scenarios(values, where: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ConfigError(f"{where}: scenarios must map each name to {{train: ..., target: ...}}")
    for name, scenario in values.items():
        _check_keys(scenario, SCENARIO_KEYS, f"{where}: scenario {name}")
        for key in SCENARIO_KEYS:
            if not isinstance(scenario.get(key) or {}, dict):
                raise ConfigError(f"{where}: scenario {name}: {key} must be a mapping, got {scenario[key]!r}")
    return values


def _check_target(target: dict | None, names: list[str], where: str) -> None:
    """The runs a target compares with must exist (a typo would leave every verdict "not measured")."""
    if not target:
        return
    if target.get("utility_of", "aligned base") not in ["aligned base", *names]:
        raise ConfigError(f"{where}.utility_of must be 'aligned base' or a run name, got {target['utility_of']!r}")
    if target.get("task_loss") and target.get("task_gain_of", "LoRA") not in names:
        raise ConfigError(f"{where}.task_gain_of must be a run name (whose task gain is the yardstick), "
                          f"got {target.get('task_gain_of', 'LoRA')!r}")  # fmt: skip


def _scenario_targets(target: dict | None, scenarios: dict, names: list[str], where: str) -> dict[str, dict]:
    """{scenario: the file's target with the scenario's merged over it, checked}, for the scenarios that have one."""
    out = {}
    for name, scenario in scenarios.items():
        if scenario.get("target") is None:
            continue
        if target is None:
            raise ConfigError(f"{where}: scenario {name} has a target but the file has none; state the file's "
                              "`target:` (the scenario's is merged over it)")  # fmt: skip
        merged = {**target, **scenario["target"]}
        _check_target(merged, names, f"{where}: scenario {name}: target")
        out[name] = dataclasses.asdict(Target.parse(merged, f"{where}: scenario {name}"))
    return out


def _renamed_layers(raw: dict, where: str) -> None:
    """Each layer of training keys (the file's, each run's, each stage's) with old names spelled as now, before the
    layers merge: a run's reg_weight then overrides a file-wide str_weight, as one name overrides itself."""
    if isinstance(raw.get("train"), dict):
        raw["train"] = renamed_keys(raw["train"], f"{where}: train")
    for name, scenario in (raw.get("scenarios") or {}).items() if isinstance(raw.get("scenarios"), dict) else ():
        if isinstance(scenario, dict) and isinstance(scenario.get("train"), dict):
            scenario["train"] = renamed_keys(scenario["train"], f"{where}: scenario {name}")
    for run in raw.get("runs") or []:
        if isinstance(run, dict) and isinstance(run.get("train"), dict):
            run["train"] = renamed_keys(run["train"], f"{where}: {run.get('name')}")
        if isinstance(run, dict) and isinstance(run.get("stages"), list):
            run["stages"] = [renamed_keys(s, f"{where}: {run.get('name')}") if isinstance(s, dict) else s
                             for s in run["stages"]]  # fmt: skip


def variants_of(name: str, root: str | Path = "experiments") -> list[str]:
    raw = yaml.safe_load(find_experiment(name, root).read_text())
    return sorted((raw.get("variants") or {}).keys())


class Placeholders:
    """Fills {toy}, {here} and {assets} in experiment strings; the toy model is built only when used."""

    def __init__(self, exp: Experiment, cache_dir: str | None = None, progress: bool = True):
        self.exp, self.progress = exp, progress
        self.cache_dir = str(Path(cache_dir).expanduser()) if cache_dir else default_cache_dir()
        self._toy: Path | None = None
        self._toy_dir: Path | None = None

    def toy(self) -> Path:
        if self._toy is None:
            from .toy import build_aligned_model

            quick = self.exp.model == "toy-quick"
            self._toy = build_aligned_model(Path(self.cache_dir), progress=self.progress, quick=quick)
        return self._toy

    def toy_dir(self) -> Path:
        """The toy model's folder, built or not: its name is the hash of everything that makes the weights."""
        from .toy.model import toy_model_dir

        if self._toy is None and self._toy_dir is None:  # a second to make the corpus it hashes: once
            self._toy_dir = toy_model_dir(Path(self.cache_dir), quick=self.exp.model == "toy-quick")
        return self._toy or self._toy_dir

    def __call__(self, value):
        return self._fill(value, build=True)

    def local(self, value):
        """Like calling it, but builds no toy model: {toy} is the folder the toy is (or will be) in."""
        return self._fill(value, build=False)

    def _fill(self, value, build: bool):
        if isinstance(value, dict):
            return {k: self._fill(v, build) for k, v in value.items()}
        if isinstance(value, list):
            return [self._fill(v, build) for v in value]
        if not isinstance(value, str) or "{" not in value:
            return value
        toy = self.toy if build else self.toy_dir
        here = self.exp.path.resolve().parent
        assets = os.environ.get("LOGITGUARD_ASSETS", str(here / "assets"))
        if "{toy_commonsense}" in value:
            from .toy.commonsense import write_toy_commonsense

            folder = write_toy_commonsense(Path(self.cache_dir) / "toy-commonsense")
            value = value.replace("{toy_commonsense}", str(folder))
        if "{toy_demo}" in value:  # the demo's mined files, made from the toy model (local(): named, not made)
            from .toy.demo_inputs import demo_inputs, folder_name

            made = demo_inputs(toy(), self.progress) if build else toy() / folder_name()
            value = value.replace("{toy_demo}", str(made))
        if "{toy}" in value:
            value = value.replace("{toy}", str(toy()))
        return value.replace("{here}", str(here)).replace("{assets}", assets)

    def model(self) -> str:
        if self.exp.gguf_file:
            from .models import gguf_folder

            return str(gguf_folder(self(self.exp.gguf_file), self.cache_dir, progress=self.progress))
        if self.exp.model in ("toy", "toy-quick"):
            return str(self.toy())
        return self(self.exp.model)

    def eval_spec(self) -> EvalSpec:
        return EvalSpec(**self(dataclasses.asdict(self.exp.eval)))
