"""The reference cache: K safety logits per token of the frozen aligned model, computed once per dataset.

Layout of a cache folder:
  manifest.json            fingerprint, its components, shapes, dtype, `complete`, per shard its sha256 and
                           size in bytes, and the sha256 of the rest of the manifest
  shard-00000.safetensors  `logits` (sum of lengths, K) and `offsets` (n + 1,) for examples
                           [s * shard_size, (s + 1) * shard_size), with the token ids it holds in its metadata
  .lock                    held (flock) by the one run that is building or repairing the cache

The fingerprint covers the model weights (every byte) and its config (rope scaling, logit soft-capping or
scaling change the logits with the same weights), the tokenizer, the chat template, the tokenized data
(which also pins max length and template), the max length and the storage dtype, so a cache is reused across
epochs, lambdas, ranks and methods on the same data and never used for anything else. The token ids are not
part of the key: the cache records the ids it holds, serves any subset of them (STR on "I" and on "cannot"
share one cache), and is rebuilt with the union when a run asks for an id it lacks.

Per-token extras, for the regularizers whose reference is not K logits (`extras` in the manifest, computed in the
same pass as the logits): `label_logp` (sum of lengths,) the log-prob of each position's next token (token-wise
constrained SFT), and `topk` k: `topk_ids` (sum of lengths, k) int32, `topk_logp` (sum of lengths, k) and
`tail_logmass` (sum of lengths,) (the top-k KL). Like the ids they are not part of the key: a cache is extended
when a run asks for an extra it lacks, and a cache with a larger k serves a smaller one.

Nothing damaged is used. Every shard's sha256 is recorded in the manifest and checked before the shard is read
(once per shard per process; a build checks the shards, a reader checks what the build did not). A build
rebuilds a shard that fails its check (a disk error, a partial copy, a truncated file) and rebuilds the whole
cache when manifest.json does not parse; a reader refuses with an error naming the folder. Shards are written
to unique temporary files and renamed, so a killed build leaves only whole shards (and stale `*.tmp` files,
removed by the next build) and resumes from the shards it finished. Two runs that build one cache at once
take turns: the second waits for the first's lock, then finds the cache built. Under `accelerate launch` each
rank builds and checks every world_size-th shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .data import ChatCollator
from .files import write_json_atomic
from .models import process_state
from .reference import ReferenceError, frozen_safety_logits, frozen_stats

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent builds of one cache folder are not guarded there
    fcntl = None

CACHE_VERSION = 2  # 2: per-shard checksums in the manifest, full-weight and config fingerprint
KINDS = ("logits", "label_logp", "topk")  # what a CachedReference reads
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}  # as safetensors names them
MANIFEST = "manifest.json"
LOCK = ".lock"

# Config fields that do not change the logits (where the model came from, what it was saved with, forward-call
# flags, the default dtype, which the weights' own dtypes already cover): left out of the fingerprint, so the
# same model loaded from another path still finds its cache.
CONFIG_NOT_LOGITS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
    }
)
_HASH_PIECE = 64 << 20  # bytes of a weight hashed at a time (and copied to the host at a time from a GPU)


class DamagedCacheError(ReferenceError):
    """A cache file does not match what was written (checksum, size, or a manifest that does not parse)."""


class CacheFolder(type(Path())):
    """The folder build_reference_cache returns: a Path that also carries the fingerprint it was built for, so
    `CachedReference(build_reference_cache(...))` checks the cache against it without being told."""

    fingerprint: str | None = None
    built: bool = False  # whether this call computed shards (False: a complete cache was found and reused)


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's raw bytes, computed on the host: a tensor on an accelerator is copied over in
    64 MiB pieces, so host memory stays bounded. Bytes are bytes on every device, so the digest is too."""
    if t.device.type == "meta":
        raise ReferenceError("cannot fingerprint weights on the meta device (offloaded); load the model fully")
    raw = t.detach().reshape(-1).view(torch.uint8)  # reshape copies only a non-contiguous tensor
    h = hashlib.sha256()
    for start in range(0, raw.numel(), _HASH_PIECE):
        piece = raw[start : start + _HASH_PIECE]
        h.update(piece.cpu().numpy() if piece.device.type != "cpu" else piece.numpy())
    return h.digest()


def _strip_config(d):
    if isinstance(d, dict):
        return {k: _strip_config(v) for k, v in d.items() if k not in CONFIG_NOT_LOGITS}
    return d


def config_fingerprint(model: nn.Module) -> str:
    """Hash of the model's class and config, less the fields that do not change the logits."""
    config = getattr(model, "config", None)
    values = _strip_config(config.to_dict()) if hasattr(config, "to_dict") else {}
    return _sha(type(model).__name__, json.dumps(values, sort_keys=True, default=str))


