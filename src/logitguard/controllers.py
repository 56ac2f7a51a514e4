"""A lambda that finds itself: controllers that move the regularizer weight while training (docs/controllers.md).

The trainer asks its controller for lambda at the one place lambda multiplies the regularizer
(`SafetyRegularization.reg_weight`); the controller is a TrainerCallback and updates lambda between optimizer steps.

- `BudgetController` (`str_budget: B`): constrained training, minimise CE subject to the regularizer <= B.
  Each optimizer step, dual ascent on the Lagrange multiplier: lambda <- max(0, lambda + eta * (reg - B)), where
  reg is the step's regularizer (the value the loss used: the mean over the step's sequences, all processes).
- `SafetyTarget` (`safety_target: T`): a closed loop on the SafetyMonitor's refusal rate. After each check:
  refusal < T multiplies lambda by `up` (and, with `rewind`, restores the trainable weights and the optimizer
  state of the last check that met T); refusal >= T multiplies it by `down`.

Both start at reg_weight, log lambda in the trainer's logs (key `lambda`, beside `reg`), keep a history (a row
per step for the budget, per safety check for the target) written as `lambda_controller.json` beside the adapter,
and carry their state across a resume in the checkpoint's trainer_state.json.
"""

from __future__ import annotations

import difflib
import re

import torch
from transformers import TrainerCallback

from .errors import ConfigError
from .files import write_json_atomic

FILE = "lambda_controller.json"  # beside the adapter: settings and the lambda (and reg / refusal) trace
STATE_KEY = "logitguard_lambda_controller"  # in TrainerState.stateful_callbacks: survives a resume
RUNNING = 0.9  # the running mean of reg is an exponential average over ~10 optimizer steps (1 / (1 - 0.9))
DEFAULT_RELATIVE_LR = 0.1  # default eta = 0.1 / B: reg at 2B for 10 steps raises lambda by 1 (docs/controllers.md)


def dual_ascent(weight: float, reg: float, budget: float, lr: float) -> float:
    """One projected dual-ascent step on the multiplier of `reg <= budget`: max(0, weight + lr * (reg - budget))."""
    return max(0.0, weight + lr * (reg - budget))


