"""Training time across a resume (train_clock): the whole run's time when the checkpoint recorded it, this
call's steps only when it did not, nothing when no step was timed."""

import json
from types import SimpleNamespace

import pytest

from logitguard.train_clock import FILE, TrainClock


def _checkpoint(tmp_path, step, seconds=None):
    folder = tmp_path / f"checkpoint-{step}"
    folder.mkdir()
    if seconds is not None:
        (folder / FILE).write_text(json.dumps({"seconds": seconds}))
    return str(folder)


def test_a_fresh_run_times_every_step(tmp_path):
    timing = TrainClock(None).result(4)
    assert timing["steps_run"] == 4 and timing["step_seconds"] == pytest.approx(timing["train_seconds"] / 4)


def test_a_resumed_run_adds_the_time_its_checkpoint_recorded(tmp_path):
    timing = TrainClock(_checkpoint(tmp_path, 3, seconds=30.0)).result(5)
    assert timing["steps_run"] == 2 and 30.0 <= timing["train_seconds"] < 31.0
    assert timing["step_seconds"] == pytest.approx(timing["train_seconds"] / 5)


def test_a_checkpoint_without_the_time_times_only_the_steps_after_it(tmp_path):
    clock = TrainClock(_checkpoint(tmp_path, 3))
    timing = clock.result(5)
    assert timing["train_seconds"] < 1.0 and timing["step_seconds"] == pytest.approx(timing["train_seconds"] / 2)
    assert clock.result(3)["step_seconds"] is None  # resumed at the last step: no step timed
    # and its own checkpoints stay untimed rather than recording a part of the run as the whole
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=4)
    (tmp_path / "checkpoint-4").mkdir()
    clock.on_save(args, state, None)
    assert not (tmp_path / "checkpoint-4" / FILE).exists()


def test_each_checkpoint_records_the_time_up_to_it(tmp_path):
    clock = TrainClock(_checkpoint(tmp_path, 2, seconds=12.5))
    (tmp_path / "checkpoint-4").mkdir()
    clock.on_save(
        SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=4), None
    )
    saved = json.loads((tmp_path / "checkpoint-4" / FILE).read_text())["seconds"]
    assert 12.5 <= saved < 13.5
    assert TrainClock(str(tmp_path / "checkpoint-4")).before == saved