def _refuse_partitioned(model: nn.Module) -> None:
    """DeepSpeed ZeRO-3 leaves each process an empty tensor in place of a partitioned weight (marked with ds_id,
    ds_status, ds_shape): hashing it would key the cache to nothing, and the cache's forward would run on nothing."""
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status") or (p.numel() == 0 and hasattr(p, "ds_shape")):
            raise ReferenceError(
                f"cannot fingerprint the model: {name} is partitioned across processes (DeepSpeed ZeRO-3, full "
                f"shape {tuple(getattr(p, 'ds_shape', ()))}); build the reference cache from the whole model (load it "
                "before the training arguments exist, as logitguard train does), or use reference: online"
            )


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, shape, dtype and every byte of its values.

    Every element counts, so a one-element edit changes the key (a strided sample and a rounded sum did not).
    Hashing runs at about 1.7 GB/s per CPU core, tensors in parallel threads (hashlib releases the GIL): 0.7 s for
    a Qwen2.5-0.5B-shaped fp32 model on 2 cores, where the float64 sums and samples it replaces took 2.9 s.
    """
    _refuse_partitioned(model)
    # An adapter disabled while the cache is built (the TRL integration) is left out, and its wrapper's names are
    # mapped to the plain model's, so the key is the aligned model's either way.
    items = sorted(
        (name.replace(".base_layer.", "."), t) for name, t in model.state_dict().items() if "lora_" not in name
    )
    tensors = [t for _, t in items if isinstance(t, torch.Tensor)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = iter(list(pool.map(_tensor_digest, tensors)))
    h = hashlib.sha256()
    for name, t in items:
        if isinstance(t, torch.Tensor):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(next(digests))
        else:  # an extra state that is not a tensor
            h.update(f"{name}|{t!r}|".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary, model, normalizer and pre-tokenizer; not the padding and truncation settings, which
    a tokenizer call with padding=True changes in place (generation before a build would force a rebuild)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(text, json.dumps(tokenizer.all_special_tokens))


def data_fingerprint(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(torch.as_tensor(ex["input_ids"], dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def fingerprint_components(model, tokenizer, examples, max_length, dtype: str) -> dict:
    return {
        "model": model_fingerprint(model),
        "model_config": config_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": _sha(str(getattr(tokenizer, "chat_template", "") or "")),
        "data": data_fingerprint(examples),
        "max_length": int(max_length),
        "dtype": dtype,
        "version": CACHE_VERSION,
    }


def fingerprint(components: dict) -> str:
    return _sha(json.dumps(components, sort_keys=True))


# --- integrity -------------------------------------------------------------------------------------------


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _sealed(manifest: dict) -> dict:
    """The manifest with the sha256 of the rest of it, so that any change to it is seen, even one that parses."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return {**body, "checksum": _sha(json.dumps(body, sort_keys=True))}


def _load_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None if there is none. DamagedCacheError if it does not parse, lacks a field,
    or does not match its own checksum or its fingerprint that of its components (an edit or a disk error)."""
    try:
        text = (folder / MANIFEST).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedCacheError(f"reference cache {folder}: manifest.json cannot be read ({e})") from None
    try:
        m = json.loads(text)
        well_formed = (
            isinstance(m, dict)
            and _sealed(m) == m
            and isinstance(m.get("components"), dict)
            and m.get("fingerprint") == fingerprint(m["components"])
            and isinstance(m.get("token_ids"), list)
            and all(isinstance(i, int) for i in m["token_ids"])
            and isinstance(m.get("shard_size"), int)
            and m["shard_size"] > 0
            and isinstance(m.get("num_examples"), int)
            and isinstance(m.get("shards", {}), dict)
        )
    except ValueError as e:
        raise DamagedCacheError(f"reference cache {folder}: manifest.json is not valid JSON ({e})") from None
    if not well_formed:
        raise DamagedCacheError(f"reference cache {folder}: manifest.json is damaged (fields missing or altered)")
    return m


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# path -> (stamp, sha256) of the shards this process has checked; a file whose stamp changed is checked again
_VERIFIED: dict[str, tuple] = {}


def _verify_shard(path: Path, record: dict | None) -> bool:
    """Whether the file holds exactly the bytes the manifest recorded; hashed once per process per file."""
    if not isinstance(record, dict):
        return False
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return False
    if before.st_size != record.get("bytes"):
        return False  # truncated or grown: no need to hash
    if _VERIFIED.get(str(path.absolute())) == (_stamp(before), record.get("sha256")):
        return True
    try:
        digest = _file_sha256(path)
        after = os.stat(path)
    except OSError:
        return False
    if digest != record.get("sha256") or _stamp(after) != _stamp(before):
        return False
    _VERIFIED[str(path.absolute())] = (_stamp(after), digest)
    return True


def _write_shard(folder: Path, name: str, data: bytes) -> dict:
    """Write a shard under a unique temporary name, then rename it into place; return its manifest record."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _VERIFIED[str((folder / name).absolute())] = (_stamp(os.stat(folder / name)), record["sha256"])
    return record


