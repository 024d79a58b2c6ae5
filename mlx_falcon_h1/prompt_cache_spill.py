"""Prompt-cache entries spilled to disk: evicted from memory, reused from a file.

An entry that prompt_cache.PromptCache evicts (past max_entries or max_bytes) is
written to a folder instead of dropped, when the store has one (spill_dir).
Reading it back costs what the disk takes to read it, against seconds to read
its tokens again (docs/generation-and-caches.md#prompt-cache-reuse has the
measurement), and the files outlive the process: a store made on the same
folder (an app restarted) serves prompts from the entries written before.

A file is one entry, as mlx-lm's save_prompt_cache writes a cache list (so its
load_prompt_cache reads it): the entry's caches, one per layer (K/V, conv and
SSM state, rollback window), then one mlx-lm ArraysCache per checkpoint (each
layer's conv and SSM state there). Its metadata says what the entry is: the
model key it was made for (the caller's: the server's model paths), its tokens,
the positions it can be served from (its end if that is a state, and the
checkpoints its K/V can be cut back to), and how many of the caches are layers.

Nothing half-written is read: a file is written under a temporary name in the
folder, synced, then renamed into place; temporary files are never read (those
a crash left behind go after STALE_TEMP_SECONDS). Nothing unfit is used: when
the folder is opened each file's header must account for its size (a truncated
file does not), and when a file is used its caches are checked against the
model as a prompt-cache file is (prompt_cache_files.validate_prompt_cache:
layer count, each layer's SSM, conv and K/V sizes) and each checkpoint against
its layer. A file that fails is skipped with a warning naming it, and removed.
Files of other model keys are left alone (one folder serves several models),
and only files named as this module names them are read or removed.

The folder's files total at most max_bytes: the least recently used (written or
read; their modification times order them across runs) are deleted first.

Data and bookkeeping only, as prompt_cache.py: which entry to spill or to bring
back is that module's choice.
"""

import hashlib
import json
import os
import re
import struct
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, save_prompt_cache

from .cache import FalconH1Cache, PromptCacheError
from .prompt_cache_files import load_prompt_cache, validate_prompt_cache

FORMAT = "mlx-falcon-h1 spilled prompt 1"

# Temporary files older than this were left by a write that never finished (a
# crash); younger ones may be another process's write under way.
STALE_TEMP_SECONDS = 3600

_NAME = re.compile(r"falcon-h1-prompt-[0-9a-f]{32}\.safetensors")
_TEMP = re.compile(r"\.falcon-h1-prompt-[0-9a-f]{32}\.[0-9a-f]{32}\.tmp\.safetensors")

# One layer's (conv_state, ssm_state), or None for a cache that is cut back as
# it is (a plain K/V cache: a draft model of another architecture).
LayerState = Optional[Tuple[mx.array, mx.array]]


def model_key(model: Any) -> str:
    """What a file records of the model key an entry was stored under: its repr
    (a string or a tuple of paths reads the same in the next run)."""
    return repr(model)


@dataclass(eq=False)
class SpilledEntry:
    path: Path
    model: str  # model_key() of the key it was stored under
    tokens: np.ndarray  # the tokens its caches have read
    positions: Tuple[int, ...]  # ascending: where it can be served from
    nbytes: int  # the file's size


