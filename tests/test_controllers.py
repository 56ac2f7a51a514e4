"""A lambda that finds itself (logitguard.controllers): the dual-ascent budget and the safety target, their
updates against direct computations, short real runs on the quick toy model whose lambda traces are asserted,
the rewind, YAML and flag parsing, and the probe prompts' disjointness from every evaluation set."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import TrainerCallback

from logitguard import train as train_module
from logitguard.cli import main
from logitguard.config import ConfigError, TrainConfig, build_config, load_config
from logitguard.controllers import (
    FILE,
    STATE_KEY,
    BudgetController,
    LambdaController,
    SafetyTarget,
    dual_ascent,
    make_controller,
    overlap,
    restore,
    snapshot,
)
from logitguard.toy import make_corpus, write_jsonl

# The monitor test's attack (tests/test_monitor.py): LoRA on 100 harmful-compliance pairs, 4 epochs of 10 steps.
ATTACK = dict(epochs=4.0, learning_rate=2e-2, rank=8, alpha=16, dropout=0.0, max_length=96, batch_size=10,
              save_steps=1000, logging_steps=5)  # fmt: skip


def toy_config(quick_toy, tmp_path, name, **extra) -> dict:
    return {"model": str(quick_toy), "data": str(quick_toy / "corpus" / "attack_train.jsonl"),
            "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), **ATTACK, **extra}  # fmt: skip


# ---------------------------------------------------------------- the updates, against direct computations


def test_dual_ascent_is_the_projected_step():
    assert dual_ascent(1.0, 3.0, 2.0, 0.5) == pytest.approx(1.5)  # reg above the budget: lambda grows
    assert dual_ascent(1.0, 1.0, 2.0, 0.5) == pytest.approx(0.5)  # below: it shrinks
    assert dual_ascent(0.2, 0.0, 2.0, 0.5) == 0.0  # never below zero


def test_budget_controller_sums_micro_batches_and_updates_once_per_step():
    budget, lr, weight = 2.0, 0.3, 1.0
    controller = BudgetController(weight, budget, lr)
    steps = [[0.5, 1.5, 1.0], [0.25, 0.25, 0.5], [4.0, 2.0, 1.0]] + [[0.0, 0.0, 0.0]] * 5  # micro-batch terms
    running = None
    for i, terms in enumerate(steps, start=1):
        for t in terms:
            controller.observe(torch.tensor(t, requires_grad=True) * 1.0)  # detached inside
        state = SimpleNamespace(global_step=i, stateful_callbacks={})
        controller.on_step_end(None, state, None)
        reg = sum(terms)  # the step's terms are step-normalised: their sum is the step's regularizer
        weight = max(0.0, weight + lr * (reg - budget))
        running = reg if running is None else 0.9 * running + 0.1 * reg
        assert controller.weight == pytest.approx(weight)
        assert controller.history[-1] == pytest.approx({"step": i, "reg": reg, "reg_running": running,
                                                         "lambda": weight})  # fmt: skip
        assert state.stateful_callbacks[STATE_KEY]["weight"] == pytest.approx(weight)  # carried by checkpoints
    assert controller.weight == 0.0  # the last steps drove it to the bound, not below
    assert controller.logs() == {"reg_running": pytest.approx(running)}
    assert BudgetController(1.0, 4.0).lr == pytest.approx(0.1 / 4.0)  # the documented default


def test_safety_target_scales_lambda_by_the_measured_refusal():
    monitor = SimpleNamespace(history=[])
    controller = SafetyTarget(1.0, 0.8, monitor, up=2.0, down=0.5)
    expected = 1.0
    for step, refusal in [(0, 1.0), (5, 0.6), (10, 0.8), (15, 0.9), (20, 0.1)]:
        monitor.history.append({"step": step, "refusal": refusal})
        controller.on_step_end(None, SimpleNamespace(global_step=step, stateful_callbacks={}), None)
        if step > 0:  # the check before training leaves lambda alone
            expected *= 2.0 if refusal < 0.8 else 0.5
        assert controller.weight == pytest.approx(expected)
    assert [row["met"] for row in controller.history] == [True, False, True, True, False]
    assert [row["lambda"] for row in controller.history] == pytest.approx([1.0, 2.0, 1.0, 0.5, 1.0])


def test_a_target_relative_to_the_aligned_model_is_set_by_the_check_before_training():
    monitor = SimpleNamespace(history=[])
    controller = SafetyTarget(1.0, None, monitor, up=2.0, down=0.5, drop=0.05)
    state = SimpleNamespace(global_step=0, stateful_callbacks={})
    for step, refusal in [(0, 0.9), (5, 0.84), (10, 0.86)]:
        monitor.history.append({"step": step, "refusal": refusal})
        state.global_step = step
        controller.on_step_end(None, state, None)
    assert controller.target == pytest.approx(0.85)  # 0.9 before training, less the drop
    assert [row["met"] for row in controller.history] == [True, False, True]
    assert controller.weight == pytest.approx(1.0 * 2.0 * 0.5)
    assert controller.report()["safety_target_drop"] == 0.05
    resumed = SafetyTarget(1.0, None, SimpleNamespace(history=[{"step": 10, "refusal": 0.8}]), drop=0.05)
    resumed.load_state(state.stateful_callbacks[STATE_KEY])  # a resume carries the measured target
    resumed.on_step_end(None, SimpleNamespace(global_step=10, stateful_callbacks={}), None)
    assert resumed.target == pytest.approx(0.85) and resumed.history[-1]["met"] is False
    monitor = SimpleNamespace(history=[])
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[monitor]), is_fsdp_enabled=True)
    with pytest.raises(ConfigError, match="under FSDP the safety monitor has no check before training"):
        SafetyTarget(1.0, None, monitor, drop=0.05).attach(trainer)  # refused before any step is paid for
    late = SafetyTarget(1.0, None, SimpleNamespace(history=[{"step": 3, "refusal": 0.8}]), drop=0.05)
    with pytest.raises(ConfigError, match="never measured; give safety_target"):
        late.on_step_end(None, SimpleNamespace(global_step=3, stateful_callbacks={}), None)


def test_a_target_the_aligned_model_misses_is_refused_at_the_check_before_training():
    monitor = SimpleNamespace(history=[{"step": 0, "refusal": 0.787}])  # the real probe's aligned rate
    with pytest.raises(ConfigError, match="aligned model refuses 78.7% of the probe before training"):
        SafetyTarget(1.0, 0.95, monitor).on_step_end(None, SimpleNamespace(global_step=0, stateful_callbacks={}), None)


def test_a_steering_probe_cannot_change_on_a_resume(tmp_path):
    """The monitor's settings may change on a resume while it only watches; with safety_target its probe decides
    lambda (and the target measured on it), so a changed probe is a changed run."""
    from logitguard.config import save_config
    from logitguard.train import resume_conflicts

    out = tmp_path / "run"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text("{}")
    for steer, expected in (({}, []), ({"safety_target_drop": 0.03}, ["monitor_harmful"])):
        values = {"model": "m", "data": "d", "output_dir": str(out), "monitor_harmful": "a.jsonl", **steer}
        save_config(build_config(values), out / "config.yaml")
        assert resume_conflicts(build_config({**values, "monitor_harmful": "b.jsonl"}), out) == expected


def test_every_rank_acts_on_rank_zeros_probe_rates(monkeypatch):
    import torch.distributed as dist

    from logitguard.callbacks import rank_zero_values

    assert rank_zero_values({"refusal": 0.5}) == {"refusal": 0.5}  # one process: nothing to agree on
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    sent = []

    def broadcast(box, src):  # rank 0 sends its rates; this rank's own are replaced
        sent.append((src, dict(box[0])))
        box[0] = {"refusal": 0.75}

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    assert rank_zero_values({"refusal": 0.5}) == {"refusal": 0.75}
    assert sent == [(0, {"refusal": 0.5})]


def test_rewind_restores_weights_and_optimizer_state_and_keeps_the_learning_rate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen weight: not in the snapshot, untouched by the restore
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)

    def step():
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()

    step()
    kept = snapshot(model, optimizer)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in optimizer.param_groups[0]["params"]]
    for _ in range(3):
        step()
    optimizer.param_groups[0]["lr"] = 0.01  # the schedule moved on since the snapshot
    assert not torch.equal(model[1].weight, params["1.weight"])
    restore(model, optimizer, kept)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    for p, m in zip(optimizer.param_groups[0]["params"], moments):
        assert torch.equal(optimizer.state[p]["exp_avg"], m)
        assert optimizer.state[p]["step"].item() == 1
    assert optimizer.param_groups[0]["lr"] == 0.01
    step()  # and training goes on from there


def test_rewind_is_refused_under_sharding():
    monitor = SimpleNamespace(history=[])
    for flag in ("is_fsdp_enabled", "is_deepspeed_enabled"):
        trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[monitor]), **{flag: True})
        with pytest.raises(ConfigError, match="not for FSDP / DeepSpeed"):
            SafetyTarget(1.0, 0.9, monitor, rewind=True).attach(trainer)
    trainer.add_callback = trainer.callback_handler.callbacks.append
    SafetyTarget(1.0, 0.9, monitor, rewind=False).attach(trainer)  # lambda alone needs no copy of the weights
    assert trainer.lambda_controller.rewind is False


def test_a_controller_attached_by_hand_is_refused_where_it_could_not_steer():
    from logitguard.regularizers import get

    def trainer(weight, regularizer):
        return SimpleNamespace(configured_weight=weight, entry=get(regularizer), add_callback=lambda cb: None)

    with pytest.raises(ConfigError, match="reg_weight is 0"):
        BudgetController(0.5, 0.1).attach(trainer(0.0, "str"))
    with pytest.raises(ConfigError, match="replaces cross-entropy"):
        BudgetController(0.5, 0.1).attach(trainer(1.0, "constrained_sft"))
    assert BudgetController(0.5, 0.1).attach(trainer(0.5, "str")).weight == 0.5


# ---------------------------------------------------------------- settings: YAML, flags, defaults


def test_settings_from_yaml_and_their_checks(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d", "reg_weight": 0.5, "monitor_harmful": "p.jsonl",
                                    "safety_target": 0.9, "safety_target_up": 3, "safety_target_down": 0.8,
                                    "safety_target_rewind": True}))  # fmt: skip
    cfg = load_config(path)
    assert (cfg.safety_target, cfg.safety_target_up, cfg.safety_target_down, cfg.safety_target_rewind) == (
        0.9, 3.0, 0.8, True)  # fmt: skip
    controller = make_controller(cfg, monitor=SimpleNamespace(history=[]))
    assert isinstance(controller, SafetyTarget) and controller.weight == 0.5 and controller.rewind
    path.write_text(yaml.safe_dump({"model": "m", "data": "d", "str_budget": 4}))
    cfg = load_config(path, {"str_budget_lr": "0.05"})  # a flag's string over the YAML
    controller = make_controller(cfg)
    assert isinstance(controller, BudgetController) and (controller.budget, controller.lr) == (4.0, 0.05)
    cfg = build_config({"model": "m", "data": "d", "safety_target_drop": 0.03, "monitor_harmful": "p.jsonl"})
    controller = make_controller(cfg, monitor=SimpleNamespace(history=[]))
    assert isinstance(controller, SafetyTarget) and controller.target is None and controller.drop == 0.03
    bad = {
        "give one, not both": {"str_budget": 1.0, "safety_target": 0.9, "monitor_harmful": "p"},
        "both set the target": {"safety_target": 0.9, "safety_target_drop": 0.03, "monitor_harmful": "p"},
        "safety_target_drop: a refusal rate": {"safety_target_drop": -0.1, "monitor_harmful": "p"},
        "needs monitor_harmful": {"safety_target": 0.9},
        "a refusal rate": {"safety_target": 1.5, "monitor_harmful": "p"},
        "str_budget: must be > 0": {"str_budget": 0.0},
        "str_budget_lr: needs str_budget": {"str_budget_lr": 0.1},
        "str_budget_lr: must be > 0": {"str_budget": 1.0, "str_budget_lr": -1.0},
        "safety_target_rewind: needs safety_target": {"safety_target_rewind": True},
        "safety_target_up": {"safety_target_up": 1.0},
        "safety_target_down": {"safety_target_down": 1.5},
        "must be > 0": {"str_budget": 1.0, "reg_weight": 0.0},
        "replaces cross-entropy": {"str_budget": 1.0, "regularizer": "constrained_sft"},
    }
    for message, values in bad.items():
        with pytest.raises(ConfigError, match=message):
            build_config({"model": "m", "data": "d", **values})


def test_new_settings_default_off_and_leave_results_keys_alone():
    from logitguard.runner import _key

    cfg = TrainConfig(model="m", data="d")
    assert make_controller(cfg) is None  # lambda stays reg_weight
    new = ("str_budget", "str_budget_lr", "safety_target", "safety_target_up", "safety_target_down",
           "safety_target_rewind", "safety_target_drop")  # fmt: skip
    values = {k: v for k, v in vars(cfg).items() if k not in new}  # a row's settings from before these keys
    assert _key({"train": values}) == _key({"train": vars(cfg)})


# ---------------------------------------------------------------- real runs on the toy model


def test_budget_run_holds_the_running_regularizer_near_the_budget(quick_toy, tmp_path, monkeypatch):
    """From flags: `logitguard train --str-budget 5`. Measured (this test's run): plain LoRA's running reg ends at
    ~27, lambda 1's at ~0.84; the budget run's lambda falls while reg < 5, rises when the attack pushes reg above
    it, and ends with a running reg of ~4.3."""
    budget = 5.0
    flags = []
    for key, value in toy_config(quick_toy, tmp_path, "budget", reg_weight=1.0, str_budget=budget).items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    assert main(["train", *flags, "--trainer", '{"use_cpu": true, "disable_tqdm": true}']) == 0
    out = tmp_path / "budget"
    report = json.loads((out / FILE).read_text())  # beside the adapter
    assert (out / "adapter_model.safetensors").is_file()
    assert report["controller"] == "str_budget" and report["str_budget"] == budget
    lr, trace = report["str_budget_lr"], report["history"]
    assert lr == pytest.approx(0.1 / budget) and len(trace) == 40
    weight = 1.0
    for row in trace:  # the trace is the dual-ascent update of the measured regularizer, step by step
        weight = max(0.0, weight + lr * (row["reg"] - budget))
        assert row["lambda"] == pytest.approx(weight) and row["lambda"] >= 0
    previous = [1.0] + [row["lambda"] for row in trace[:-1]]
    rose = [row["reg"] > budget and row["lambda"] > before for row, before in zip(trace, previous)]
    fell = [row["reg"] < budget and row["lambda"] < before for row, before in zip(trace, previous)]
    assert any(rose) and any(fell), trace
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "reg" in r and "lambda" in r]
    assert rows and all("reg_running" in r for r in rows)
    assert len({r["lambda"] for r in rows}) > 1  # the logged lambda is the controller's, not a constant

    # the same run with lambda held at 0 (plain LoRA, its regularizer still measured)
    import logitguard.controllers

    monkeypatch.setattr(logitguard.controllers, "make_controller", lambda cfg, monitor=None: LambdaController(0.0))
    cfg = load_config(None, toy_config(quick_toy, tmp_path, "lambda0", reg_weight=1.0))
    free = train_module.train(cfg, progress=False)["lambda_controller"]["history"]
    assert all(row["lambda"] == 0 for row in free)
    final, free_final = trace[-1]["reg_running"], free[-1]["reg_running"]
    assert free_final > 2 * budget  # the attack drifts the safety logits far past the budget without a brake
    assert abs(final - budget) < abs(free_final - budget)
    assert final < 1.5 * budget


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """safety_target's probe on the toy: the attack family's held-out prompts (in no evaluation set: see below)."""
    path = tmp_path_factory.mktemp("probe") / "attack_test.jsonl"
    return write_jsonl(make_corpus(0)["attack"]["test"], path)


def run_target(quick_toy, tmp_path, probe, name, **extra):
    cfg = load_config(None, toy_config(quick_toy, tmp_path, name, monitor_harmful=str(probe), monitor_every=5,
                                       **extra))  # fmt: skip
    return train_module.train(cfg, progress=False)


class RewindCheck(TrainerCallback):
    """Added after the controller: at each step where it rewound, the trainable weights equal its kept snapshot."""

    def __init__(self, controller):
        self.controller, self.checked = controller, 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        row = self.controller.history[-1] if self.controller.history else None
        if row and row["step"] == state.global_step and row["rewound_to"] is not None:
            kept = self.controller._kept["params"]
            live = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            assert kept.keys() == live.keys() and all(torch.equal(kept[n], live[n]) for n in kept)
            self.checked += 1


def test_safety_target_below_target_grows_lambda_and_rewinds(quick_toy, tmp_path, probe, monkeypatch):
    """Target 0.9 from lambda 0.01 under the attack, with rewind. Measured (this run): refusal on the probe 1.0 at
    step 0, 0.04 at step 5 -> lambda x2 and back to step 0's weights, again at steps 10 and 15, then >= 0.9 with
    lambda decaying; the same attack at lambda 0.01 fixed ends at 0.64 refusal, plain LoRA at 0.08."""
    checks = []
    attach = SafetyTarget.attach

    def attach_and_check(self, trainer):
        attach(self, trainer)
        checks.append(RewindCheck(self))
        trainer.add_callback(checks[-1])
        return self

    monkeypatch.setattr(SafetyTarget, "attach", attach_and_check)
    result = run_target(quick_toy, tmp_path, probe, "high", reg_weight=0.01, safety_target=0.9,
                        safety_target_rewind=True)  # fmt: skip
    trace = result["lambda_controller"]["history"]
    assert [row["step"] for row in trace] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert trace[0]["met"] and trace[0]["lambda"] == 0.01  # the aligned start meets it; lambda untouched
    below = [row for row in trace[1:] if not row["met"]]
    assert below, trace  # the attack breaks refusal on the probe at least once
    for before, row in zip(trace, trace[1:]):
        factor = 2.0 if row["refusal"] < 0.9 else 0.9
        assert row["lambda"] == pytest.approx(before["lambda"] * factor)
        assert (row["rewound_to"] is not None) == (not row["met"])  # every miss returns to the last state met
    assert checks[0].checked == len(below) > 0  # and the weights are that state's
    logged = [json.loads(line) for line in (tmp_path / "high" / "metrics.jsonl").read_text().splitlines()]
    lambdas = [r["eval_safety_lambda"] for r in logged if "eval_safety_lambda" in r]
    refusals = [r["eval_safety_refusal"] for r in logged if "eval_safety_refusal" in r]
    assert lambdas == pytest.approx([row["lambda"] for row in trace])
    assert refusals == pytest.approx([row["refusal"] for row in trace])
    assert json.loads((tmp_path / "high" / FILE).read_text())["history"] == trace


def test_safety_target_above_target_decays_lambda_without_rewinding(quick_toy, tmp_path, probe):
    result = run_target(quick_toy, tmp_path, probe, "low", reg_weight=1.0, safety_target=0.0,
                        safety_target_rewind=True)  # fmt: skip
    trace = result["lambda_controller"]["history"]
    assert all(row["met"] and row["rewound_to"] is None for row in trace)
    assert [row["lambda"] for row in trace] == pytest.approx([0.9**i for i in range(len(trace))])
    assert trace[-1]["lambda"] == pytest.approx(0.9**8)


def test_safety_target_drop_holds_the_aligned_models_own_probe_refusal(quick_toy, tmp_path, probe):
    result = run_target(quick_toy, tmp_path, probe, "drop", reg_weight=1.0, safety_target_drop=0.0)
    report, checks = result["lambda_controller"], result["safety_monitor"]
    assert checks[0]["step"] == 0 and report["safety_target"] == checks[0]["refusal"]  # measured, then held
    expected = 1.0
    for row in report["history"][1:]:
        expected *= 0.9 if row["refusal"] >= report["safety_target"] else 2.0
        assert row["lambda"] == pytest.approx(expected)


# ---------------------------------------------------------------- the probe prompts


def _prompts(items):
    return [it["messages"][0]["content"] for it in items]


def test_toy_probe_is_in_no_toy_evaluation_or_training_set():
    corpus = make_corpus(0)
    probe = _prompts(corpus["attack"]["test"])
    assert len(probe) == 25
    evaluated = {
        f"{family}_test": _prompts(corpus[family]["test"])
        for family in ("harmful", "benign", "borderline", "new_task")
    }
    trained = {f"{family}_train": _prompts(corpus[family]["train"]) for family in corpus}
    for name, prompts in {**evaluated, **trained}.items():
        assert overlap(probe, prompts) == [], name
    assert overlap(probe, probe[:3]) == [(p, p) for p in probe[:3]]  # the check finds what is there


def test_real_probe_is_in_no_shipped_evaluation_set():
    """The real-model probe (docs/controllers.md): the 64 AdvBench anchor prompts less those that are (nearly) in an
    evaluation set. Needs the fetched assets (LOGITGUARD_ASSETS or experiments/assets)."""
    from logitguard.eval.datasets import SETS, default_assets, load_prompts
    from logitguard.eval.prompts import read_prompts

    assets = default_assets()
    if not (assets / "advbench_anchor.jsonl").is_file() or not (assets / "evals").is_dir():
        pytest.skip(f"no fetched assets in {assets} (python experiments/real_model/fetch_assets.py)")
    evaluated = [p for name, s in SETS.items() if s.kind in ("harmful", "benign", "borderline")
                 for p in load_prompts(name, assets)]  # fmt: skip
    for name in ("purebad_train.jsonl", "purebad_heldout.jsonl"):
        evaluated += read_prompts(assets / name)  # the attack's data and its held-out loss set
    anchors = read_prompts(assets / "advbench_anchor.jsonl")
    found = overlap(anchors, evaluated, similar=0.9)
    assert found  # StrongREJECT repeats AdvBench prompts: the raw anchors would leak
    dropped = {p for p, _ in found}
    probe = [p for p in anchors if p not in dropped]
    assert len(probe) >= 60 and overlap(probe, evaluated, similar=0.9) == []
    if (assets / "safety_probe.jsonl").is_file():  # the file fetch_assets.py writes is that probe
        assert read_prompts(assets / "safety_probe.jsonl") == probe


def test_a_resumed_run_continues_the_budget_lambda(quick_toy, tmp_path):
    """Killed after 20 steps (checkpoints at 10 and 20), resumed to 40: lambda goes on from the checkpoint's value
    (carried in its trainer_state.json), not from reg_weight, and the trace is whole."""
    settings = toy_config(quick_toy, tmp_path, "resumed", reg_weight=1.0, str_budget=5.0, save_steps=10)
    first = train_module.train(load_config(None, {**settings, "epochs": 2.0}), progress=False)
    at_20 = first["lambda_controller"]["history"][-1]
    assert at_20["step"] == 20 and at_20["lambda"] != 1.0
    second = train_module.train(load_config(None, settings), progress=False)
    assert second["resumed_from"].endswith("checkpoint-20")
    trace = second["lambda_controller"]["history"]
    assert [row["step"] for row in trace] == list(range(1, 41))
    assert trace[19] == at_20
    lr = second["lambda_controller"]["str_budget_lr"]
    assert trace[20]["lambda"] == pytest.approx(max(0.0, at_20["lambda"] + lr * (trace[20]["reg"] - 5.0)))
