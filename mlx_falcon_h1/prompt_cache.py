"""Reusing any shared prefix of a prompt: a prompt cache of recurrent-state checkpoints.

A chat app or an agent sends the whole conversation with every request. For
attention that is cheap to reuse: a stored K/V can be cut back to any prefix it
shares with the new prompt. An SSM state cannot be cut back (cache.py keeps a
rollback window of 32-64 tokens, no more), so a hybrid model's server re-reads
the whole prompt whenever a request does not extend a stored one exactly:
regenerate, edit a message, branch, retry an agent step.

So while a prompt is read, its caches keep the conv and SSM state at planned
positions (cache.py: checkpoints): every `checkpoint_interval` tokens, at the
boundaries the request marks (end of the system prompt, of each message), one
token before its end (what a regenerate or a retry needs: the model must read
the last token again to give its logits), and 32, 128 and 512 tokens before that
(an edit of the latest message's end). A checkpoint holds no K/V: the
K/V at that position is cut back from the stored entry that holds it. A new
prompt is served from the deepest position, over all entries, at which some
entry both shares the prompt's tokens and has a state: its end (the prompt
extends it) or one of its checkpoints. What is re-read is at most one interval
beyond the longest prefix shared with anything stored.

Memory. Entries and their checkpoints count toward `max_bytes`, and are
evicted least recently used; an entry stored whose tokens extend another's
takes over the shorter one's states as checkpoints (its K/V covers theirs),
keeping those every interval and the deepest few others (_thin), and an
evicted entry hands the checkpoints another entry can still use to it.

Disk. With a folder (spill_dir), an evicted entry that holds K/V is written
there instead of dropped, and prompts are served from the entries there too
(prompt_cache_spill.py: the files, their checks and their bound); the
files outlive the process.

Used by the server (server.ServerPromptCache: mlx-lm's prompt-cache
interface over this) and by apps that run their own chat loop:

    prompt_cache = PromptCache(model.make_cache)
    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    cache, rest = prompt_cache.fetch(tokens, boundaries=message_boundaries(
        tokenizer, messages, tokens))             # a cache, and the tokens still to read
    ... generate from `rest` with `cache`, giving `generated` ...
    prompt_cache.insert(tokens + generated, cache)

Data and bookkeeping only: the model computes every state this holds.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .cache import FalconH1Cache
from .prompt_cache_spill import LayerState, SpillFolder, SpilledEntry

# Tokens between checkpoints, by default (docs/generation-and-caches.md#prompt-cache-reuse
# has the measurement). A checkpoint costs each layer's conv and SSM state: at the
# released shapes as much as the K/V of 1.5K-4K tokens (0.5B 27 MiB, 7B 133 MiB,
# 34B 290 MiB). At 2048 a conversation's checkpoints cost 0.8-2x its K/V, and an
# edit inside a long message re-reads at most 2048 tokens (about 3 s at 7B on an
# M4 Max; edits at a message's start re-read nothing more, boundaries are kept).
# It is mlx-lm's prefill step too: a cold read's checkpoints fall on its chunk ends.
DEFAULT_CHECKPOINT_INTERVAL = 2048

# Checkpoints this many tokens before the last one too, within an interval: the
# end of the latest message is where chat apps edit most (a question under a pasted
# document), and an edit d tokens from the end then re-reads at most about 4d.
TAIL_DISTANCES = (32, 128, 512)

# Per entry, the checkpoints kept besides those every interval and the first (the
# system prompt's end): the deepest this many (the tail above, the last
# messages' boundaries). Older ones go when a
# longer entry takes them over: there, an edit re-reads at most one interval, and
# a conversation's checkpoints stay about its length / interval + this many.
RECENT_CHECKPOINTS = 8

# Message boundaries marked per prompt: the ends of its last this many messages
# (each costs rendering the conversation up to it; older ones lie behind stored
# entries' ends, and every interval has a checkpoint anyway).
BOUNDARY_MESSAGES = 8


@dataclass(eq=False)
class _Entry:
    model: Any  # which model's caches (the server's model key)
    tokens: np.ndarray  # the tokens the caches have read
    cache: Optional[list]  # the caches after `tokens`, K/V included; None: checkpoints only
    checkpoints: Dict[int, List[LayerState]] = field(default_factory=dict)  # position -> states
    nbytes: int = 0


class PromptCache:
    """Caches of earlier prompts, reusable from any prefix a new prompt shares with
    them (see the module's docstring).

    make_cache: makes an empty cache list for a prompt nothing matches (the
    model's make_cache); without it fetch gives None then. max_entries: stored
    prompts at most (mlx-lm's --prompt-cache-size); max_bytes: their bytes at most,
    checkpoints included (--prompt-cache-bytes). checkpoint_interval: tokens between
    checkpoints (None: only at boundaries and before a prompt's last token).

    spill_dir: a folder where evicted entries holding K/V are written, and reused
    from, in this run and the next (prompt_cache_spill.py); spill_bytes: its files'
    total at most (None: no bound). The files are checked against the models
    spill_models(model key) gives (the model, then a draft model's, as the cache
    list holds them; None: not now); by default the model whose make_cache makes
    the caches.
    """

    def __init__(self, make_cache: Optional[Callable[[], list]] = None, *, max_entries: int = 10,
                 max_bytes: Optional[int] = None,
                 checkpoint_interval: Optional[int] = DEFAULT_CHECKPOINT_INTERVAL,
                 spill_dir=None, spill_bytes: Optional[int] = None,
                 spill_models: Optional[Callable[[Any], Optional[list]]] = None):
        if checkpoint_interval is not None and checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be a positive number of tokens, "
                             f"not {checkpoint_interval}")
        self.make_cache = make_cache
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.checkpoint_interval = checkpoint_interval
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()  # least recently used first
        self.spill_models = spill_models
        self.spill: Optional[SpillFolder] = None
        if spill_dir is not None:
            self.spill_to(spill_dir, spill_bytes)

    def spill_to(self, folder, max_bytes: Optional[int] = None) -> None:
        """From now on write evicted entries holding K/V to `folder` (at most
        `max_bytes` of files), and serve prompts from the entries there too."""
        if self.spill_models is None and not hasattr(_maker_model(self.make_cache), "layers"):
            raise ValueError("PromptCache: spilled entries are checked against the model they are "
                             "for: give spill_models, or a model's make_cache as make_cache")
        self.spill = SpillFolder(folder, max_bytes)

    def spill_all(self) -> None:
        """Write every entry holding K/V to the spill folder, keeping it in memory
        too: before an app exits, so that its next run finds them all."""
        for entry in list(self._entries.values()):
            if entry.cache is not None:
                self._spill(entry)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    @property
    def kv_entry_count(self) -> int:
        return sum(e.cache is not None for e in self._entries.values())

    @property
    def checkpoint_count(self) -> int:
        return sum(len(e.checkpoints) for e in self._entries.values())

    # --- reading --------------------------------------------------------------

    def fetch(self, tokens: Sequence[int], model: Any = None,
              boundaries: Iterable[int] = ()) -> Tuple[Optional[list], List[int]]:
        """(cache, tokens still to read) for a prompt: a copy of the deepest stored
        state the prompt can continue from (a fresh cache when none, or None without
        make_cache). Reading the rest keeps checkpoints every interval, at
        `boundaries` (positions the request marks) and before the end (planned)."""
        tokens = list(tokens)
        found = self._deepest(model, np.asarray(tokens, dtype=np.int64))
        if found is None:
            cache = self.make_cache() if self.make_cache is not None else None
            position = 0
        else:
            entry, position = found
            if id(entry) in self._entries:  # (one brought back from disk may not fit the budget)
                self._entries.move_to_end(id(entry))
            cache = _restore(entry, position)
        planned = frozenset(p for p in self.planned(len(tokens), boundaries) if p > position)
        for c in cache or []:
            if isinstance(c, FalconH1Cache):
                c.checkpoint_interval = self.checkpoint_interval
                c.checkpoint_positions = planned
        return cache, tokens[position:]

    def planned(self, length: int, boundaries: Iterable[int] = (), every: bool = False) -> List[int]:
        """Where reading a prompt of `length` tokens keeps checkpoints: the boundaries,
        one token before the end and TAIL_DISTANCES before that (every: the
        positions every interval too)."""
        last, interval = length - 1, self.checkpoint_interval
        tail = [last - d for d in TAIL_DISTANCES if interval and d < interval]
        grid = range(interval, length, interval) if every and interval else ()
        return sorted({p for p in (*boundaries, *tail, last, *grid) if 0 < p < length})

    def _deepest(self, model, tokens: np.ndarray) -> Optional[Tuple[_Entry, int]]:
        """The entry and position to continue from: the deepest at which an entry
        shares the prompt and has a state, short of the prompt's last token."""
        best, best_position = None, 0
        for entry in self._entries.values():
            if entry.model != model or entry.cache is None:
                continue
            limit = min(common_prefix(entry.tokens, tokens), len(tokens) - 1)
            if len(entry.tokens) <= limit and _all_at(entry.cache, len(entry.tokens)):
                position = len(entry.tokens)  # the prompt extends the entry
            else:
                position = max((p for p in entry.checkpoints
                                if p <= limit and _can_cut_back(entry.cache, p)), default=0)
            if position > best_position:
                best, best_position = entry, position
        models = self._spill_models(model) if self.spill is not None else None
        for spilled in self.spill.entries(model) if models is not None else ():
            limit = min(common_prefix(spilled.tokens, tokens), len(tokens) - 1)
            position = max((p for p in spilled.positions if p <= limit), default=0)
            if position > best_position:
                best, best_position = spilled, position
        if isinstance(best, SpilledEntry):
            best = self._bring_back(best, model, models)
            if best is None:  # a file that cannot be used (warned, removed): look again
                return self._deepest(model, tokens)
        return None if best is None else (best, best_position)

    def _spill_models(self, model) -> Optional[list]:
        """The models the spilled files of this model key are checked against; None
        while they cannot be (the server has another model loaded)."""
        if self.spill_models is not None:
            return self.spill_models(model)
        return [_maker_model(self.make_cache)]

    def _bring_back(self, spilled: SpilledEntry, model, models: list) -> Optional[_Entry]:
        """A spilled entry read from its file into memory (None if it cannot be used)."""
        loaded = self.spill.load(spilled, models)
        if loaded is None:
            return None
        entry = _Entry(model, spilled.tokens, *loaded)
        entry.nbytes = _entry_bytes(entry)
        self._entries[id(entry)] = entry
        self._shrink(self.max_entries, self.max_bytes)
        return entry

    # --- storing --------------------------------------------------------------

    def insert(self, tokens: Sequence[int], cache: list, model: Any = None, *,
               keep_kv: bool = True) -> None:
        """Store `cache`, which has read `tokens` (tokens it has not read, such as a
        last generated token, are dropped), with the checkpoints it kept. The cache
        is the store's now. keep_kv=False keeps only its states, as checkpoints for an
        entry that holds (or will hold) the K/V: a request's prompt read part way."""
        read = _tokens_read(cache)  # a draft model's caches may have read one fewer
        if read is not None and read < len(tokens):
            tokens = tokens[:read]
        entry = _Entry(model, np.asarray(list(tokens), dtype=np.int64), cache)
        entry.checkpoints = _taken_checkpoints(cache)
        if not keep_kv:
            entry.checkpoints[len(entry.tokens)] = _end_states(cache)
            entry.cache = None
        for other in list(self._entries.values()):
            if other.model == model:
                self._merge(entry, other)
        if entry.cache is None and self._give_to_holder(entry):
            return
        self._thin(entry)
        self._entries[id(entry)] = entry
        self._shrink(self.max_entries, self.max_bytes)

    def _merge(self, new: _Entry, old: _Entry) -> None:
        """Fold `old` into `new` where new's tokens extend old's and new can stand in
        for it: old's states become checkpoints of new, old goes."""
        shared = common_prefix(old.tokens, new.tokens)
        if shared < len(old.tokens):
            return
        if new.cache is None and old.cache is not None:
            return  # old holds K/V that new lacks: new goes to old instead (_give_to_holder)
        if new.cache is not None and not _can_cut_back(new.cache, len(old.tokens)):
            return  # a bounded K/V that has forgotten old's prefix
        states = dict(old.checkpoints)
        if old.cache is not None and _all_at(old.cache, len(old.tokens)):
            states[len(old.tokens)] = _end_states(old.cache)
        self._adopt(new, {p: state for p, state in states.items()
                          if new.cache is None or p < len(new.tokens)})  # new's end is its own
        del self._entries[id(old)]

    def _give_to_holder(self, states: _Entry) -> bool:
        """A checkpoints-only entry goes to an entry holding K/V of its tokens, if any."""
        for holder in self._entries.values():
            if (holder.model == states.model and holder.cache is not None
                    and common_prefix(holder.tokens, states.tokens) == len(states.tokens)
                    and all(_can_cut_back(holder.cache, p) for p in states.checkpoints)):
                self._adopt(holder, states.checkpoints)
                return True
        return False

    # --- memory ---------------------------------------------------------------

    def _adopt(self, entry: _Entry, states: Dict[int, List[LayerState]]) -> None:
        """Checkpoints from another entry, where this one has none, then thinned."""
        for position, state in states.items():
            entry.checkpoints.setdefault(position, state)
        self._thin(entry)

    def _thin(self, entry: _Entry) -> None:
        """Keep the entry's checkpoints every interval, its RECENT_CHECKPOINTS deepest
        others and its first (where a conversation's system prompt ends, which new
        chats share); count its bytes."""
        every = self.checkpoint_interval
        others = sorted((p for p in entry.checkpoints if not every or p % every), reverse=True)
        for position in others[RECENT_CHECKPOINTS:-1]:  # the first too: the system prompt's end
            del entry.checkpoints[position]
        entry.nbytes = _entry_bytes(entry)

    def trim_to(self, n_entries: Optional[int] = None, n_bytes: Optional[int] = None) -> None:
        """Evict least recently used entries until at most n_entries and n_bytes remain."""
        self._shrink(n_entries, n_bytes)

    def _shrink(self, n_entries: Optional[int], n_bytes: Optional[int]) -> None:
        """n_entries counts entries holding K/V (mlx-lm's "distinct KV caches"); the
        checkpoints-only ones of prompts being read count toward the bytes."""
        def evict(entry):
            del self._entries[id(entry)]
            if self.spill is not None and entry.cache is not None:
                self._spill(entry)
            self._hand_on(entry)

        while n_entries is not None and self.kv_entry_count > max(0, n_entries):
            evict(next(e for e in self._entries.values() if e.cache is not None))
        while self._entries and n_bytes is not None and self.nbytes > max(0, n_bytes):
            evict(next(iter(self._entries.values())))

    def _spill(self, entry: _Entry) -> None:
        """Write an entry holding K/V to the spill folder, with the states it can be
        served from (checkpoint-only entries are not: their states are handed on)."""
        states = {p: s for p, s in entry.checkpoints.items() if _can_cut_back(entry.cache, p)}
        self.spill.put(entry.model, entry.tokens, entry.cache, states,
                       end_is_state=_all_at(entry.cache, len(entry.tokens)))

    def _hand_on(self, evicted: _Entry) -> None:
        """The checkpoints of an evicted entry that another entry's K/V can still be cut
        back to go to the entry sharing most of its tokens (the rest go with it)."""
        heirs = [e for e in self._entries.values() if e.model == evicted.model and e.cache is not None]
        if not heirs or not evicted.checkpoints:
            return
        shared = [common_prefix(e.tokens, evicted.tokens) for e in heirs]
        heir, depth = max(zip(heirs, shared), key=lambda pair: pair[1])
        self._adopt(heir, {p: s for p, s in evicted.checkpoints.items()
                           if p <= depth and _can_cut_back(heir.cache, p)})


def message_boundaries(tokenizer, messages: List[dict], prompt: Sequence[int],
                       **template_args) -> List[int]:
    """Where a chat prompt's last messages (BOUNDARY_MESSAGES) start: after the
    header the template writes before each one's content (as mlx-lm finds the end
    of the system prompt), which every edit of that content shares. Found as the
    tokens the prompt shares with the conversation up to the message, rendered
    with the message empty (template_args: what the prompt was rendered with,
    e.g. tools). Any position is a valid checkpoint; pass these to fetch()."""
    found = set()
    for k in range(max(1, len(messages) - BOUNDARY_MESSAGES), len(messages)):
        emptied = messages[:k] + [{"role": messages[k]["role"], "content": ""}]
        try:
            tokens = tokenizer.apply_chat_template(emptied, add_generation_prompt=False,
                                                   tokenize=True, **template_args)
        except Exception:  # a template that cannot render a part of the conversation
            continue
        found.add(common_prefix(getattr(tokens, "input_ids", tokens), prompt))
    return sorted(p for p in found if 0 < p < len(prompt))


def _maker_model(make_cache):
    """The model whose method make_cache is (model.make_cache), or None."""
    return getattr(make_cache, "__self__", None)


# --- one entry's caches ---------------------------------------------------------

def common_prefix(a, b) -> int:
    """How many first tokens two token sequences share."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _tokens_read(cache: list) -> Optional[int]:
    """The tokens every cache of the list has read."""
    offsets = [c.offset for c in cache if isinstance(getattr(c, "offset", None), int)]
    return min(offsets) if offsets else None


def _all_at(cache: list, position: int) -> bool:
    """Whether every cache of the list has read exactly `position` tokens: its state
    is the state there (after speculative decoding the draft's may be a token behind)."""
    return all(getattr(c, "offset", None) == position for c in cache)


def _end_states(cache: list) -> List[LayerState]:
    return [(c.conv_state, c.ssm_state) if isinstance(c, FalconH1Cache) else None for c in cache]


def _taken_checkpoints(cache: list) -> Dict[int, List[LayerState]]:
    """The positions every Falcon-H1 cache of the list kept a checkpoint at, with
    each layer's state there; the caches keep none after."""
    kept = [c.take_checkpoints() if isinstance(c, FalconH1Cache) else None for c in cache]
    positions = set.intersection(*[set(k) for k in kept if k is not None] or [set()])
    return {p: [None if k is None else k[p] for k in kept] for p in sorted(positions)}


def _can_cut_back(cache: list, position: int) -> bool:
    """Whether every cache of the list can be cut back to `position`: its K/V trimmed
    there (a bounded K/V that has overwritten keys cannot), and no other state
    than a Falcon-H1 cache's (whose checkpoint gives it) or a K/V."""
    for c in cache:
        kv = c.kv if isinstance(c, FalconH1Cache) else c
        back = kv.offset - position
        if back == 0:
            continue
        if back < 0 or not hasattr(kv, "trim") or not kv.is_trimmable() or (
                not isinstance(c, FalconH1Cache) and type(kv).__name__ not in _CUT_ANYWHERE):
            return False
    return True


# mlx-lm's K/V caches that trim to any earlier position (a bounded one until full).
_CUT_ANYWHERE = {"KVCache", "QuantizedKVCache", "RotatingKVCache"}


def _restore(entry: _Entry, position: int) -> list:
    """A copy of the entry's caches at `position` (its end, or a checkpoint)."""
    restored = []
    for i, c in enumerate(entry.cache):
        c = copy.deepcopy(c)
        if not _all_at(entry.cache, position):  # a checkpoint (a draft may end there)
            kv = c.kv if isinstance(c, FalconH1Cache) else c
            kv.trim(kv.offset - position)
            if isinstance(c, FalconH1Cache):
                c.conv_state, c.ssm_state = entry.checkpoints[position][i]
                c.replay_to = None
                c.restart_rollback_window()  # the window starts afresh at the checkpoint
        restored.append(c)
    return restored


def _entry_bytes(entry: _Entry) -> int:
    arrays = {id(a): a for states in entry.checkpoints.values() for state in states
              if state is not None for a in state}
    held = sum(c.nbytes for c in entry.cache) if entry.cache is not None else 0
    return held + sum(a.nbytes for a in arrays.values())
