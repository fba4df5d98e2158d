"""Plain text as data for language models: a text file tokenized by the model's own tokenizer and
cut into fixed-length sequences (``input_ids`` + ``attention_mask``). The data's name states the
sequence length and count, so every report says what its perplexity was measured on.

Protocol (the usual one for perplexity): non-overlapping windows of ``seq_len`` tokens from the
start of the text, no special tokens added, every position but the first of a window scored. For
an encoder ("embedding"), each window is wrapped in the tokenizer's special tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rankdown.data.sources import Data, DataError

TASKS = ("causal-lm", "embedding")
TEXT_PREFIX = "text:"
# Sequences per batch are chosen by tokens: a 2,048-token batch of a 50k-vocabulary model's logits
# is already 400 MB in float32.
BATCH_TOKENS = 2048


def is_text_spec(spec: str) -> bool:
    """Whether a data spec names text: ``text:FILE``, or a ``.txt`` file."""
    return spec.startswith(TEXT_PREFIX) or spec.endswith(".txt")


def read_text(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {path}: no such text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if not text.strip():
        raise DataError(f"{what} {path}: the file holds no text")
    return text


def tokenize(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text``: a Hugging Face tokenizer (no special tokens added), or any callable
    str -> list of ints."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "vocab_size"):
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    elif callable(tokenizer):
        ids = tokenizer(text)
    else:
        raise DataError(f"tokenizer must be a Hugging Face tokenizer or a callable, got {type(tokenizer).__name__}")
    ids = list(ids)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise DataError("the tokenizer returned something other than non-negative token ids")
    return ids


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a Hugging Face tokenizer puts before and after a text, found by encoding
    one word with and without them (tokenizers have no common API for it)."""
    if not hasattr(tokenizer, "encode"):
        return [], []
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    return [], []


def text_data(
    path: str | Path,
    tokenizer: Any | Callable[[str], list[int]],
    *,
    seq_len: int = 256,
    max_sequences: int | None = None,
    task: str = "causal-lm",
    what: str = "text data",
) -> Data:
    """``path`` tokenized and cut into at most ``max_sequences`` windows of ``seq_len`` tokens."""
    if task not in TASKS:
        raise DataError(f"{what}: task must be one of {', '.join(TASKS)}, got {task!r}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise DataError(f"--sequences must be at least 1, got {max_sequences}")
    ids = tokenize(read_text(path, what), tokenizer)
    # An encoder reads each window as it reads a sentence: between its own special tokens
    # ([CLS] ... [SEP] for BERT), which take their place in the window.
    prefix, suffix = _special_tokens(tokenizer) if task == "embedding" else ([], [])
    body = seq_len - len(prefix) - len(suffix)
    n = len(ids) // body if body > 0 else 0
    if n == 0:
        raise DataError(f"{what} {path}: {len(ids)} tokens, fewer than one sequence of {seq_len} (--seq-len)")
    if max_sequences is not None:
        n = min(n, max_sequences)
    rows = [prefix + ids[i * body : (i + 1) * body] + suffix for i in range(n)]
    x = torch.tensor(rows, dtype=torch.long).view(n, seq_len)
    name = f"{path} ({n} sequences x {seq_len} tokens = {n * seq_len:,} tokens)"
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    return Data((inputs, None), name, batch_size=max(1, BATCH_TOKENS // seq_len), task=task)