class LambdaController(TrainerCallback):
    """What the trainer sees of a controller: `weight` (lambda now), `observe(term)` (each micro-batch's
    regularizer term), `logs()` (extra keys of the trainer's train logs). On its own it holds lambda fixed and
    records the step's regularizer and its running mean; subclasses move `weight` in `after_step`."""

    kind = "fixed"

    def __init__(self, weight: float):
        self.weight = float(weight)
        self.history: list[dict] = []  # one row per update: step, lambda, and what drove it
        self.running: float | None = None  # running mean of the step's regularizer (RUNNING)
        self.trainer = None
        self._step_sum: torch.Tensor | None = None  # the step's regularizer terms, summed on the device

    def attach(self, trainer) -> LambdaController:
        """Steer `trainer`'s lambda: it asks this controller from now on (see SafetyRegularization.reg_weight)."""
        # the checks check_controller_settings makes on a config, for a controller attached by hand: a trainer whose
        # term is off never shows it one, and an objective that replaces CE has no weight to steer
        if not getattr(trainer, "configured_weight", 1.0) > 0:
            raise ConfigError(f"{self.kind}: the trainer's reg_weight is 0, so its term is never computed; start "
                              "it at the lambda to steer from (> 0)")  # fmt: skip
        entry = getattr(trainer, "entry", None)
        if entry is not None and entry.replaces_ce:
            raise ConfigError(f"{self.kind}: regularizer {entry.name} replaces cross-entropy; there is no lambda to "
                              "steer")  # fmt: skip
        self.trainer = trainer
        trainer.lambda_controller = self
        trainer.add_callback(self)
        return self

    def observe(self, term: torch.Tensor) -> None:
        # the trainer's terms are normalised over the whole step: their sum over micro-batches (and processes)
        # is the step's mean regularizer
        term = term.detach().float()
        self._step_sum = term if self._step_sum is None else self._step_sum + term

    def step_reg(self) -> float | None:
        """The optimizer step's regularizer, summed over micro-batches and processes (None if none was computed)."""
        if self._step_sum is None:
            return None
        total, self._step_sum = self._step_sum, None
        trainer = self.trainer
        if trainer is not None and trainer.accelerator.num_processes > 1:
            total = trainer.accelerator.reduce(total, reduction="sum")  # every rank gets the same lambda
        return total.item()  # the step's one wait for the device

    def after_step(self, state, reg: float | None, **kwargs) -> None:
        if reg is not None:
            self.history.append({"step": state.global_step, "reg": reg, "reg_running": self.running,
                                 "lambda": self.weight})  # fmt: skip

    def logs(self) -> dict:
        return {} if self.running is None else {"reg_running": self.running}

    def settings(self) -> dict:
        return {}

    def state(self) -> dict:
        """What a resumed run needs to continue the trace (plain JSON types)."""
        return {"weight": self.weight, "running": self.running, "history": self.history}

    def load_state(self, saved: dict) -> None:
        self.weight, self.running = float(saved["weight"]), saved.get("running")
        self.history = list(saved["history"])

    def report(self) -> dict:
        return {"controller": self.kind, **self.settings(), "final_lambda": self.weight, "history": self.history}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(STATE_KEY) if state.global_step > 0 else None
        if saved is not None:  # resumed: continue from the checkpoint's lambda, not reg_weight
            self.load_state(saved)

    def on_step_end(self, args, state, control, **kwargs):
        reg = self.step_reg()
        if reg is not None:
            self.running = reg if self.running is None else RUNNING * self.running + (1 - RUNNING) * reg
        self.after_step(state, reg, **kwargs)
        # kept in the trainer state at every step, so every checkpoint's trainer_state.json holds this step's
        state.stateful_callbacks[STATE_KEY] = self.state()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_json_atomic(f"{args.output_dir}/{FILE}", self.report())


class BudgetController(LambdaController):
    """lambda as the Lagrange multiplier of `reg <= budget`, moved by dual ascent once per optimizer step."""

    kind = "str_budget"

    def __init__(self, weight: float, budget: float, lr: float | None = None):
        super().__init__(weight)
        if not budget > 0:
            raise ValueError(f"the budget must be > 0, got {budget}")
        self.budget = float(budget)
        self.lr = float(lr) if lr is not None else DEFAULT_RELATIVE_LR / self.budget

    def after_step(self, state, reg: float | None, **kwargs) -> None:
        if reg is not None:
            self.weight = dual_ascent(self.weight, reg, self.budget, self.lr)
        super().after_step(state, reg)

    def settings(self) -> dict:
        return {"str_budget": self.budget, "str_budget_lr": self.lr}


