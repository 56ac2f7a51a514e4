"""Reference-cache lookup by content: for batches that carry no `example_idx` (TRL's collators, a user's own).

Each cached example is keyed by a hash of its token ids; a batch row's key is the hash of its unpadded ids. A row
that is not in the cache (tokenized differently from the data the cache was built from, truncated, packed) is an
error that says so, never a silent wrong reference. The rows are hashed on the host: a batch's ids and mask come
over in one transfer (per optimizer step when the trainer calls `prepare`), never one per row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from .cache import RIGHT_PADDING, take_ahead
from .reference import ReferenceError


def token_key(ids) -> bytes:
    """Hash of a sequence of token ids (a list or a 1-D tensor)."""
    return _digest(torch.as_tensor(ids, dtype=torch.int64).cpu().numpy())


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array, dtype=np.int64).tobytes(), digest_size=16).digest()


class KeyedReference:
    """Wraps a reference that reads `example_idx` (a CachedReference) so batches are matched by their token ids.

    `examples`: the tokenized examples the cache was built from, in cache order (dicts or rows with input_ids).
    """

    def __init__(self, reference, examples):
        self.reference = reference
        self.policy_from_full_logits = getattr(reference, "policy_from_full_logits", False)
        self.index: dict[bytes, int] = {}
        for i, ex in enumerate(examples):
            self.index.setdefault(token_key(ex["input_ids"]), i)
        self._ahead: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a batch's input_ids, its reference): prepare

    def prepare(self, batches: list[dict]) -> None:
        """Match one optimizer step's micro-batches to cached examples and read their references ahead, with one
        transfer of their ids and masks to the host (the trainer calls this before the step's first forward)."""
        self._ahead = []
        if batches and all("example_idx" in b for b in batches):
            self.reference.prepare(batches)  # batches that carry their index need no matching
            return
        if not batches or any("example_idx" in b or "attention_mask" not in b for b in batches):
            return  # __call__ handles these
        if not hasattr(self.reference, "read"):
            return  # a reference that reads only `example_idx` batches: __call__ matches each batch
        flat = [t for b in batches for t in (b["input_ids"].flatten(), b["attention_mask"].flatten())]
        host = torch.cat([t.to(flat[0].device, torch.int64) for t in flat]).cpu()  # the step's one transfer
        start = 0
        for b in batches:
            shape = b["input_ids"].shape
            ids, mask = host[start : start + shape.numel()], host[start + shape.numel() : start + 2 * shape.numel()]
            start += 2 * shape.numel()
            idx, lengths = self._match(ids.view(shape), mask.view(shape))
            self._ahead.append((b["input_ids"], self.reference.read(idx, lengths, shape[1], b["input_ids"].device)))

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if "example_idx" in batch:
            return self.reference(model, batch)
        ready = take_ahead(self, batch)
        if ready is not None:
            return ready
        ids, mask = torch.stack([batch["input_ids"], batch["attention_mask"].to(batch["input_ids"].dtype)]).cpu()
        idx, lengths = self._match(ids, mask)
        if not hasattr(self.reference, "read"):  # any callable that reads `example_idx` (the documented contract)
            return self.reference(model, {**batch, "example_idx": torch.tensor(idx, device=batch["input_ids"].device)})
        return self.reference.read(idx, lengths, ids.shape[1], batch["input_ids"].device)

    def _match(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[int], list[int]]:
        """Cached example index and length of each row of host tensors `ids`, `mask` (B, T), in numpy (host)."""
        ids, mask = ids.numpy(), mask.numpy().astype(bool)
        lengths = mask.sum(axis=1)  # (B,)
        if not (mask == (np.arange(mask.shape[1])[None, :] < lengths[:, None])).all():  # each row: ones, then zeros
            raise ReferenceError(RIGHT_PADDING)
        idx = []
        for row, n in zip(ids, lengths.tolist()):
            key = _digest(row[:n])
            if key not in self.index:
                raise ReferenceError(
                    f"a batch row of {n} tokens is not in the reference cache: the cache was built from other "
                    "tokenized data (another template, max length or truncation); build it from the dataset the "
                    "trainer reads"
                )
            idx.append(self.index[key])
        return idx, lengths.tolist()