class SpillFolder:
    """The spilled entries of one folder: an index of their tokens and positions
    in memory, their arrays on disk until used (see the module's docstring).

    folder: created if missing. max_bytes: the files' total at most (None: no bound).
    """

    def __init__(self, folder, max_bytes: Optional[int] = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"the spill folder's bound must be a number of bytes, not {max_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._files: "OrderedDict[Path, SpilledEntry]" = OrderedDict()  # least recently used first
        self._scan()

    def __len__(self) -> int:
        return len(self._files)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._files.values())

    def entries(self, model: Any) -> List[SpilledEntry]:
        """The entries stored under this model key."""
        key = model_key(model)
        return [s for s in self._files.values() if s.model == key]

    # --- writing --------------------------------------------------------------

    def put(self, model: Any, tokens: np.ndarray, cache: list, states: Dict[int, List[LayerState]],
            end_is_state: bool) -> Optional[SpilledEntry]:
        """Write an entry: `cache` has read `tokens`; `states` are its checkpoints
        that its K/V can be cut back to, end_is_state whether its end is one too.
        Nothing is written when a file already holds all of it (an entry brought
        back from the folder and evicted again); files it holds all of go. None
        when it was not written (larger than the bound, or the disk refused)."""
        key = model_key(model)
        positions = tuple(sorted(set(states) | ({len(tokens)} if end_is_state else set())))
        for spilled in self._files.values():
            if spilled.model == key and _holds(spilled, tokens, positions):
                self._touch(spilled)
                return spilled
        # (a checkpoint at the end, when the end is a state, is the caches' own state)
        checkpoints = sorted(p for p in states if not (end_is_state and p == len(tokens)))
        parts = list(cache) + [_checkpoint_cache(states[p]) for p in checkpoints]
        arrays = [a for _, a in tree_flatten([c.state for c in parts]) if isinstance(a, mx.array)]
        size = sum(a.nbytes for a in arrays)
        if self.max_bytes is not None and size > self.max_bytes:
            return None
        tokens = np.asarray(tokens, dtype=np.int64)
        digest = hashlib.sha256(key.encode() + tokens.tobytes()).hexdigest()[:32]
        path = self.folder / f"falcon-h1-prompt-{digest}.safetensors"
        temp = self.folder / f".{path.stem}.{uuid.uuid4().hex}.tmp.safetensors"
        metadata = {
            "format": FORMAT,
            "model": key,
            "tokens": json.dumps(tokens.tolist()),
            "positions": json.dumps(list(positions)),
            "checkpoints": json.dumps(checkpoints),
            "layers": str(len(cache)),
        }
        try:
            save_prompt_cache(str(temp), parts, metadata)
            _sync(temp)
            os.replace(temp, path)  # atomic: the name holds the old file or the whole new one
        except OSError as e:
            temp.unlink(missing_ok=True)
            warnings.warn(f"prompt-cache spill: cannot write {path} ({e}); the entry is dropped",
                          stacklevel=2)
            return None
        self._files.pop(path, None)
        spilled = SpilledEntry(path, key, tokens, positions, path.stat().st_size)
        self._files[path] = spilled
        for other in list(self._files.values()):
            if other is not spilled and other.model == key and _holds(spilled, other.tokens,
                                                                      other.positions):
                self._remove(other)
        self._shrink()
        return spilled if spilled.path in self._files else None

    # --- reading --------------------------------------------------------------

    def load(self, spilled: SpilledEntry,
             models: Sequence) -> Optional[Tuple[list, Dict[int, List[LayerState]]]]:
        """(caches, checkpoints by position) of a spilled entry, checked against
        `models` (the models whose caches the list holds, in order: the model, then
        a draft model's); None, with a warning naming the file and the file removed,
        when it cannot be read or does not fit. The file stays: an entry evicted
        again unchanged is not written again."""
        try:
            caches, metadata = load_prompt_cache(spilled.path, return_metadata=True)
            layers, checkpoints = int(metadata["layers"]), json.loads(metadata["checkpoints"])
            if len(caches) != layers + len(checkpoints):
                raise PromptCacheError(f"{len(caches)} caches, its metadata says {layers} layers "
                                       f"and {len(checkpoints)} checkpoints")
            cache = caches[:layers]
            _validate(models, cache, str(spilled.path))
            states = {p: _layer_states(c, cache) for p, c in zip(checkpoints, caches[layers:])}
            mx.eval([c.state for c in caches])  # read now: the file may go before they are used
        except Exception as e:  # whatever a damaged file raises: it is not used, never a crash
            self._discard(spilled.path, f"{type(e).__name__}: {e}")
            return None
        self._touch(spilled)
        return cache, states

    # --- the folder -----------------------------------------------------------

    def _scan(self) -> None:
        """Index the files a previous run (or another process) wrote, least recently
        used first; check each header."""
        found = []
        for path in self.folder.iterdir():
            if _TEMP.fullmatch(path.name):
                try:
                    if time.time() - path.stat().st_mtime > STALE_TEMP_SECONDS:
                        path.unlink()
                except OSError:
                    pass
                continue
            if not _NAME.fullmatch(path.name):
                continue
            try:
                found.append((path.stat().st_mtime, _read_index(path)))
            except Exception as e:  # truncated, damaged, not ours: not used
                self._discard(path, f"{type(e).__name__}: {e}")
        for _, spilled in sorted(found, key=lambda pair: pair[0]):
            self._files[spilled.path] = spilled
        self._shrink()

    def _touch(self, spilled: SpilledEntry) -> None:
        self._files.move_to_end(spilled.path)
        try:
            os.utime(spilled.path)  # the order survives the process
        except OSError:
            pass

    def _shrink(self) -> None:
        while self._files and self.max_bytes is not None and self.nbytes > self.max_bytes:
            self._remove(next(iter(self._files.values())))

    def _remove(self, spilled: SpilledEntry) -> None:
        del self._files[spilled.path]
        spilled.path.unlink(missing_ok=True)

    def _discard(self, path: Path, why: str) -> None:
        warnings.warn(f"prompt-cache spill file {path} cannot be used ({why}); skipped and removed",
                      stacklevel=3)
        self._files.pop(path, None)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _holds(spilled: SpilledEntry, tokens, positions) -> bool:
    """Whether a spilled entry serves every position of an entry of `tokens`: its
    tokens extend them and it has a state at each of those positions."""
    n = len(tokens)
    return (len(spilled.tokens) >= n and np.array_equal(spilled.tokens[:n], tokens)
            and set(positions) <= set(spilled.positions))


