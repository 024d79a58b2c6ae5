"""Train a tiny Falcon-H1 on the Python standard library, reproducibly, on CPU.

The result is a genuine transformers checkpoint (FalconH1ForCausalLM, loaded by
`from_pretrained`) plus a byte-level BPE tokenizer, used by this project as its
real-model fixture and shipped default model. No downloads: the corpus is the
.py source of the running interpreter's standard library.

    python examples/train_tiny_falcon_h1.py --minutes 50          # the real run
    python examples/train_tiny_falcon_h1.py --steps 1234          # replay a run exactly

What is reproducible: with the same Python (same stdlib files), torch build,
thread count and `--steps`, every number is bit-identical. `--minutes` turns the
wall-time budget into a step count by timing the first steps, so two `--minutes`
runs on different machines may train for different step counts; the JSON log
records the count (`steps`), and `--steps` replays it exactly.

Outputs (defaults are the project's committed fixture paths):
  --out        checkpoint folder: config.json, model.safetensors (bfloat16),
               generation_config.json, tokenizer.json, tokenizer_config.json,
               training_log.json (loss curve, held-out and unigram perplexity,
               greedy samples, config, timings)
  --heldout    the held-out text (a deterministic slice of the held-out files)

The held-out perplexity printed here is computed the way
`python -m mlx_falcon_h1.evaluate` computes it (same tokenization, windows and
token cap), on the saved bfloat16 weights read back in float32, so the two
numbers can be compared directly.
"""

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# A base model: the "chat" template passes the text through (after BOS), so that
# chat-template-by-default tools (mlx_lm.generate) continue the prompt as code.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
# No trailing newline: BPE merges "\n" with the next line's indent, so a prompt
# ending in a bare "\n" token asks for a token boundary training never shows.
PROMPTS = [
    "def fibonacci(n):",
    "def read_file(path",
    "def __init__(self, ",
    "class Stack:\n    def push(self, item",
]

