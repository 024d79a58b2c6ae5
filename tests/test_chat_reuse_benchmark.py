"""`python -m mlx_falcon_h1.benchmark --chat-reuse` (chat_reuse.py): the ideal prefix,
the request script a chat app and an agent follow, the answers' tokens read back
from a stream, the summary, and one short run against our server."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_falcon_h1 import chat_reuse as cr
from mlx_falcon_h1.benchmark import make_random_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(cr.SHIPPED_MODEL, {"chat_template": cr.CHATML})


def test_ideal_is_the_longest_prefix_shared_with_anything_seen():
    assert cr.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert cr.common_prefix([1, 2], [1, 2, 3]) == 2 and cr.common_prefix([], [1]) == 0
    assert cr.ideal_prefix([1, 2, 3], []) == 0  # nothing seen yet
    seen = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7], [1, 9]]  # a prompt, a prompt + its answer, another
    assert cr.ideal_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], seen) == 7  # continues after the answer
    assert cr.ideal_prefix([1, 2, 3, 4, 5, 0], seen) == 5  # edited inside the answer
    assert cr.ideal_prefix([1, 9, 9], seen) == 2
    assert cr.ideal_prefix([1, 2, 3], seen) == 3  # a prefix of what was seen: all of it


def texts():
    return {k: k.upper() for k in list(cr.SIZES) + ["system", "agent_system"]} | cr.QUESTIONS


def run_script(t, answer=None):
    """Every (shape, messages) of the script, each request answered with `answer`
    (default: request i with 'A<i>')."""
    gen, out = cr.script(t), []
    request = next(gen)
    while True:
        out.append(request)
        try:
            request = gen.send(answer or f"A{len(out)}")
        except StopIteration:
            return out


def test_script_is_a_chat_app_and_an_agent():
    requests = run_script(texts())
    assert tuple(shape for shape, _ in requests) == cr.SCRIPT
    msgs = [m for _, m in requests]
    system = {"role": "system", "content": "SYSTEM"}
    user = lambda doc, q: {"role": "user", "content": f"{doc}\n\nQuestion: {cr.QUESTIONS[q]}"}  # noqa: E731
    assistant = lambda n: {"role": "assistant", "content": f"A{n}"}  # noqa: E731
    # Turns: each appends the server's answer to the request before and a new user message.
    assert msgs[0] == [system, user("DOC1", "q1")]
    assert msgs[1] == msgs[0] + [assistant(1), user("DOC2", "q2")]
    assert msgs[2] == msgs[1] + [assistant(2), user("DOC3", "q3")]
    assert msgs[3] == msgs[2]  # regenerate: the same messages again
    # Edit the last user message: the same document, another question.
    assert msgs[4][:-1] == msgs[2][:-1] and msgs[4][-1] == user("DOC3", "q3_edited")
    # Edit an earlier one (the second user message): the conversation branches there.
    assert msgs[5] == msgs[2][:3] + [user("DOC2", "q2_edited")]
    assert msgs[6] == msgs[5] + [assistant(6), user("DOC4", "q4")]  # the branch goes on with its answer
    assert msgs[7] == [system, user("DOC5", "q5")]  # a new chat, the same system prompt
    # The agent: tool output appended after its answer, the step retried, the retry's answer kept.
    agent = [{"role": "system", "content": "AGENT_SYSTEM"}, user("TASK_DOC", "task")]
    assert msgs[8] == agent
    assert msgs[9] == agent + [assistant(9), {"role": "tool", "content": "TOOL1"}]
    assert msgs[10] == msgs[9]
    assert msgs[11] == msgs[10] + [assistant(11), {"role": "tool", "content": "TOOL2"}]


@pytest.mark.parametrize("context", [500, 3000])
def test_script_texts_reach_the_context_and_share_no_document(tokenizer, context):
    t, longest = cr.sized_texts(cr.TextPool(tokenizer), tokenizer, context, 16)
    docs = [t[k] for k in cr.SIZES if k not in ("system", "agent_system")]
    assert len(set(docs)) == len(docs) and all(not d[:1].isspace() for d in docs)
    requests = run_script(t)
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for _, m in requests]
    assert context <= max(map(len, prompts)) <= longest < 1.05 * context + 300  # whole lines, fixed text
    cold = cr.cold_variant(requests[2][1], 0)
    cold_prompt = tokenizer.apply_chat_template(cold, add_generation_prompt=True, tokenize=True)
    assert cr.ideal_prefix(cold_prompt, prompts) < 16  # the template's first tokens only


def test_forced_answer_comes_back_as_the_tokens_generated(tokenizer):
    """The forced token, streamed as a server streams it and sent back in the next
    request, is the same tokens right after the prompt it answered, at every step
    of the script that appends an answer (the ideal counts on it)."""
    t = cr.script_texts(cr.TextPool(tokenizer), 400)
    k = 8
    token = cr.forced_answer_token(tokenizer, t, k)
    text = cr.streamed_text(tokenizer, [token] * k)
    requests = run_script(t, text)
    encode = lambda m: tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)  # noqa: E731
    for before, after in ((0, 1), (1, 2), (5, 6), (8, 9), (10, 11)):
        prompt = encode(requests[before][1])
        assert encode(requests[after][1])[: len(prompt) + k] == prompt + [token] * k, (before, after)


def test_answer_tokens_read_back_from_the_stream(tokenizer):
    # mlx-lm streams an answer without its first token's leading space.
    spaced = tokenizer.encode(" return x", add_special_tokens=False)
    assert cr.streamed_text(tokenizer, spaced) == "return x"
    plain = tokenizer.encode("return x", add_special_tokens=False)
    tokens, how = cr.generated_tokens(tokenizer, "return x", len(plain), "length")
    assert tokens == plain and how in ("exact", "ambiguous")
    eos = min(tokenizer.eos_token_ids)
    tokens, _ = cr.generated_tokens(tokenizer, "return x", len(plain) + 1, "stop")  # the stop token counts
    assert tokens == plain + [eos]
    assert cr.generated_tokens(tokenizer, "return x", 99, "length")[1] == "guess"


def test_summary_per_shape():
    def record(shape, prompt, cached, ideal, ttft, kind="script"):
        return dict(kind=kind, shape=shape, prompt_tokens=prompt, cached_tokens=cached, ideal_capped=ideal,
                    beyond_ideal=ideal - cached, ttft_s=ttft)  # fmt: skip

    records = [record("chat-turn", 100, 50, 60, 1.0), record("chat-turn", 200, 150, 150, 0.5),
               record("edit-last", 300, 100, 290, 2.0), record("edit-last", 310, 0, 10, 4.0, kind="cold")]
    records[2]["cold_ttft_s"] = 4.0
    s = cr.summarise(records)
    assert list(s) == ["chat-turn", "edit-last", "all"]
    assert s["chat-turn"]["cached_over_ideal"] == pytest.approx(200 / 210)
    assert s["chat-turn"]["reread_beyond_ideal_max"] == 10 and s["chat-turn"]["cold_ttft_s"] is None
    assert s["edit-last"]["ttft_over_cold"] == pytest.approx(0.5)
    assert s["all"]["requests"] == 3 and s["all"]["reread_beyond_ideal_max"] == 190  # cold reads left out
    assert s["all"]["prompt_tokens_read"] == 50 + 50 + 200


def test_random_model_gets_the_shipped_tokenizer(tmp_path):
    def tiny(shape, out, dtype, layers, vocab=4096):
        return make_random_model("tiny", out, dtype, layers, dict(vocab_size=vocab))

    folder = cr.random_chat_model("tiny", 1, tmp_path, tiny)
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer.json").exists() and (folder / "chat_template.jinja").exists()
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"]
    with pytest.raises(ValueError, match="do not fit"):  # a vocabulary the tokenizer's ids overflow
        cr.random_chat_model("tiny", 2, tmp_path, lambda *a: tiny(*a, vocab=512))


def test_short_run_against_our_server(tmp_path):
    """The whole command on the shipped model, ours only, tiny sizes: every request
    reported, and today's server reuses what it must (the end of the previous
    answer on each turn and tool output; all but the last token on a resend)."""
    out = tmp_path / "chat_reuse.json"
    cmd = [sys.executable, "-m", "mlx_falcon_h1.benchmark", "--chat-reuse", "--no-stock", "--context-tokens",
           "300", "--max-tokens", "4", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| shape |" in done.stdout and done.stderr.count(" script ") == len(cr.SCRIPT)
    result = json.loads(out.read_text())
    records = result["records"]["ours"]
    script = [r for r in records if r["kind"] == "script"]
    assert tuple(r["shape"] for r in script) == cr.SCRIPT
    for r in records:
        assert r["prompt_tokens"] == r["client_prompt_tokens"], r  # the client's template is the server's
        assert 0 <= r["cached_tokens"] < r["prompt_tokens"] and r["ideal_capped"] < r["prompt_tokens"]
    for r in script:
        if r["shape"] in ("chat-turn", "tool-output", "regenerate", "retry", "new-chat"):
            assert r["cached_tokens"] == r["ideal_capped"] > 0, r
    colds = [r for r in records if r["kind"] == "cold"]
    assert len(colds) == len(set(cr.SCRIPT)) and all(r["cached_tokens"] == 0 for r in colds)
    assert result["summary"]["ours"]["edit-earlier"]["ttft_over_cold"] > 0