def _checkpoint_cache(states: List[LayerState]) -> ArraysCache:
    """One checkpoint as an mlx-lm cache: [conv_0, ssm_0, conv_1, ssm_1, ...]."""
    saved = ArraysCache(2 * len(states))
    for i, state in enumerate(states):
        if state is not None:
            saved[2 * i], saved[2 * i + 1] = state
    return saved


def _layer_states(saved: ArraysCache, cache: list) -> List[LayerState]:
    """A checkpoint read back, each layer's arrays checked against the layer's cache
    (which validate_prompt_cache has checked against the model)."""
    if not isinstance(saved, ArraysCache) or len(saved.cache) != 2 * len(cache):
        raise PromptCacheError(f"a checkpoint of {type(saved).__name__} is not one of "
                               f"{len(cache)} layers' states")
    states = []
    for i, c in enumerate(cache):
        conv, ssm = saved[2 * i], saved[2 * i + 1]
        if not isinstance(c, FalconH1Cache):
            states.append(None)
            continue
        for name, got, want in (("conv", conv, c.conv_state), ("SSM", ssm, c.ssm_state)):
            if got is None or want is None or got.shape != want.shape or got.dtype != want.dtype:
                raise PromptCacheError(
                    f"layer {i}: a checkpoint's {name} state is "
                    f"{None if got is None else (got.shape, got.dtype)}, the layer's "
                    f"{None if want is None else (want.shape, want.dtype)}")
        states.append((conv, ssm))
    return states


def _validate(models: Sequence, cache: list, source: str) -> None:
    """validate_prompt_cache for each model, on its part of the cache list."""
    start = 0
    for model in models:
        n = len(model.layers)
        validate_prompt_cache(model, cache[start:start + n], source)
        start += n
    if start != len(cache):
        raise PromptCacheError(f"{source}: {len(cache)} layer caches, the models have {start} "
                               "layers")


def _read_index(path: Path) -> SpilledEntry:
    """A spilled entry's index record from the file's safetensors header, without
    reading its arrays; raises unless the header accounts for the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PromptCacheError(f"{size} bytes: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise PromptCacheError(f"{size} bytes: its header alone says {8 + n} (truncated)")
        header = json.loads(f.read(n))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise PromptCacheError(f"{size} bytes, its header says {8 + n + end} (truncated)")
    meta = {k[2:]: v for k, v in header.get("__metadata__", {}).items() if k.startswith("0.")}
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"not a spilled prompt of format {FORMAT!r}")
    tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
    positions = tuple(int(p) for p in json.loads(meta["positions"]))
    if any(not 0 < p <= len(tokens) for p in positions):
        raise PromptCacheError(f"positions {positions} outside its {len(tokens)} tokens")
    return SpilledEntry(path, meta["model"], tokens, positions, size)


def _sync(path: Path) -> None:
    """The file's bytes on the disk before it is renamed into place: a power cut
    leaves the old name or the whole new file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
