"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards,
loads reshard, every file is size- and hash-checked, old ones are pruned.

Layout of one checkpoint::

    <run>/checkpoints/
        latest                      text: the name of the newest complete folder (atomic replace)
        step_0000100/
            model/                  DCP files of the keys not starting with "optim." (weights)
                .metadata, __0_0.distcp, __1_0.distcp, ...
            optim/                  DCP files of the "optim.*" keys (master rows, moments, steps)
            extra/rank_00000.pt     per-rank extras (RNG streams, data position), torch.save
            meta.json               step, layout, whatever global state the caller passes
            config.json             the resolved config
            integrity.json          {"files": {relpath: {"size", "sha256"}}}: every other file

Model and optimizer tensors go to separate DCP folders so that a model-only reader (eval, sample,
converters: ``load_full_model``) reads the weights' metadata and files only, and so that no data
file mixes the weights with optimizer state (with DP=2 each ``optim/__r_0.distcp`` holds half of
the optimizer state).

Saving (``save``; collective over ``group``): rank 0 removes temp folders left by a killed writer,
every rank writes into ``step_XXXXXXX.tmp-<token>/``, each rank hashes the files it wrote, rank 0
gathers the lists and writes ``integrity.json`` last; after a barrier rank 0 renames the folder,
replaces ``latest`` (temp file + ``os.replace``) and keeps the newest ``keep`` folders.

Resuming (``find_resumable``): ``latest`` first, then the other step folders from the newest; a
checkpoint with a missing manifest or a missing / truncated / changed file is skipped with ONE note
naming the file(s) and the problem; hashing is spread over the ranks of ``group`` (rank r checks
files i % world == r; verdicts are all-gathered). If checkpoints exist but none is intact,
``NoIntactCheckpointError`` (a ValueError) lists what is wrong with each.

Loading: ``load(path, template)`` fills the caller's template (DTensors of the CURRENT layout, e.g.
``ShardedAdamW.sharded_state_dict()`` + ``model_sharded_state_dict``): DCP reads the overlapping
pieces, i.e. it reshards. ``load_full_model(path)`` needs no process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings

import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "integrity.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP = ".tmp-"
_OLD = ".old-"
OPTIM_PREFIX = "optim."
_PARTS = ("model", "optim")


class NoIntactCheckpointError(ValueError):
    """Checkpoints exist in the run folder but every one is incomplete or corrupt."""


# ------------------------------------------------------------------------------ process groups

def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _group(group):
    if not _dist():
        return None
    return group if group is not None else dist.group.WORLD


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _barrier(group) -> None:
    if group is not None and _size(group) > 1:
        dist.barrier(group=group)


def _broadcast(obj, group):
    if group is None or _size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _all_gather(obj, group) -> list:
    if group is None or _size(group) == 1:
        return [obj]
    out: list = [None] * _size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ------------------------------------------------------------------------------ names