def _adopt(path: Path, token_ids: list[int], lengths: list[int], dtype: str, extras: dict) -> dict | None:
    """A manifest record for a shard a killed build finished before it could record it, if the shard is whole
    and holds what this build would write (same ids, dtype and example lengths); None otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads((f.metadata() or {}).get("token_ids", "null"))
            held_extras = json.loads((f.metadata() or {}).get("extras", "{}"))
            offsets = f.get_tensor("offsets")
            logits = f.get_slice("logits")
            shape, kind = logits.get_shape(), logits.get_dtype()
    except Exception:  # any parse error: the shard is rebuilt
        return None
    expected = torch.cumsum(torch.as_tensor([0, *lengths], dtype=torch.int64), 0)
    whole = (
        ids == list(token_ids)
        and held_extras == extras
        and offsets.shape == expected.shape
        and torch.equal(offsets, expected)
        and list(shape) == [int(expected[-1]), len(token_ids)]
        and kind == SAFETENSORS_DTYPES[dtype]
    )
    if not whole:
        return None
    return {"sha256": _file_sha256(path), "bytes": path.stat().st_size}


@contextlib.contextmanager
def _build_lock(folder: Path, state, progress: bool = True):
    """Hold the cache folder's lock while this run builds or repairs it (the main process takes it for all
    ranks). Another run that holds it is waited for, once announced. Stale temporary files of a killed build are
    removed once the lock is held: no one else is writing then."""
    handle = None
    if state.is_main_process and fcntl is not None:
        handle = open(folder / LOCK, "a+")  # held across the yield
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another run is building the reference cache in {folder}; waiting", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        for stale in folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def _wait_for_builder(folder: Path) -> None:
    """Block while another run holds the cache's build lock (a reader takes a shared lock and lets go)."""
    if fcntl is None:
        return
    try:
        handle = open(folder / LOCK, "a+")
    except OSError:  # a read-only cache: nobody builds there
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        fcntl.flock(handle, fcntl.LOCK_UN)


def _all(state, flag: bool) -> bool:
    """Whether `flag` holds on every rank."""
    if state.num_processes == 1:
        return flag
    from accelerate.utils import gather_object

    return all(gather_object([flag]))


def _merge_records(state, records: dict) -> dict:
    if state.num_processes == 1:
        return records
    from accelerate.utils import gather_object

    merged = {}
    for part in gather_object([records]):
        merged.update(part)
    return merged


def _check_components(folder: Path, manifest: dict, components: dict) -> None:
    """A ReferenceError naming every differing component, if the cache was built for something else."""
    theirs = manifest["components"]
    differ = sorted(k for k in set(components) | set(theirs) if components.get(k) != theirs.get(k))
    if differ:
        raise ReferenceError(
            f"reference cache {folder} was built for a different {', '.join(differ)}; it will not be used. "
            "Delete it, or point reference_cache at another folder (the default folder is keyed by fingerprint)"
        )


def _mine(n_shards: int, state) -> list[int]:
    return [s for s in range(n_shards) if s % state.num_processes == state.process_index]


