"""A chat app's own loop (no server) reusing every shared prefix with
mlx_falcon_h1.prompt_cache.PromptCache: a conversation, a regenerated answer, an
edited earlier message; for each, the tokens read and the time to the first token.

    python examples/chat_loop_prompt_cache.py                 # the shipped model
    python examples/chat_loop_prompt_cache.py --model PATH --checkpoint-interval 512

What the app does per request: fetch the deepest stored state of the prompt,
generate from the tokens still to read with that cache, store the cache with
the tokens it has read (prompt and answer).
"""

import argparse
import time
from pathlib import Path

from mlx_falcon_h1 import load  # first: on Linux it picks MLX's BLAS
from mlx_falcon_h1.commands import DEFAULT_MODEL
from mlx_falcon_h1.prompt_cache import DEFAULT_CHECKPOINT_INTERVAL, PromptCache, message_boundaries
from mlx_lm import stream_generate

DOCUMENT = (Path(__file__).parent.parent / "mlx_falcon_h1" / "model.py").read_text()


def answer(model, tokenizer, store: PromptCache, messages, max_tokens: int):
    """One request as an app serves it; returns (text, prompt tokens, tokens read, seconds
    to the first token)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = time.perf_counter()
    # Checkpoints at the messages' ends too: where an edit or a branch starts.
    cache, rest = store.fetch(prompt, boundaries=message_boundaries(tokenizer, messages, prompt))
    generated, first = [], None
    for response in stream_generate(model, tokenizer, rest, max_tokens=max_tokens,
                                    prompt_cache=cache):
        first = first or time.perf_counter() - start
        generated.append(response.token)
    store.insert(prompt + generated, cache)  # the tokens the cache has read
    return tokenizer.decode(generated), len(prompt), len(rest), first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--checkpoint-interval", type=int, default=DEFAULT_CHECKPOINT_INTERVAL)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--document-chars", type=int, default=6000,
                   help="Characters of a source file pasted into the first message.")
    args = p.parse_args(argv)

    model, tokenizer = load(args.model)
    store = PromptCache(model.make_cache, checkpoint_interval=args.checkpoint_interval)
    system = {"role": "system", "content": "You are a careful reviewer of Python code."}
    doc = DOCUMENT[: args.document_chars]
    first = {"role": "user", "content": "Review this module:\n" + doc}
    edited = {"role": "user", "content": "Review this module briefly:\n" + doc}

    conversation = [system, first]
    text, *row = answer(model, tokenizer, store, conversation, args.max_tokens)
    rows = [("first request", *row)]
    rows.append(("regenerate", *answer(model, tokenizer, store, conversation, args.max_tokens)[1:]))
    conversation += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "Which function is the longest?"}]
    rows.append(("next turn", *answer(model, tokenizer, store, conversation, args.max_tokens)[1:]))
    conversation[-1] = {"role": "user", "content": "Which function is the shortest?"}
    rows.append(("edit the last message",
                 *answer(model, tokenizer, store, conversation, args.max_tokens)[1:]))
    conversation[1] = edited  # everything after the edit must be read again
    rows.append(("edit the first message",
                 *answer(model, tokenizer, store, conversation, args.max_tokens)[1:]))

    print(f"{'request':24s} {'prompt':>7s} {'read':>6s} {'first token':>12s}")
    for name, prompt, read, seconds in rows:
        print(f"{name:24s} {prompt:7d} {read:6d} {seconds:11.2f}s")
    print(f"stored: {len(store)} entries, {store.checkpoint_count} checkpoints, "
          f"{store.nbytes / 2**20:.1f} MiB")
    return rows


if __name__ == "__main__":
    main()
