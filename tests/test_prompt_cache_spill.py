"""PromptCache(spill_dir=...): an entry evicted from memory is written to disk and
served from there exactly as from memory (the logits of reading the prompt cold,
no more re-read than before it was evicted), by this store and by a new one on
the folder (an app restarted); a file that does not fit the model, is truncated
or half-written is never used; the folder stays within its bound."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_checkpoint, running_server
from mlx_falcon_h1 import load_model
from mlx_falcon_h1 import prompt_cache_spill
from mlx_falcon_h1.prompt_cache import PromptCache
from test_prompt_cache import INTERVAL, assert_exact, cold, read, tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The model, a draft of the same vocabulary, and a model of other sizes (SSM state
    size 16, not 8): head_dim 32 for --kv-bits groups of 32."""
    loaded = []
    for seed, sizes in ((0, {}), (1, {}), (2, {"mamba_d_state": 16})):
        path = tmp_path_factory.mktemp(f"m{seed}")
        make_checkpoint(path, seed=seed, head_dim=32, **sizes)
        loaded.append(load_model(path)[0])
    return loaded


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def store_of(models, folder, setting="plain", **kwargs):
    used = models[:2] if setting == "draft" else models[:1]
    window = 512 if setting == "max-kv-size" else None

    def make_cache():
        return [c for m in used for c in m.make_cache(max_kv_size=window)]

    kwargs.setdefault("max_entries", 1)
    return PromptCache(make_cache, checkpoint_interval=INTERVAL, spill_dir=folder,
                       spill_models=lambda key: used, **kwargs), used


def answered(store, used, prompt, kv_bits=None, boundaries=()):
    """A request served and stored, as an app does: the prompt read, the cache stored."""
    cache, rest = store.fetch(prompt, boundaries=boundaries)
    read(used, cache, rest, kv_bits)
    store.insert(prompt, cache)


def a_conversation(rng):
    """A first prompt, and requests that share a known prefix with it."""
    first = tokens(rng, 300)
    return first, [
        ("regenerate", first),
        ("next turn", first + tokens(rng, 40)),
        ("edit the last message", first[:250] + tokens(rng, 30)),
        ("edit at a boundary", first[:90] + tokens(rng, 50)),
    ]


@pytest.mark.parametrize("setting", ["plain", "kv-bits", "max-kv-size", "draft"])
def test_an_evicted_entry_comes_back_from_disk_exact(models, tmp_path, setting):
    rng = np.random.RandomState(1)
    kv_bits = 8 if setting == "kv-bits" else None
    store, used = store_of(models, tmp_path, setting)
    first, requests = a_conversation(rng)
    answered(store, used, first, kv_bits, boundaries=[90])
    before = {name: len(store.fetch(prompt)[1]) for name, prompt in requests}
    assert before["regenerate"] == 1 and before["edit at a boundary"] == 50
    answered(store, used, tokens(rng, 120), kv_bits)  # another conversation: the first is spilled
    assert len(store) == 1 and len(store.spill) == 1
    written = store.spill.entries(None)
    for name, prompt in requests:
        store.trim_to(0)  # every entry to disk: each request is served from its file
        assert len(store) == 0
        cache, rest = store.fetch(prompt)
        assert len(rest) == before[name], name
        want = cold(used, prompt, store.make_cache, kv_bits)
        assert_exact(read(used, cache, rest, kv_bits), want)
    assert all(s.path.exists() for s in written)  # brought back and evicted unchanged: kept


def test_a_new_store_on_the_folder_reuses_it(models, tmp_path):
    """The app restarted: the entries its last run spilled (evicted, or all of them at
    exit with spill_all) serve the next run's prompts."""
    rng = np.random.RandomState(2)
    store, used = store_of(models, tmp_path, max_entries=2)
    first, second = tokens(rng, 200), tokens(rng, 150)
    answered(store, used, first)
    answered(store, used, second)
    store.trim_to(1)  # the first to disk; the second stays in memory...
    assert len(store.spill) == 1
    store.spill_all()  # ...until the app exits
    assert len(store.spill) == 2
    del store
    later, _ = store_of(models, tmp_path)
    for prompt in (first + tokens(rng, 20), second + tokens(rng, 7)):
        cache, rest = later.fetch(prompt)
        assert len(rest) == len(prompt) - (200 if prompt[:200] == first else 150)
        assert_exact(read(used, cache, rest), cold(used, prompt, later.make_cache))