# Falcon-H1-0.5B's muP multipliers (its config.json).
MUP_05B = dict(
    embedding_multiplier=5.656854249492381,
    lm_head_multiplier=0.0390625,
    key_multiplier=0.39062499999999994,
    attention_in_multiplier=1.0,
    attention_out_multiplier=0.9375,
    ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.23570226039551587,
    mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/tiny_falcon_h1_hf")
    p.add_argument("--heldout", type=Path, default=ROOT / "mlx_falcon_h1/data/heldout.txt")
    p.add_argument("--minutes", type=float, default=50.0, help="wall-time budget for training")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--holdout-every", type=int, default=20, help="every Nth file is held out")
    p.add_argument("--heldout-bytes", type=int, default=200_000)
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out token cap")
    p.add_argument("--eval-every", type=int, default=50, help="steps between quick evals")
    p.add_argument("--timing-steps", type=int, default=8, help="steps timed for --minutes")
    p.add_argument("--sample-tokens", type=int, default=48)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def stdlib_files():
    """Sorted .py files of this interpreter's standard library, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append((rel.as_posix(), text))
    return root, files


def split_files(files, every):
    heldout = [f for i, f in enumerate(files) if i % every == every // 2]
    train = [f for i, f in enumerate(files) if i % every != every // 2]
    return train, heldout


def heldout_text(heldout, limit):
    """Whole held-out files, in order, until `limit` bytes (the last cut at a line)."""
    parts, size = [], 0
    for _, text in heldout:
        text = text if text.endswith("\n") else text + "\n"
        room = limit - size
        if len(text.encode()) > room:
            cut = text.encode()[:room].decode("utf-8", "ignore")
            cut = cut[: cut.rfind("\n") + 1]
            if cut:
                parts.append(cut)
            break
        parts.append(text)
        size += len(text.encode())
    return "\n".join(parts)


def train_tokenizer(texts, vocab_size, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    wrapped.save_pretrained(out)
    # transformers 5 names its own class (TokenizersBackend), unknown to 4.x;
    # the 4.x name loads as the same class in 5.
    config_file = Path(out) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return wrapped


def heldout_tokens(tokenizer, text, cap):
    # The same definition as mlx_falcon_h1.evaluate: BOS + text, first `cap` tokens.
    ids = tokenizer(text, verbose=False)["input_ids"]
    return np.asarray(ids[:cap] if cap else ids, dtype=np.int64)


# ----------------------------------------------------------------------------- model


def make_config(args):
    from transformers import FalconH1Config

    d = args.hidden_size
    return FalconH1Config(
        vocab_size=args.vocab_size,
        hidden_size=d,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=(3 * d) // 16,  # 48 for d = 256: not d / heads
        mamba_d_ssm=d,
        mamba_n_heads=d // 32,
        mamba_d_head="auto",
        mamba_n_groups=1,
        mamba_d_state=32,
        mamba_d_conv=4,
        mamba_chunk_size=64,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_theta=1e11,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **MUP_05B,
    )


def lr_at(step, total, args):
    # Warmup does not depend on `total`, so the steps timed for --minutes (all
    # inside the warmup) have the learning rates a --steps replay gives them.
    warm = max(1, min(args.warmup, total - 1))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * t))


def windows(tokens, seq_len):
    """Consecutive windows of seq_len + 1 tokens overlapping by one: every token
    after the first is predicted once. Same as mlx_falcon_h1.evaluate."""
    out, i = [], 0
    while i + 1 < len(tokens):
        out.append(tokens[i : i + seq_len + 1])
        i += seq_len
    return out


def heldout_nll(model, tokens, seq_len, batch=8):
    """Summed next-token NLL (nats) and count over `tokens`, float32."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    wins = windows(tokens, seq_len)
    with torch.no_grad():
        for i in range(0, len(wins), batch):
            group = wins[i : i + batch]
            full = [w for w in group if len(w) == len(group[0])]
            rest = [w for w in group if len(w) != len(group[0])]
            for part in (full, rest):
                if not part:
                    continue
                x = torch.tensor(np.stack(part))
                logits = model(x[:, :-1]).logits.float()
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(nll)
                count += x[:, 1:].numel()
    model.train()
    return total, count


def unigram_nll(train_stream, targets, vocab_size):
    """Add-one-smoothed unigram model from the training tokens, on `targets`."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].sum()), len(targets)


def write_log(path, log):
    """JSON, one line per training step for the curve (it has thousands; 6 digits)."""
    short = lambda v: float(f"{v:.6g}") if isinstance(v, float) else v  # noqa: E731
    curve = ",\n  ".join(json.dumps({k: short(v) for k, v in c.items()}) for c in log["curve"])
    head = json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=1, default=float)
    path.write_text(head[:-2] + ',\n "curve": [\n  ' + curve + "\n ]\n}\n")


def greedy_samples(model, tokenizer, n):
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID)
            text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)
            out.append({"prompt": prompt, "continuation": text})
    model.train()
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import FalconH1ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "fast path not available": expected on CPU
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "training_log.json"

    def say(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # Data and tokenizer.
    stdlib, files = stdlib_files()
    train_files, heldout_files = split_files(files, args.holdout_every)
    say(f"{stdlib}: {len(files)} files, {len(train_files)} train / {len(heldout_files)} held out")
    tokenizer = train_tokenizer([t for _, t in train_files], args.vocab_size, args.out)
    encoded = tokenizer([t for _, t in train_files], add_special_tokens=False, verbose=False)["input_ids"]
    stream = np.concatenate([np.asarray([BOS_ID] + e + [EOS_ID], dtype=np.int64) for e in encoded])
    text = heldout_text(heldout_files, args.heldout_bytes)
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text(text, encoding="utf-8")
    eval_ids = heldout_tokens(tokenizer, text, args.eval_tokens)
    quick_ids = eval_ids[: 8 * args.seq_len + 1]
    train_bytes = sum(len(t.encode()) for _, t in train_files)
    say(
        f"tokenizer: vocab {len(tokenizer)}; train stream {len(stream):,} tokens "
        f"({train_bytes / len(stream):.2f} bytes/token); held-out text {len(text.encode()):,} "
        f"bytes, {len(eval_ids):,} tokens evaluated"
    )

    # Model.
    config = make_config(args)
    model = FalconH1ForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    log = {
        "command": sys.argv,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # which standard library, not where it lay on the machine that trained
        "stdlib": f"the standard library of {platform.python_implementation()} {platform.python_version()} (sysconfig stdlib)",
        "files": {"train": len(train_files), "heldout": len(heldout_files)},
        "train_stream_tokens": int(len(stream)),
        "heldout_text_bytes": len(text.encode()),
        "eval_tokens": int(len(eval_ids)),
        "parameters": n_params,
        "config": config.to_dict(),
        "curve": [],
        "evals": [],
    }

    def save_log():
        write_log(log_file, log)

    tokens_per_step = args.batch * args.seq_len

    def batch_at():
        starts = rng.integers(0, len(stream) - args.seq_len - 1, size=args.batch)
        return torch.tensor(np.stack([stream[s : s + args.seq_len + 1] for s in starts]))

    def train_step(step, total):
        lr = lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch_at()
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item(), gnorm.item(), lr

    # Steps: given, or fitted to the budget from the speed of the first steps.
    # The timing steps are real training steps at the warmup's first learning rate.
    model.train()
    t_train = time.time()
    total = args.steps
    step = 0
    if total is None:
        assert args.timing_steps < args.warmup, "the timing steps must lie in the warmup"
        for step in range(args.timing_steps):
            t0 = time.time()
            loss, gnorm, lr = train_step(step, 10**9)
            log["curve"].append({"step": step, "loss": loss, "lr": lr, "gnorm": gnorm, "s": time.time() - t0})
        # The first step pays for allocation; time the others.
        per_step = sum(c["s"] for c in log["curve"][1:]) / (args.timing_steps - 1)
        total = max(args.timing_steps + 1, int(args.minutes * 60 / per_step))
        step = args.timing_steps
        say(f"{per_step:.2f} s/step ({tokens_per_step / per_step:.0f} tok/s): {total} steps in {args.minutes} min")
    log["steps"] = total

    smooth = None
    for step in range(step, total):
        t0 = time.time()
        loss, gnorm, lr = train_step(step, total)
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        log["curve"].append({"step": step, "loss": loss, "lr": lr, "gnorm": gnorm, "s": time.time() - t0})
        if step % 10 == 0 or step == total - 1:
            elapsed = time.time() - t_train
            tps = (step + 1) * tokens_per_step / elapsed
            say(f"step {step}/{total} loss {loss:.3f} (avg {smooth:.3f}) lr {lr:.2e} |g| {gnorm:.2f} {tps:.0f} tok/s")
        if (step + 1) % args.eval_every == 0 or step == total - 1:
            nll, n = heldout_nll(model, quick_ids, args.seq_len)
            log["evals"].append({"step": step + 1, "heldout_loss_quick": nll / n, "tokens": n})
            say(f"quick held-out loss {nll / n:.3f} (ppl {math.exp(nll / n):.1f}, {n} tokens)")
            save_log()
    train_seconds = time.time() - t_train

    # Final numbers on the weights as saved (bfloat16), read back in float32.
    model = model.to(torch.bfloat16).float()
    nll, n = heldout_nll(model, eval_ids, args.seq_len)
    uni, n_uni = unigram_nll(stream, eval_ids[1:], len(tokenizer))
    assert n == n_uni
    tail = [c["loss"] for c in log["curve"][-max(1, total // 20) :]]
    log.update(
        train_seconds=train_seconds,
        tokens_seen=total * tokens_per_step,
        tokens_per_second=total * tokens_per_step / train_seconds,
        final_train_loss=float(np.mean(tail)),
        final_train_loss_steps=len(tail),
        heldout_loss=nll / n,
        heldout_perplexity=math.exp(nll / n),
        unigram_loss=uni / n,
        unigram_perplexity=math.exp(uni / n),
        heldout_tokens=n,
        samples=greedy_samples(model, tokenizer, args.sample_tokens),
    )
    say(
        f"done: {total} steps, {log['tokens_seen']:,} tokens in {train_seconds / 60:.1f} min "
        f"({log['tokens_per_second']:.0f} tok/s); train loss (last {len(tail)} steps) "
        f"{log['final_train_loss']:.3f}"
    )
    say(
        f"held-out: loss {log['heldout_loss']:.4f}, perplexity {log['heldout_perplexity']:.2f}; "
        f"unigram perplexity {log['unigram_perplexity']:.2f} ({n} tokens)"
    )
    for s in log["samples"]:
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['continuation']}\n", flush=True)

    model = model.to(torch.bfloat16)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(args.out)
    # Check what was written loads back and gives the same numbers.
    back = FalconH1ForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    nll_back, _ = heldout_nll(back, quick_ids, args.seq_len)
    nll_here, _ = heldout_nll(model.float(), quick_ids, args.seq_len)
    assert abs(nll_back - nll_here) <= 1e-4 * abs(nll_here), (nll_back, nll_here)
    log["total_seconds"] = time.time() - t_start
    save_log()
    say(f"saved {args.out} and {args.heldout}")


if __name__ == "__main__":
    main()