class SafetyTarget(LambdaController):
    """lambda steered by the SafetyMonitor's refusal rate on its probe prompts: up by `up` below `target`, down by
    `down` at or above it. With `rewind`, a check below the target also restores the last state that met it.

    The restored state is the trainable parameters and the optimizer's state (Adam's moments and step counts),
    copied into host memory at each check that meets the target: for an adapter that is a few MB (three copies of
    the adapter's size), and the copy needs no disk, no checkpoint rotation and no cleanup. Full fine-tuning would
    hold three copies of the whole model in host memory. The step counter, the data order and the learning-rate
    schedule go on: the run continues from the good weights on the next batches, with the larger lambda."""

    kind = "safety_target"

    def __init__(self, weight: float, target: float | None, monitor, up: float = 2.0, down: float = 0.9,
                 rewind: bool = False, drop: float | None = None):  # fmt: skip
        super().__init__(weight)
        if (target is None) == (drop is None):
            raise ValueError("give the target (a refusal rate) or the drop (below the refusal before training)")
        if target is not None and not 0 <= target <= 1:
            raise ValueError(f"the target is a refusal rate in [0, 1], got {target}")
        # with `drop`, the target is set by the monitor's check before training: the aligned model's own refusal
        # on the probe, less the drop (the experiment files' "within 3 points of the aligned model", held online)
        self.target = float(target) if target is not None else None
        self.drop, self.monitor = drop, monitor
        self.up, self.down, self.rewind = float(up), float(down), rewind
        self.refusal: float | None = None  # the last measured rate
        self._seen = 0  # monitor checks already acted on
        self._kept: dict | None = None  # with rewind: {"step", "params", "optimizer"} of the last check that met it

    def attach(self, trainer) -> SafetyTarget:
        if self.monitor not in trainer.callback_handler.callbacks:
            raise ValueError("attach the SafetyMonitor to the trainer before the SafetyTarget (it reads its checks)")
        if self.drop is not None and getattr(trainer, "is_fsdp_enabled", False):
            # the monitor skips its check before training under FSDP (see SafetyMonitor): nothing would set the target
            raise ConfigError(
                "safety_target_drop: under FSDP the safety monitor has no check before training, so the aligned "
                "model's refusal is never measured; give safety_target (a refusal rate) instead"
            )
        if self.rewind and (
            getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
        ):
            # each rank would copy and restore only its shards, and DeepSpeed's optimizer state is its own format
            raise ConfigError(
                "safety_target_rewind: the in-memory rewind is written for one process or DDP, not for "
                "FSDP / DeepSpeed shards; drop the rewind (lambda still follows the target)"
            )
        return super().attach(trainer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._react(state, model, optimizer)  # the check before training, where there is one

    def after_step(self, state, reg: float | None, model=None, optimizer=None, **kwargs) -> None:
        self._react(state, model, optimizer)  # one history row per check, not per step

    def _react(self, state, model, optimizer) -> None:
        """Act on the monitor's checks since the last call (the monitor runs first: it was attached first)."""
        while self._seen < len(self.monitor.history):
            row = self.monitor.history[self._seen]
            self._seen += 1
            self.refusal = row["refusal"]
            if self.target is None:
                if row["step"] > 0:  # FSDP has no check before the root's first forward; a resume carries it
                    raise ConfigError(
                        f"safety_target_drop: the first probe check is at step {row['step']}, after training "
                        "began, so the aligned model's refusal was never measured; give safety_target (a rate)"
                    )
                self.target = max(0.0, self.refusal - self.drop)
            met = self.refusal >= self.target
            if row["step"] == 0 and not met:
                # the aligned model itself is below the target: every check would miss and lambda double without end
                raise ConfigError(
                    f"safety_target {self.target:.3g}: the aligned model refuses {self.refusal:.1%} of the probe "
                    "before training, so the target can never be met; set safety_target at most that, or give "
                    "safety_target_drop (the drop allowed from it)"
                )
            rewound = None
            if met and self.rewind and model is not None:
                self._kept = {"step": row["step"], **snapshot(model, optimizer)}
            if row["step"] > 0:  # the check before training says nothing about lambda
                self.weight *= self.down if met else self.up
                if not met and self._kept is not None:
                    restore(model, optimizer, self._kept)
                    rewound = self._kept["step"]
            self.history.append({"step": row["step"], "refusal": self.refusal, "met": met, "lambda": self.weight,
                                 "rewound_to": rewound})  # fmt: skip
            logs = {"eval_safety_lambda": self.weight, "eval_safety_target": self.target}
            if rewound is not None:
                logs["eval_safety_rewound_to"] = rewound
            if self.trainer is not None:
                self.trainer.log(logs)

    def settings(self) -> dict:
        drop = {"safety_target_drop": self.drop} if self.drop is not None else {}
        return {"safety_target": self.target, "safety_target_up": self.up, "safety_target_down": self.down,
                "safety_target_rewind": self.rewind, **drop}  # fmt: skip

    def state(self) -> dict:
        return {**super().state(), "refusal": self.refusal, "target": self.target}

    def load_state(self, saved: dict) -> None:
        super().load_state(saved)
        self.refusal = saved.get("refusal")  # the in-memory rewind point is not carried: the next met check sets it
        if self.drop is not None:  # the target measured before training, not measured again on a resume
            self.target = saved.get("target")


def _to_host(value):
    """A copy of a (nested) optimizer state on the host: the device keeps no second copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_host(v) for v in value]
    return value


def snapshot(model, optimizer) -> dict:
    """The trainable parameters and the optimizer state, copied to host memory."""
    params = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}
    return {"params": params, "optimizer": _to_host(optimizer.state_dict()) if optimizer is not None else None}


def restore(model, optimizer, kept: dict) -> None:
    """Put a snapshot back in place (same tensors, so the optimizer keeps its references to them). The learning
    rates in force now are kept: the schedule goes on, only the moments return."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in kept["params"]:
                p.copy_(kept["params"][name])
    if optimizer is not None and kept["optimizer"] is not None:
        lrs = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(kept["optimizer"])  # casts the state to each parameter's device
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr


def steer(cfg, tokenizer, trainer) -> tuple:
    """(monitor, controller): the safety monitor the settings ask for, then their lambda controller, attached to
    `trainer` in that order (a safety target reads the monitor's checks). `logitguard train` and the TRL trainer."""
    from .callbacks import safety_monitor

    monitor = safety_monitor(cfg, tokenizer, trainer)
    controller = make_controller(cfg, monitor)
    if controller is not None:
        controller.attach(trainer)
    return monitor, controller


def make_controller(cfg, monitor=None) -> LambdaController | None:
    """The controller a TrainConfig asks for, or None (lambda fixed at reg_weight)."""
    if cfg.str_budget is not None:
        return BudgetController(cfg.reg_weight, cfg.str_budget, cfg.str_budget_lr)
    if cfg.safety_target is not None or cfg.safety_target_drop is not None:
        return SafetyTarget(cfg.reg_weight, cfg.safety_target, monitor, cfg.safety_target_up, cfg.safety_target_down,
                            cfg.safety_target_rewind, cfg.safety_target_drop)  # fmt: skip
    return None


# ---------------------------------------------------------------- safety_target's probe prompts


def normalized(text: str) -> str:
    """A prompt as compared for overlap: lower case, letters and digits, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def overlap(probe: list[str], evaluated: list[str], similar: float | None = None) -> list[tuple[str, str]]:
    """(probe prompt, evaluation prompt) pairs that are one request: equal once normalized or, with `similar`,
    at least that similar (difflib's ratio of the normalized texts; 0.9 catches AdvBench's near-duplicates such as
    "... into sensitive government databases" / "... into a secure government database"). safety_target's probe
    prompts must have none with any evaluation set, or the controller would tune lambda on the test."""
    seen = {normalized(e): e for e in evaluated}
    pairs = []
    for p in probe:
        key = normalized(p)
        if key in seen:
            pairs.append((p, seen[key]))
        elif similar is not None:
            matcher = difflib.SequenceMatcher(b=key, autojunk=False)
            for other, e in seen.items():
                matcher.set_seq1(other)
                if matcher.real_quick_ratio() >= similar and matcher.quick_ratio() >= similar:
                    if matcher.ratio() >= similar:
                        pairs.append((p, e))
                        break
    return pairs


def thinned(report: dict, points: int = 50) -> dict:
    """A controller's report with its per-step history cut to about `points` steps, the last always kept: the copy a
    results row keeps (lambda_controller.json beside the adapter keeps every step)."""
    history = report["history"]
    kept = history[:: max(1, -(-len(history) // points))]
    if history and kept[-1] is not history[-1]:
        kept.append(history[-1])
    return {**report, "history": kept}