def test_a_file_for_another_model_is_skipped_with_a_warning_and_removed(models, tmp_path):
    """One folder, several models: a file under another model key is left alone; one
    under the same key but of other sizes (the folder's model was replaced) is
    skipped with a warning naming it, removed, and the prompt read cold."""
    rng = np.random.RandomState(3)
    prompt = tokens(rng, 200)
    other, _ = store_of(models[2:], tmp_path)  # same key (None), SSM state size 16
    answered(other, models[2:], prompt)
    other.trim_to(0)
    keyed = PromptCache(models[0].make_cache, spill_dir=tmp_path)  # same model, its own key
    cache, rest = keyed.fetch(prompt, model="model-a")
    read(models[:1], cache, rest)
    keyed.insert(prompt, cache, model="model-a")
    keyed.trim_to(0)
    (mismatched,) = [s.path for s in other.spill.entries(None)]
    assert len(files(tmp_path)) == 2

    store, used = store_of(models, tmp_path)
    assert len(store.fetch(prompt, model="model-b")[1]) == len(prompt)  # no file of model-b
    with pytest.warns(UserWarning, match=f"{mismatched}.*SSM state"):
        cache, rest = store.fetch(prompt)
    assert rest == prompt and not mismatched.exists() and len(files(tmp_path)) == 1
    assert len(store.fetch(prompt, model="model-a")[1]) == 1  # model-a's file still serves it


@pytest.mark.parametrize("when", ["before the folder is opened", "after"])
def test_a_truncated_file_is_skipped_with_a_warning_and_removed(models, tmp_path, when):
    rng = np.random.RandomState(4)
    prompt = tokens(rng, 200)
    store, used = store_of(models, tmp_path)
    answered(store, used, prompt)
    store.trim_to(0)
    (path,) = tmp_path.iterdir()

    def truncate():
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])

    if when == "after":
        store, _ = store_of(models, tmp_path)
        truncate()
        with pytest.warns(UserWarning, match=str(path)):
            cache, rest = store.fetch(prompt)
    else:
        truncate()
        with pytest.warns(UserWarning, match=f"{path}.*truncated"):
            store, _ = store_of(models, tmp_path)
        cache, rest = store.fetch(prompt)
    assert rest == prompt and not path.exists()
    assert_exact(read(used, cache, rest), cold(used, prompt, store.make_cache))


def test_the_folder_stays_within_its_bound(models, tmp_path):
    """Least recently used (written or read) files go first."""
    rng = np.random.RandomState(5)
    store, used = store_of(models, tmp_path)
    prompts = [tokens(rng, 150) for _ in range(6)]
    answered(store, used, prompts[0])
    store.trim_to(0)
    (one,) = tmp_path.iterdir()
    bound = int(2.5 * one.stat().st_size)  # two entries of this length fit, not three
    store, _ = store_of(models, tmp_path, spill_bytes=bound)
    for i, prompt in enumerate(prompts[1:], 1):
        if i == 4:
            store.fetch(prompts[2])  # read back from disk (prompts[3] goes to disk after it)
        answered(store, used, prompt)
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
        assert on_disk <= bound, (i, on_disk, bound)
    # Written in the order 0, 1, 2, 3, 4; prompts[2] was read back and used (evicted
    # again) after 3 was written: 0, 1 and 3 go.
    kept = [prompts.index(list(s.tokens)) for s in store.spill.entries(None)]
    assert sorted(kept) == [2, 4] and len(list(tmp_path.iterdir())) == 2


def test_nothing_half_written_is_read(models, tmp_path, monkeypatch):
    """A write that fails leaves no file under an entry's name; a temporary file (a
    write under way, or one a crash left) is never read, and goes once stale."""
    rng = np.random.RandomState(6)
    prompt = tokens(rng, 200)
    store, used = store_of(models, tmp_path)
    answered(store, used, prompt)
    save = prompt_cache_spill.save_prompt_cache

    def dies_half_way(path, cache, metadata):
        save(path, cache, metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prompt_cache_spill, "save_prompt_cache", dies_half_way)
    with pytest.warns(UserWarning, match="No space left"):
        store.trim_to(0)
    assert files(tmp_path) == [] and len(store.spill) == 0
    monkeypatch.setattr(prompt_cache_spill, "save_prompt_cache", save)

    answered(store, used, prompt)
    store.trim_to(0)
    (path,) = tmp_path.iterdir()
    fresh = tmp_path / f".{path.stem}.{'1' * 32}.tmp.safetensors"
    stale = tmp_path / f".{path.stem}.{'2' * 32}.tmp.safetensors"
    for temp in (fresh, stale):
        temp.write_bytes(path.read_bytes()[:5000])
    old = time.time() - 2 * prompt_cache_spill.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    path.unlink()  # only the temporary files hold this prompt now
    store, _ = store_of(models, tmp_path)
    assert len(store.spill) == 0 and files(tmp_path) == [fresh.name]
    assert store.fetch(prompt)[1] == prompt


