"""Training time across a resume: each checkpoint records the seconds spent training up to it, so a run killed
and resumed reports the time of its whole training (less the work lost after the last checkpoint, which is
done again) rather than only the part after the resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from .files import checkpoint_step, write_json_atomic

FILE = "train_seconds.json"


class TrainClock(TrainerCallback):
    def __init__(self, resume: str | None):
        self.resumed_at = checkpoint_step(resume) if resume else 0
        # None: a checkpoint saved without the clock (an older run, or a kill between the two writes)
        self.before = _saved(resume) if resume else 0.0
        self.start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        # after the Trainer wrote the checkpoint; a checkpoint without this file is still resumed, untimed
        if state.is_world_process_zero and self.before is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / FILE, {"seconds": self.before + time.perf_counter() - self.start})

    def result(self, global_step: int) -> dict:
        """train_seconds (the whole run's when known, else this call's), steps_run, step_seconds (None when no
        step was timed: resumed at the last step with the earlier time unknown)."""
        here = time.perf_counter() - self.start
        steps_run = global_step - self.resumed_at
        if self.before is not None:
            seconds, timed = self.before + here, global_step
        else:
            seconds, timed = here, steps_run
        return {"train_seconds": seconds, "steps_run": steps_run, "step_seconds": seconds / timed if timed else None}


def _saved(checkpoint: str) -> float | None:
    try:
        return float(json.loads((Path(checkpoint) / FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