def step_dir_name(step: int) -> str:
    return f"step_{int(step):07d}"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def _step_of(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete-looking step folders (renamed from their temp name), newest first."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _step_of(n) is not None and os.path.isdir(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(names, key=_step_of, reverse=True)]


def clean_stale_temps(run_dir: str) -> list[str]:
    """Remove temp folders (``*.tmp-*``, ``*.old-*``) of writers that died mid-save. Only the
    process that is about to write may call this (``save`` does, on rank 0): a temp folder of a
    writer that is still running would be removed too."""
    root = checkpoints_dir(run_dir)
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        if _TMP in name or _OLD in name:
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
            removed.append(name)
    return removed


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(8 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def _writer_error(exc, folder: str) -> Exception:
    """DCP's CheckpointException (a BaseException holding each rank's error) -> the first rank's
    error as an ordinary exception: an OSError keeps its errno (ENOSPC: disk full), naming the
    folder being written; anything else becomes a RuntimeError carrying DCP's report."""
    for rank, (err, _) in sorted(exc.failures.items()):
        if isinstance(err, OSError):
            return OSError(err.errno, f"{err.strerror} (rank {rank} writing checkpoint data)",
                           err.filename or folder)
    return RuntimeError(f"writing checkpoint data in {folder} failed: {exc}")


def _split(tensors: dict) -> dict[str, dict]:
    parts = {p: {} for p in _PARTS}
    for k, v in tensors.items():
        parts["optim" if k.startswith(OPTIM_PREFIX) else "model"][k] = v
    return parts


# ------------------------------------------------------------------------------ save

def save(run_dir: str, step: int, tensors: dict, extras_for_this_rank: dict | None = None,
         meta: dict | None = None, config=None, keep: int = 3, group=None, files: dict | None = None,
         before_rename=None) -> str:
    """Write checkpoint ``step`` of ``tensors`` (DTensors / tensors, keyed by global names) from
    every rank of ``group`` (default: the world), plus this rank's ``extras_for_this_rank``; rank 0
    also writes ``meta`` (+ ``step``, ``world_size``), ``config`` (a dict or a callable returning
    one) and copies ``files`` ({name in the checkpoint: source path}). ``before_rename(tmp_dir)`` is
    called on every rank once everything is written, before the rename. Returns the final path on
    every rank. ``keep`` <= 0 keeps every checkpoint."""
    import torch.distributed.checkpoint as dcp

    group = _group(group)
    rank, world = _rank(group), _size(group)
    root = checkpoints_dir(run_dir)
    name = step_dir_name(step)
    final = os.path.join(root, name)
    token = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        clean_stale_temps(run_dir)
        token = f"{uuid.uuid4().hex[:12]}"
    token = _broadcast(token, group)
    tmp = os.path.join(root, f"{name}{_TMP}{token}")
    if rank == 0:
        for sub in (*_PARTS, "extra"):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier(group)

    written: list[str] = []  # paths relative to tmp, written by this rank
    for part, state in _split(tensors).items():
        writer = dcp.FileSystemWriter(os.path.join(tmp, part), single_file_per_rank=True, sync_files=True,
                                      thread_count=1)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.filterwarnings("ignore", message=".*single process.*")
            try:
                dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
            except dcp.api.CheckpointException as exc:  # a BaseException: `except Exception` misses it
                raise _writer_error(exc, os.path.join(tmp, part)) from None
        prefix = f"__{rank}_"
        written += [f"{part}/{f}" for f in sorted(os.listdir(os.path.join(tmp, part)))
                    if f.startswith(prefix) and f.endswith(".distcp")]
    extra_name = f"extra/rank_{rank:05d}.pt"
    with open(os.path.join(tmp, extra_name), "wb") as f:
        torch.save(extras_for_this_rank or {}, f)
        f.flush()
        os.fsync(f.fileno())
    written.append(extra_name)
    if rank == 0:
        written += [f"{part}/.metadata" for part in _PARTS
                    if os.path.isfile(os.path.join(tmp, part, ".metadata"))]
        full_meta = {"step": int(step), "world_size": world, "saved_unix_time": time.time(), **(meta or {})}
        _write_json(os.path.join(tmp, "meta.json"), full_meta)
        cfg = config() if callable(config) else config
        _write_json(os.path.join(tmp, "config.json"), cfg if cfg is not None else {})
        written += ["meta.json", "config.json"]
        for rel, src in (files or {}).items():
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
            written.append(rel)
    mine = {rel: {"size": os.path.getsize(os.path.join(tmp, rel)), "sha256": _sha256(os.path.join(tmp, rel))}
            for rel in written}
    everything = _all_gather(mine, group)
    if rank == 0:
        manifest = {}
        for part in everything:
            manifest.update(part)
        _write_json(os.path.join(tmp, MANIFEST), {"step": int(step), "files": dict(sorted(manifest.items()))})
        _fsync_dir(tmp)
    if before_rename is not None:
        before_rename(tmp)
    _barrier(group)
    if rank == 0:
        old = None
        if os.path.exists(final):  # the same step saved again (e.g. after a resume)
            old = os.path.join(root, f"{name}{_OLD}{token}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = os.path.join(root, f"{LATEST}{_TMP}{token}")
        with open(pointer, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, os.path.join(root, LATEST))
        _fsync_dir(root)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        if keep and keep > 0:
            for path in list_checkpoints(run_dir)[keep:]:
                if path != final:
                    shutil.rmtree(path, ignore_errors=True)
    _barrier(group)
    return final


# ------------------------------------------------------------------------------ integrity

def _read_manifest(path: str) -> tuple[dict | None, str | None]:
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return None, f"{MANIFEST}: missing (the save did not finish, or the file was deleted)"
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not a mapping")
        return files, None
    except Exception as e:  # noqa: BLE001
        return None, f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"


def _check_file(path: str, rel: str, want: dict, hash_it: bool) -> str | None:
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
        return f"{rel}: missing"
    size = os.path.getsize(full)
    if size != want.get("size"):
        kind = "truncated" if size < want.get("size", 0) else "grown"
        return f"{rel}: {size} bytes, the manifest says {want.get('size')} ({kind})"
    if hash_it and _sha256(full) != want.get("sha256"):
        return f"{rel}: sha256 differs from the manifest (content changed)"
    return None


def verify(path: str, group=None, hashes: bool = True) -> list[str]:
    """Problems of the checkpoint at ``path`` (empty when intact): a missing manifest, and every
    listed file that is missing, of another size, or (``hashes``) of another sha256. Collective
    over ``group`` (default: the world when torch.distributed is initialised): sizes are checked
    by every rank, hashes of file i by rank i % world."""
    group = _group(group)
    rank, world = _rank(group), _size(group)
    files, problem = _read_manifest(path)
    if problem:
        found = [problem]
    else:
        found = []
        for i, rel in enumerate(sorted(files)):
            issue = _check_file(path, rel, files[rel], hash_it=hashes and i % world == rank)
            if issue:
                found.append(issue)
    merged: list[str] = []
    for part in _all_gather(found, group):
        merged += [p for p in part if p not in merged]
    return sorted(merged)


def find_resumable(run_dir: str, group=None) -> tuple[str | None, list[str]]:
    """(newest intact checkpoint or None, notes): ``latest`` first, then the other step folders from
    the newest. Each skipped checkpoint gives one note naming its bad file(s). No checkpoint at all:
    (None, []). Checkpoints but none intact: ``NoIntactCheckpointError``. Temp folders of killed
    writers are ignored (the next ``save`` removes them). Collective over ``group``."""
    root = checkpoints_dir(run_dir)
    candidates = list_checkpoints(run_dir)
    pointer = os.path.join(root, LATEST)
    latest = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            latest = os.path.join(root, f.read().strip())
    notes: list[str] = []
    if latest is not None:
        if latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        elif not candidates:
            raise NoIntactCheckpointError(f"{pointer} names {os.path.basename(latest)}, which does not exist, "
                                          f"and there is no other checkpoint in {root}")
        else:
            notes.append(f"{pointer} names {os.path.basename(latest)}, which does not exist; trying older "
                         f"checkpoints")
    bad: list[tuple[str, list[str]]] = []
    for path in candidates:
        problems = verify(path, group)
        if not problems:
            return path, notes
        notes.append(f"checkpoint {path} is not intact and is skipped: {'; '.join(problems)}")
        bad.append((path, problems))
    if not bad:
        return None, notes
    found = " | ".join(f"{os.path.basename(p)}: {'; '.join(pr)}" for p, pr in bad)
    raise NoIntactCheckpointError(f"no intact checkpoint in {root} ({len(bad)} found, all damaged): "
                                  f"{found}. Nothing was loaded; restore a checkpoint, or train into "
                                  f"another --out")


# ------------------------------------------------------------------------------ load

def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def load_extras(path: str, rank: int):
    """The extras rank ``rank`` saved, or None when that rank did not exist (another world size)."""
    file = os.path.join(path, "extra", f"rank_{int(rank):05d}.pt")
    if not os.path.isfile(file):
        return None
    return torch.load(file, map_location="cpu", weights_only=False)


def checkpoint_keys(path: str) -> dict[str, object]:
    """{key: DCP storage metadata} of both parts."""
    import torch.distributed.checkpoint as dcp

    out = {}
    for part in _PARTS:
        folder = os.path.join(path, part)
        if os.path.isfile(os.path.join(folder, ".metadata")):
            out.update(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    return out


def load(path: str, tensors_template: dict, group=None, strict: bool = True) -> dict:
    """DCP-load ``path`` into ``tensors_template`` (in place; DTensors of the current layout
    reshard) and return it. ``strict=False`` skips template keys the checkpoint lacks (they are
    left out of the returned dict). Collective over ``group``."""
    import torch.distributed.checkpoint as dcp

    group = _group(group)
    out = {}
    for part, state in _split(tensors_template).items():
        if not state:
            continue
        folder = os.path.join(path, part)
        reader = dcp.FileSystemReader(folder)
        stored = reader.read_metadata().state_dict_metadata
        missing = sorted(k for k in state if k not in stored)
        if missing and strict:
            raise KeyError(f"{path}: {len(missing)} tensors are not in the checkpoint, e.g. {missing[:5]}")
        state = {k: v for k, v in state.items() if k in stored}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, storage_reader=reader, process_group=group, no_dist=group is None)
        out.update(state)
    return out


def load_full_tensors(path: str, part: str = "model", prefix: str = "", strip: bool = True) -> dict:
    """Every tensor of ``part`` ("model" or "optim") whose key starts with ``prefix``, in full
    shape, as plain CPU tensors, in ONE process with no process group (DCP ``no_dist``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(os.path.join(path, part))
    stored = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in stored.items()
             if isinstance(md, TensorStorageMetadata) and k.startswith(prefix)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {(k[len(prefix):] if strip else k): v for k, v in state.items()}


def load_full_model(path: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The full (TP-gathered) weights saved under ``prefix``, prefix stripped: one process, no
    process group (eval, sample, converters)."""
    return load_full_tensors(path, "model", prefix, strip=True)