def test_the_server_reuses_a_conversation_spilled_to_disk_and_after_a_restart(tmp_path):
    """`--prompt-cache-dir` with room for one conversation in memory: two alternate,
    each evicting the other to disk, and each next turn still reads only its new
    messages; a new server on the folder does too, for both (the first wrote what
    it held in memory when stopped). Answers are those of a cold read."""
    from mlx_falcon_h1 import load
    from mlx_falcon_h1.commands import DEFAULT_MODEL
    from mlx_falcon_h1.prompt_cache import common_prefix
    from test_server_prompt_cache import INTERVAL as SERVER_INTERVAL
    from test_server_prompt_cache import TEXT, chat, cold as cold_logprobs

    model, tokenizer = load(str(DEFAULT_MODEL))
    conversations = {name: [{"role": "system", "content": f"{name} reviews. " + TEXT[i:i + 1500]}]
                     for name, i in (("Ann", 0), ("Bob", 4000))}
    seen, turn, last = [], iter(range(100)), {}

    def next_turn(port, name):
        """The conversation's next question, answered; how many tokens it reused, the
        ideal, and the length of the conversation's previous prompt."""
        messages = conversations[name]
        i = next(turn)
        question = TEXT[8000 + 300 * i:8300 + 300 * i]
        messages.append({"role": "user", "content": f"Q{i}: {question}"})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text, usage, logprobs, ids = chat(port, messages, seed=False)
        messages.append({"role": "assistant", "content": text})
        ideal = min(max([common_prefix(s, prompt) for s in seen], default=0), len(prompt) - 1)
        previous = last.get(name, 0)
        seen.append(prompt + ids)
        last[name] = len(prompt)
        assert np.allclose(logprobs, cold_logprobs(model, tokenizer, prompt), rtol=0, atol=1e-4)
        return usage["prompt_tokens_details"]["cached_tokens"], ideal, previous

    flags = ("--checkpoint-interval", str(SERVER_INTERVAL), "--prompt-cache-dir", str(tmp_path),
             "--prompt-cache-size", "1")
    with running_server(*flags) as port:
        assert next_turn(port, "Ann")[0] == 0 and next_turn(port, "Bob")[0] == 0
        assert len(list(tmp_path.glob("*.safetensors"))) == 1  # Ann's, evicted by Bob's
        for name in ("Ann", "Bob"):  # each brought back from disk, the other spilled
            cached, ideal, _ = next_turn(port, name)
            assert ideal > SERVER_INTERVAL, "without the folder this turn would reuse nothing"
            assert ideal - SERVER_INTERVAL <= cached <= ideal, (name, cached, ideal)
    # Stopped (SIGTERM), the server wrote what it held in memory too (Bob's last turn).
    with running_server(*flags) as port:
        for name in ("Ann", "Bob"):
            # From the last turn's entry, which only the spill at SIGTERM kept: its end,
            # or (where the answer's text tokenizes otherwise in the new prompt) its
            # checkpoint one token before its prompt's end. An older entry ends before.
            cached, ideal, previous = next_turn(port, name)
            assert previous - 1 <= cached <= ideal, (name, cached, ideal, previous)


@pytest.mark.parametrize("flags, error", [
    (["--prompt-cache-dir-bytes", "5GB"],
     "error: --prompt-cache-dir-bytes bounds the folder --prompt-cache-dir names; give that too"),
    (["--prompt-cache-dir", "{dir}", "--prompt-cache-dir-bytes", "5XB"],
     "error: --prompt-cache-dir-bytes needs a size in bytes (10GB, 500M), not '5XB'"),
    (["--prompt-cache-dir"], "error: --prompt-cache-dir needs a folder"),
])
def test_bad_folder_flags_are_refused_in_one_line(tmp_path, flags, error):
    flags = [f.format(dir=tmp_path) for f in flags]
    done = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.server", *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [error]


def test_the_server_refuses_a_folder_under_mlx_launch(monkeypatch, tmp_path):
    """Each process of a distributed server holds its shard of every cache: a file one
    could not use would leave them at different states."""
    from types import SimpleNamespace

    from mlx_falcon_h1 import server
    from mlx_falcon_h1.server import ServerPromptCache

    monkeypatch.setattr(server.FalconResponseGenerator, "prompt_cache_dir", str(tmp_path))
    monkeypatch.setattr(server.mx.distributed, "init", lambda: SimpleNamespace(size=lambda: 2))
    provider = SimpleNamespace(cli_args=SimpleNamespace(prompt_cache_bytes=None))
    with pytest.raises(ValueError, match="mlx.launch"):
        server.FalconResponseGenerator(provider, ServerPromptCache())


def test_a_store_that_cannot_check_its_files_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match="spill_models"):
        PromptCache(lambda: models[0].make_cache(), spill_dir=tmp_path)
