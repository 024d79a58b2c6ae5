"""The calibration data: text files (the shipped one by default) cut into token windows."""

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..evaluate import default_text_path
from .settings import CalibrationSettings


def default_calibration_path() -> Path:
    """The shipped calibration text: Python standard-library files from the shipped
    model's training split, none of them in the held-out evaluation text (data/README.md)."""
    return Path(str(resources.files("mlx_falcon_h1") / "data" / "calibration.txt"))


def _jsonl_texts(file: Path, tokenizer) -> List[str]:
    """Texts of an mlx-lm dataset file: {"text"}, {"prompt", "completion"} or {"messages"}."""
    texts = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from None
        if "text" in row:
            texts.append(row["text"])
        elif "prompt" in row and "completion" in row:
            texts.append(row["prompt"] + row["completion"])
        elif "messages" in row and getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "messages" in row:
            texts.append("\n".join(m.get("content", "") for m in row["messages"]))
        else:
            raise ValueError(
                f"{file}:{n}: expected a 'text', 'prompt'+'completion' or 'messages' field, "
                f"got {sorted(row)}"
            )
    return texts


def calibration_texts(path: Optional[str], tokenizer) -> Tuple[List[str], str]:
    """(texts, description) from a .txt / .jsonl file or a folder of them (sorted)."""
    file = Path(path) if path else default_calibration_path()
    if file.is_dir():
        files = sorted(f for f in file.rglob("*") if f.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"{file}: no .txt or .jsonl files for calibration")
    elif file.is_file():
        files = [file]
    else:
        raise ValueError(f"--calibration-data {file}: no such file or folder")
    texts = []
    for f in files:
        texts += _jsonl_texts(f, tokenizer) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")]
    if any(f.resolve() == default_text_path().resolve() for f in files):
        warnings.warn(
            f"{file}: calibrating on the held-out evaluation text makes its quality "
            "numbers optimistic; calibrate on other text",
            stacklevel=2,
        )
    return texts, str(file) if path else f"{file.name} (shipped default)"


def calibration_tokens(tokenizer, settings: CalibrationSettings) -> Tuple[mx.array, str]:
    """(samples (N, L) int32, description): the texts tokenized and joined, cut
    into non-overlapping windows of --sequence-length, --num-samples of them
    picked at random with --seed (all of them when there are fewer)."""
    texts, described = calibration_texts(settings.calibration_data, tokenizer)
    ids = []
    for text in texts:
        try:
            ids += tokenizer.encode(text, verbose=False)  # no "longer than the model" notice
        except TypeError:
            ids += tokenizer.encode(text)
    L = settings.sequence_length
    windows = len(ids) // L
    if windows == 0:
        raise ValueError(
            f"{described}: {len(ids)} tokens, fewer than one --sequence-length {L} window"
        )
    tokens = np.asarray(ids[: windows * L], dtype=np.int32).reshape(windows, L)
    pick = np.random.default_rng(settings.seed).permutation(windows)[: settings.num_samples]
    if windows < settings.num_samples:
        print(f"[calibration] {described}: only {windows} windows of {L} tokens, using all")
    return mx.array(tokens[np.sort(pick)]), described