def _n_shards(num_examples: int, shard_size: int) -> int:
    return -(-num_examples // shard_size)


# --- building ---------------------------------------------------------------------------------------------


def build_reference_cache(
    model: nn.Module,
    tokenizer,
    examples: list[dict],
    token_ids: list[int],
    cache_root: str | Path | None,
    max_length: int,
    dtype: str = "float32",
    batch_size: int = 8,
    shard_size: int = 1024,
    folder: str | Path | None = None,
    progress: bool = True,
    aligned_adapter_disabled: bool = False,
    label_logp: bool = False,
    topk: int = 0,
) -> CacheFolder:
    """Build (or reuse, extend, repair, or resume) the cache for these examples and return its folder.

    `aligned_adapter_disabled`: the caller vouches that `model` carries a plain LoRA adapter that is disabled
    during the build (the TRL integration, where the adapter exists before the data is tokenized); the adapter's
    weights are left out of the fingerprint.
    `model` must be the aligned model as it is before any adapter is attached. `folder`, when given, is
    used as is (and checked against the fingerprint); by default it is `cache_root/<fingerprint[:20]>`.
    A complete cache that holds all of `token_ids` and whose shards pass their checksums is reused as is; a
    shard that fails is rebuilt; one that lacks some ids is rebuilt for the union of its ids and the new ones.
    The returned folder carries the fingerprint (`.fingerprint`), which CachedReference checks.
    `label_logp`, `topk`: the per-token extras to hold as well (see the module docstring).
    """
    if dtype not in DTYPES:
        raise ReferenceError(f"reference cache dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if hasattr(model, "peft_config") and not aligned_adapter_disabled:
        raise ReferenceError("build the reference cache from the aligned model before attaching an adapter")
    components = fingerprint_components(model, tokenizer, examples, max_length, dtype)
    key = fingerprint(components)
    # "~/.cache/..." as the README writes it: the home folder, not a folder named "~" under the working one
    folder = Path(folder).expanduser() if folder is not None else Path(cache_root).expanduser() / key[:20]
    result = CacheFolder(folder)
    result.fingerprint = key
    token_ids = [int(i) for i in token_ids]
    extras = _extras(label_logp, topk)
    state = process_state()
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if _all(state, _ready(folder, components, token_ids, state, extras)):
        return result
    with _build_lock(folder, state, progress):
        if _all(state, _ready(folder, components, token_ids, state, extras)):
            return result  # another run finished it while this one waited for the lock
        try:
            manifest = _load_manifest(folder)
            damaged = None
        except DamagedCacheError as e:
            manifest, damaged = None, e
        if manifest is not None:
            _check_components(folder, manifest, components)
        state.wait_for_everyone()  # every rank has read the old manifest before the main one changes the folder
        if damaged is not None and state.is_main_process:
            # the records that vouched for the shards are gone, and so is what they were built for
            warnings.warn(f"{damaged}; rebuilding the whole cache", stacklevel=2)
            for shard in folder.glob("shard-*.safetensors"):
                shard.unlink()
        held = manifest["token_ids"] if manifest else []
        shard_size = manifest["shard_size"] if manifest else shard_size
        wanted = list(dict.fromkeys([*held, *token_ids]))
        held_extras = manifest.get("extras", {}) if manifest else {}
        want_extras = _union_extras(held_extras, extras)
        same = manifest and held == wanted and held_extras == want_extras
        known = manifest.get("shards", {}) if same else {}
        if state.is_main_process:
            write_json_atomic(
                folder / MANIFEST,
                _sealed(_manifest(components, key, examples, wanted, shard_size, known, want_extras)),
            )
        state.wait_for_everyone()
        records = _build_shards(
            model, tokenizer, examples, wanted, folder, dtype, batch_size, shard_size, known, state, progress,
            want_extras,
        )  # fmt: skip
        records = _merge_records(state, records)
        if state.is_main_process:
            done = _manifest(components, key, examples, wanted, shard_size, records, want_extras)
            done["complete"] = True
            write_json_atomic(folder / MANIFEST, _sealed(done))
        state.wait_for_everyone()
    result.built = True
    return result


def _extras(label_logp: bool = False, topk: int = 0) -> dict:
    """The manifest's `extras` record: only what is held (a plain cache records none)."""
    if topk < 0:
        raise ReferenceError(f"topk must be >= 0, got {topk}")
    return {**({"label_logp": True} if label_logp else {}), **({"topk": int(topk)} if topk else {})}


def _union_extras(held: dict, wanted: dict) -> dict:
    return _extras(
        bool(held.get("label_logp") or wanted.get("label_logp")), max(held.get("topk", 0), wanted.get("topk", 0))
    )


def _covers(held: dict, wanted: dict) -> bool:
    return (held.get("label_logp", False) or not wanted.get("label_logp")) and held.get("topk", 0) >= wanted.get(
        "topk", 0
    )


def _ready(folder: Path, components: dict, token_ids: list[int], state, extras: dict | None = None) -> bool:
    """Whether the cache is complete, holds `token_ids`, and this rank's shards pass their checksums. Raises
    if the folder holds a cache for something else."""
    try:
        manifest = _load_manifest(folder)
    except DamagedCacheError:
        return False
    if manifest is None:
        return False
    _check_components(folder, manifest, components)
    if not manifest.get("complete") or not set(token_ids) <= set(manifest["token_ids"]):
        return False
    if not _covers(manifest.get("extras", {}), extras or {}):
        return False
    n = _n_shards(manifest["num_examples"], manifest["shard_size"])
    return all(_verify_shard(folder / _shard_name(s), manifest["shards"].get(_shard_name(s))) for s in _mine(n, state))


def _build_shards(
    model, tokenizer, examples, token_ids, folder, dtype, batch_size, shard_size, known, state, progress, extras=None
) -> dict:
    """Write this rank's missing or damaged shards; return the manifest records of all of this rank's shards."""
    from tqdm.auto import tqdm

    n_shards = _n_shards(len(examples), shard_size)
    extras = extras or {}
    records, todo = {}, []
    for s in _mine(n_shards, state):
        name, path = _shard_name(s), folder / _shard_name(s)
        if _verify_shard(path, known.get(name)):
            records[name] = known[name]
            continue
        if name in known:
            warnings.warn(
                f"reference cache {folder}: {name} is missing or does not match its checksum (damaged or "
                "truncated); rebuilding it",
                stacklevel=3,
            )
        elif path.exists():  # finished by a build that was killed before it could record it
            lengths = [len(ex["input_ids"]) for ex in examples[s * shard_size : (s + 1) * shard_size]]
            record = _adopt(path, token_ids, lengths, dtype, extras)
            if record is not None:
                records[name] = record
                continue
        todo.append(s)
    if not todo:
        return records
    collate = ChatCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=device)
    bar = tqdm(
        total=sum(min(shard_size, len(examples) - s * shard_size) for s in todo),
        desc="reference cache",
        disable=not progress or not state.is_main_process,
    )
    for s in todo:
        shard = examples[s * shard_size : (s + 1) * shard_size]
        pieces = []
        more: dict[str, list[torch.Tensor]] = {}  # the extras, per example
        for b in range(0, len(shard), batch_size):
            batch = collate(shard[b : b + batch_size])
            input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if extras:  # the same forward yields the K logits and the extras
                want = bool(extras.get("label_logp")), extras.get("topk", 0)
                stats = frozen_stats(model, input_ids, mask, ids, *want)
                logits = stats.pop("safety")
                stats = {k: _stored(k, v, dtype).cpu() for k, v in stats.items()}
            else:
                logits, stats = frozen_safety_logits(model, input_ids, mask, ids), {}  # (b, T, K)
            host = logits.to(DTYPES[dtype]).cpu()  # one transfer per batch, not one per row
            for r, (row, ex) in enumerate(zip(host, shard[b : b + batch_size])):
                pieces.append(row[: len(ex["input_ids"])])
                for k, v in stats.items():
                    more.setdefault(k, []).append(v[r, : len(ex["input_ids"])])
            bar.update(len(batch["input_ids"]))
        lengths = torch.as_tensor([0] + [len(p) for p in pieces], dtype=torch.int64)
        tensors = {"logits": torch.cat(pieces).contiguous(), "offsets": torch.cumsum(lengths, 0)}
        tensors.update({k: torch.cat(v).contiguous() for k, v in more.items()})
        metadata = {"token_ids": json.dumps(list(token_ids)), **({"extras": json.dumps(extras)} if extras else {})}
        data = safetensors_bytes(tensors, metadata=metadata)
        records[_shard_name(s)] = _write_shard(folder, _shard_name(s), data)
    bar.close()
    return records


def _stored(name: str, value: torch.Tensor, dtype: str) -> torch.Tensor:
    """An extra as the shard stores it: ids as int32, top-k log-probs in the cache's dtype, the rest in fp32 (a
    label log-prob and a tail mass are single numbers per token, and their precision is the term's)."""
    if name == "topk_ids":
        return value.to(torch.int32)
    return value.to(DTYPES[dtype] if name == "topk_logp" else torch.float32)


def _manifest(components, key, examples, token_ids, shard_size, shards, extras=None) -> dict:
    return {
        "fingerprint": key,
        "components": components,
        "token_ids": list(token_ids),
        "num_examples": len(examples),
        "num_tokens": sum(len(ex["input_ids"]) for ex in examples),
        "k": len(token_ids),
        "shard_size": shard_size,
        "complete": False,
        "shards": dict(sorted(shards.items())),
        **({"extras": extras} if extras else {}),
    }


# --- reading ----------------------------------------------------------------------------------------------


class ReadsByIndex:
    """`prepare` and `__call__` of a reference read from a cache by `example_idx`, for a class with
    `read(idx, lengths, width, device)`: each batch's indices and lengths reach the host in one transfer, with
    the right-padding check, and never once more per read."""

    def prepare(self, batches: list[dict]) -> None:
        """Read the references of one optimizer step's micro-batches ahead, before its first forward, with one
        transfer of their example indices and lengths to the host (the trainer calls this from
        get_batch_samples). A `__call__` with one of these batches then returns its reference without the host
        waiting for the device; reading per micro-batch would wait twice per micro-batch."""
        self._ahead = []
        if not batches or any(b.get("example_idx") is None or "attention_mask" not in b for b in batches):
            return  # __call__ says what is missing
        for b, (idx, lengths) in zip(batches, host_layout(batches)):
            mask = b["attention_mask"]
            self._ahead.append((b["input_ids"], self.read(idx, lengths, mask.shape[1], mask.device)))

    def __call__(self, model: nn.Module, batch: dict):
        ready = take_ahead(self, batch)
        if ready is not None:
            return ready
        if batch.get("example_idx") is None:
            raise ReferenceError(
                "the batch has no 'example_idx', which the reference cache is looked up by: tokenize with "
                "tokenize_rows and collate with ChatCollator, or use OnlineReference with your own data pipeline"
            )
        mask = batch["attention_mask"]
        ((idx, lengths),) = host_layout([batch])  # one wait for the device
        return self.read(idx, lengths, mask.shape[1], mask.device)


class CachedReference(ReadsByIndex):
    """Reads cached reference logits for a batch by `example_idx` (memory-mapped safetensors shards).

    Checked before anything is read: the manifest parses and is complete, the cache was built for
    `fingerprint` (taken from the folder build_reference_cache returned when not given) and, when `examples`
    are given, for those examples; every shard passes its checksum (hashed here unless this process has
    checked it already, e.g. while building). A shard replaced later (another run extending the cache) is
    checked again when it is opened.
    """

    policy_from_full_logits = False

    def __init__(
        self,
        folder: str | Path,
        token_ids: list[int] | None = None,
        fingerprint: str | None = None,
        examples: list[dict] | None = None,
        kind: str = "logits",
        topk: int = 0,
    ):
        """`kind`: what `read` and a call return: "logits" (B, T, K) the safety logits, "label_logp" (B, T) the
        log-prob of each position's next token, "topk" (ids (B, T, k), logp (B, T, k), tail_logmass (B, T))."""
        if kind not in KINDS:
            raise ReferenceError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.topk = kind, int(topk)
        self.folder = Path(folder)
        fix = "build it again (logitguard train rebuilds it), or delete the folder"
        try:
            manifest = _load_manifest(self.folder)
        except DamagedCacheError as e:
            raise DamagedCacheError(f"{e}; it was not used. To fix it, {fix}") from None
        if manifest is None:
            raise ReferenceError(f"{self.folder} is not a reference cache (no manifest.json)")
        if not manifest.get("complete"):
            raise ReferenceError(f"reference cache {self.folder} is incomplete; build it again to resume")
        expected = fingerprint or getattr(folder, "fingerprint", None)
        if expected is not None and manifest["fingerprint"] != expected:
            raise ReferenceError(
                f"reference cache {self.folder} was built for another model, tokenizer, data or settings "
                f"(fingerprint {manifest['fingerprint'][:12]}, expected {expected[:12]}); it will not be used. "
                "Build the cache for this run with build_reference_cache"
            )
        if examples is not None and data_fingerprint(examples) != manifest["components"].get("data"):
            raise ReferenceError(
                f"reference cache {self.folder} was built for other data than these examples; it will not be used"
            )
        if expected is None and examples is None:
            warnings.warn(
                f"CachedReference({self.folder}): nothing to check the cache against; pass the folder "
                "build_reference_cache returned, or fingerprint= or examples=",
                stacklevel=2,
            )
        wanted = _extras(kind == "label_logp", self.topk if kind == "topk" else 0)
        if kind == "topk" and not self.topk:
            raise ReferenceError("a top-k reference needs topk >= 1")
        if not _covers(manifest.get("extras", {}), wanted):
            raise ReferenceError(
                f"reference cache {self.folder} holds {manifest.get('extras') or 'K logits only'}, not {wanted}; "
                "build it again with build_reference_cache (label_logp=, topk=) to extend it"
            )
        held = manifest["token_ids"]
        token_ids = held if token_ids is None else [int(i) for i in token_ids]
        missing = [i for i in token_ids if i not in held]
        if missing:
            raise ReferenceError(
                f"reference cache {self.folder} holds token ids {held}, not {missing}; build it again with "
                "build_reference_cache to extend it"
            )
        self.manifest = manifest
        self.token_ids = token_ids
        self.columns = torch.as_tensor([held.index(i) for i in token_ids], dtype=torch.long)
        self.shard_size = manifest["shard_size"]
        self.num_shards = _n_shards(manifest["num_examples"], self.shard_size)
        self._files: dict[int, tuple] = {}
        self._extra_slices: dict[tuple[int, str], tuple] = {}  # (shard, name) -> (its file, the extra's slice)
        self._ahead: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a batch's input_ids, its reference): prepare
        for s in range(self.num_shards):  # all before training starts: a damaged shard is found now, not mid-run
            name = _shard_name(s)
            if not _verify_shard(self.folder / name, self.manifest["shards"].get(name)):
                self._refresh(name)

    def _damaged(self, name: str) -> DamagedCacheError:
        return DamagedCacheError(
            f"reference cache {self.folder}: {name} is missing, damaged or truncated (it does not match the "
            "checksum in manifest.json); it was not used. To fix it, build the cache again (run the same "
            "logitguard command: it rebuilds that shard), or delete the folder"
        )

    def _shard(self, s: int):
        if s not in self._files:
            if not 0 <= s < self.num_shards:
                raise ReferenceError(f"reference cache {self.folder} has no example {s * self.shard_size}")
            name, path = _shard_name(s), self.folder / _shard_name(s)
            if not _verify_shard(path, self.manifest["shards"].get(name)):
                self._refresh(name)  # replaced since it was checked: another run extended or repaired the cache
            f = safe_open(str(path), framework="pt")
            ids = json.loads((f.metadata() or {}).get("token_ids", "null")) or []
            if any(i not in ids for i in self.token_ids):
                raise self._damaged(name)
            # columns per shard, from the shard's own ids: a shard rebuilt for more ids keeps them in other places
            columns = torch.as_tensor([ids.index(i) for i in self.token_ids], dtype=torch.long)
            offsets = f.get_tensor("offsets").numpy()  # host ints: reading a row is no tensor op
            self._files[s] = (f, f.get_slice("logits"), offsets, columns)
        return self._files[s]

    def _refresh(self, name: str) -> None:
        """Accept a shard that does not match the manifest read at start only if another run rewrote it (it
        extended or repaired the cache) and the manifest that run finished with vouches for it."""
        _wait_for_builder(self.folder)
        try:
            fresh = _load_manifest(self.folder)
        except DamagedCacheError:
            fresh = None
        same = fresh is not None and fresh.get("complete") and fresh["fingerprint"] == self.manifest["fingerprint"]
        if not same or not _verify_shard(self.folder / name, fresh["shards"].get(name)):
            raise self._damaged(name)
        self.manifest = {**self.manifest, "shards": fresh["shards"]}

    def rows(self, idx: int) -> torch.Tensor:
        """(L, K) reference logits of example `idx` for the requested token ids."""
        _, logits, offsets, columns = self._shard(idx // self.shard_size)
        i = idx % self.shard_size
        return logits[int(offsets[i]) : int(offsets[i + 1])][:, columns]

    def extra_rows(self, idx: int, name: str) -> torch.Tensor:
        """(L, ...) of the extra `name` (label_logp, topk_ids, topk_logp, tail_logmass) of example `idx`."""
        s = idx // self.shard_size
        f, _, offsets, _ = self._shard(s)
        i = idx % self.shard_size
        part = self._extra_slices.get((s, name))
        if part is None or self._files[s][0] is not part[0]:  # once per shard (a refreshed shard: again)
            part = self._extra_slices[(s, name)] = (f, f.get_slice(name))
        return part[1][int(offsets[i]) : int(offsets[i + 1])]

    def _topk_rows(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (L, k), logp (L, k), tail (L,)) of example `idx`; a cache with a larger k folds the rest into the
        tail."""
        ids, stored = self.extra_rows(idx, "topk_ids"), self.extra_rows(idx, "topk_logp")
        logp, tail = stored.float(), self.extra_rows(idx, "tail_logmass").float()
        k = self.topk
        if logp.shape[1] > k:
            tail = torch.logaddexp(tail, torch.logsumexp(logp[:, k:], dim=1))
        logp = logp[:, :k]
        if stored.dtype != torch.float32:
            # log-probs rounded to 16 bits beside an fp32 tail sum to 1 only within ~0.4% per nat of the top-k's
            # entropy: the term would pull the policy to that off-simplex target, and its value could go below 0.
            # Renormalised, the reference is a distribution.
            total = torch.logaddexp(torch.logsumexp(logp, dim=1), tail)  # (L,)
            logp, tail = logp - total[:, None], tail - total
        return ids[:, :k].long(), logp, tail

    def read(self, idx: list[int], lengths: list[int], width: int, device: torch.device):
        if self.kind != "logits":
            return self._read_extras(idx, lengths, width, device)
        return self._read_logits(idx, lengths, width, device)

    def _check_length(self, i: int, got: int, n: int) -> None:
        if got != n:
            raise ReferenceError(
                f"reference cache {self.folder}: example {i} has {got} cached positions but the "
                f"batch has {n}; the cache does not belong to this data"
            )

    def _read_extras(self, idx: list[int], lengths: list[int], width: int, device: torch.device):
        """label_logp (B, width), or top-k (ids, logp, tail), zero past each row's length."""
        pinned = device.type == "cuda"
        b_size = len(idx)
        if self.kind == "label_logp":
            out = torch.zeros(b_size, width, dtype=torch.float32, pin_memory=pinned)
            for b, (i, n) in enumerate(zip(idx, lengths)):
                rows = self.extra_rows(i, "label_logp")
                self._check_length(i, len(rows), n)
                out[b, : len(rows)] = rows.float()
            return out.to(device, non_blocking=True)
        ids = torch.zeros(b_size, width, self.topk, dtype=torch.int64, pin_memory=pinned)
        logp = torch.zeros(b_size, width, self.topk, dtype=torch.float32, pin_memory=pinned)
        tail = torch.zeros(b_size, width, dtype=torch.float32, pin_memory=pinned)
        for b, (i, n) in enumerate(zip(idx, lengths)):
            r_ids, r_logp, r_tail = self._topk_rows(i)
            self._check_length(i, len(r_ids), n)
            ids[b, :n], logp[b, :n], tail[b, :n] = r_ids, r_logp, r_tail
        return tuple(t.to(device, non_blocking=True) for t in (ids, logp, tail))

    def _read_logits(self, idx: list[int], lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
        """(B, width, K) reference of examples `idx` (host ints) on `device`, zero past each row's length; each
        example's cached length must equal its row's `lengths[b]` (its attention mask's sum).

        Filled on the host in pinned memory when `device` is an accelerator, so the copy there is truly
        asynchronous (from pageable memory the host would wait for the device's queue to drain)."""
        pinned = device.type == "cuda"
        out = torch.zeros(len(idx), width, len(self.token_ids), dtype=torch.float32, pin_memory=pinned)
        for b, (i, n) in enumerate(zip(idx, lengths)):
            rows = self.rows(i)
            if len(rows) != n:
                raise ReferenceError(
                    f"reference cache {self.folder}: example {i} has {len(rows)} cached positions but the "
                    f"batch has {n}; the cache does not belong to this data"
                )
            out[b, : len(rows)] = rows.float()
        return out.to(device, non_blocking=True)


RIGHT_PADDING = (
    "the reference cache needs right padding and one example per row (it reads each row's reference from the row's "
    "first column); use padding_side='right' and no packing / padding-free batches"
)


def _rises(masks: list[torch.Tensor]) -> torch.Tensor:
    """(1,) on the masks' device: how many 0 -> 1 steps the attention masks hold (0 for right padding)."""
    return sum((m[:, 1:] > m[:, :-1]).sum().to(masks[0].device) for m in masks).reshape(1)


def _check_right_padded(rises: int) -> None:
    # a left-padded row would pass the length check and read every reference value `pad` positions early
    if rises:
        raise ReferenceError(RIGHT_PADDING)


def host_layout(batches: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Each batch's (example indices, lengths) as host ints, from one transfer for all the batches; refuses a
    left-padded batch in the same transfer."""
    sizes = [len(b["example_idx"]) for b in batches]
    masks = [b["attention_mask"] for b in batches]
    host = _host_ints([b["example_idx"] for b in batches] + [m.sum(dim=1) for m in masks] + [_rises(masks)])
    _check_right_padded(host.pop())
    idx, lengths = host[: sum(sizes)], host[sum(sizes) :]
    out, start = [], 0
    for n in sizes:
        out.append((idx[start : start + n], lengths[start : start + n]))
        start += n
    return out


def _host_ints(tensors: list[torch.Tensor]) -> list[int]:
    """The integers of 1-D tensors, concatenated, as host ints: one transfer for all of them."""
    device = tensors[0].device
    return torch.cat([t.to(device, torch.int64) for t in tensors]).tolist()


def take_ahead(reference, batch: dict) -> torch.Tensor | None:
    """The reference `prepare` read ahead for this batch (the trainer passes the very tensors it prepared), or
    None."""
    ready = getattr(reference, "_ahead", None) or []
    for i, (key, out) in enumerate(ready):
        if key is batch.get("input_ids"):
            del ready[i]
            return out
    return None
