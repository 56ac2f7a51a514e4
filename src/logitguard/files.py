"""Atomic file writes: results, manifests and logs are never seen half-written after a crash."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temp file in the same folder, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def file_sha256(path: str | Path, piece: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces (a GGUF model is gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a `checkpoint-N` folder was saved at."""
    return int(Path(path).name.rsplit("-", 1)[1])


def _is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG states), so a
    checkpoint whose state file parses was saved whole; a run killed while saving leaves one without it."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(folder: str | Path) -> list[Path]:
    """The Trainer's `checkpoint-<step>` folders in `folder`, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
    return sorted((p for p in found if p.name.rsplit("-", 1)[1].isdigit()), key=checkpoint_step)


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    complete = [p for p in checkpoints(folder) if _is_complete(p)]
    return complete[-1] if complete else None


def resume_checkpoint(folder: str | Path) -> str | None:
    """The checkpoint to resume from: the last one saved whole. Incomplete checkpoints after it (a run killed
    while saving) are removed with a warning, so that neither this run nor the Trainer's rotation picks them."""
    import shutil
    import warnings

    last = last_complete_checkpoint(folder)
    for p in checkpoints(folder):
        if (last is None or checkpoint_step(p) > checkpoint_step(last)) and not _is_complete(p):
            warnings.warn(f"{p} was not saved completely (a run killed while saving it); removing it", stacklevel=2)
            shutil.rmtree(p, ignore_errors=True)  # every rank may try: whichever comes first removes it
    return str(last) if last is not None else None


class ContentHashes:
    """sha256 of files and folders, remembered in `store` (a JSON file) by path, size and modification time, so
    a results key that names a 1 GB model costs one hash per change of the file, not one per run.

    A folder's hash covers the relative path and content of every file under it (hidden files left out: lock
    files and editor leftovers are not content). `None` for a path that is not here."""

    def __init__(self, store: str | Path | None = None):
        self.store = Path(store) if store else None
        self._known: dict | None = None
        self._changed = False

    def __call__(self, path: str | Path) -> str | None:
        path = Path(path).expanduser()
        if path.is_file():
            return "sha256:" + self._file(path)
        if path.is_dir():
            lines = [f"{p.relative_to(path).as_posix()}\0{self._file(p)}\n" for p in _visible_files(path)]
            return "tree:" + hashlib.sha256("".join(lines).encode()).hexdigest()
        return None

    def _file(self, path: Path) -> str:
        known = self._load()
        stat = path.stat()
        where, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        if known.get(where, {}).get("stamp") != stamp:
            known[where] = {"stamp": stamp, "sha256": file_sha256(path)}
            self._changed = True
        return known[where]["sha256"]

    def _load(self) -> dict:
        if self._known is None:
            try:
                self._known = json.loads(self.store.read_text()) if self.store else {}
            except (OSError, ValueError):
                self._known = {}  # no store yet, or a damaged one: hash again
        return self._known

    def save(self) -> None:
        if self.store and self._changed:
            write_json_atomic(self.store, self._known)
            self._changed = False


def _visible_files(folder: Path) -> list[Path]:
    found = (p for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_results(path: Path) -> dict:
    """The results file's rows so far (none if it is not there); a damaged file is refused, never overwritten."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"results file {path} is damaged ({e}); move it aside (it is not overwritten) and run again"
        ) from None
    if not isinstance(old, dict):
        raise ConfigError(f"results file {path} does not hold a results object; move it aside and run again")
    return old
