"""Hugging Face models through the user-model path (the optional extra ``rankdown[hf]``).

``hf:PATH`` names a local model: a folder holding ``config.json`` and safetensors weights, or a
GGUF file (its tokenizer and config are read from the file). Loading never runs code from the
folder (``trust_remote_code=False``) and never unpickles (safetensors or GGUF only), so a saved
plan may name an ``hf:`` model the way it names a bundled one: it stays data.

Language models are judged by perplexity on held-out text and by measured tokens per second:
prefill (one forward pass over a prompt) and batch-1 decode with the KV cache on, dense against
compressed, each timed in alternation so that other load on the machine hits both alike.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankdown.errors import RankdownError, first_line

PREFIX = "hf:"


def is_hf(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # rankdown never downloads
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise RankdownError(
            "Hugging Face models need the optional extra: pip install 'rankdown[hf]' (transformers; gguf and "
            "accelerate for .gguf files)"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # errors stay one line; rankdown shows its own progress
    return transformers


def locate(spec: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for ``hf:PATH``; errors name the path."""
    path = Path(spec[len(PREFIX) :] if is_hf(spec) else spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise RankdownError(f"model {spec!r}: no such GGUF file")
        return path.resolve().parent, path.name
    if not path.is_dir():
        raise RankdownError(f"model {spec!r}: no such folder (expected a Hugging Face model folder or a .gguf file)")
    if not (path / "config.json").is_file():
        raise RankdownError(f"model {spec!r}: the folder holds no config.json: not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise RankdownError(
            f"model {spec!r}: no .safetensors weights in the folder; rankdown does not unpickle .bin "
            "checkpoints (convert them with save_pretrained(..., safe_serialization=True))"
        )
    return path.resolve(), None


def load_model(spec: str) -> nn.Module:
    """The model in float32 on the CPU, in eval mode. A causal LM gets its LM head (for
    perplexity and generation); any other architecture its base model (hidden states)."""
    tf = _transformers()
    folder, gguf = locate(spec)
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        if gguf is None:
            config = tf.AutoConfig.from_pretrained(folder, **common)
            causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
            cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
            model = cls.from_pretrained(folder, use_safetensors=True, dtype=torch.float32, **common)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32, **common)
    except Exception as exc:  # transformers, safetensors and gguf raise many types for a bad folder
        raise RankdownError(f"model {spec!r} could not be loaded ({first_line(exc)})") from exc
    model.config.use_cache = False  # whole-sequence forwards (calibration, perplexity) need no cache
    return model.eval()


def load_tokenizer(spec: str) -> Any:
    tf = _transformers()
    folder, gguf = locate(spec)
    try:
        return tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad tokenizer file
        raise RankdownError(f"model {spec!r}: its tokenizer could not be loaded ({first_line(exc)})") from exc


def example_tokens(model: nn.Module, length: int = 32) -> dict[str, torch.Tensor]:
    """One sequence of token ids for probes and timing when no text was given (not for quality)."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(length) * 7919 % max(vocab - 1, 1) + 1).view(1, -1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def task_of_spec(spec: str) -> str:
    """The task of ``hf:PATH`` from its config alone (no weights loaded)."""
    folder, gguf = locate(spec)
    if gguf is not None:
        return "causal-lm"  # transformers loads GGUF files as causal LMs only
    import json

    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise RankdownError(f"model {spec!r}: config.json could not be read ({first_line(exc)})") from None
    return "causal-lm" if any(str(a).endswith("ForCausalLM") for a in archs) else "embedding"


# --------------------------------------------------------------------------- speed


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def token_speed(
    models: dict[str, nn.Module],
    prompt: torch.Tensor,
    *,
    new_tokens: int = 32,
    runs: int = 5,
    threads: int | None = None,
) -> dict:
    """Prefill tokens/s (one forward over ``prompt``, shape (1, T)) and batch-1 decode tokens/s
    (greedy generation with the KV cache, time of ``new_tokens`` + 1 tokens minus that of 1 token),
    as medians over ``runs`` rounds; the models take turns inside each round."""
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise RankdownError(f"token_speed needs one prompt of shape (1, T), got {tuple(prompt.shape)}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        mask = torch.ones_like(prompt)
        times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "one": [], "many": []} for k in models}

        def gen(m: Any, n: int) -> None:  # a transformers GenerationMixin
            m.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=getattr(m.config, "eos_token_id", None) or 0,
            )

        for m in models.values():  # warm-up: first calls allocate
            m.eval()
            m(input_ids=prompt, attention_mask=mask, use_cache=False)
            gen(m, 2)
        for _ in range(runs):
            for k, m in models.items():
                times[k]["prefill"].append(
                    _timed(lambda m=m: m(input_ids=prompt, attention_mask=mask, use_cache=False))
                )
                times[k]["one"].append(_timed(lambda m=m: gen(m, 1)))
                times[k]["many"].append(_timed(lambda m=m: gen(m, new_tokens + 1)))
    finally:
        torch.set_num_threads(old_threads)
    out: dict[str, Any] = {
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "runs": runs,
        "threads": threads or old_threads,
    }
    for k, t in times.items():
        prefill = statistics.median(t["prefill"])
        decode = max(statistics.median(t["many"]) - statistics.median(t["one"]), 1e-9) / new_tokens
        out[k] = {"prefill_tokens_per_s": prompt.shape[1] / prefill, "decode_tokens_per_s": 1.0 / decode}
    return out
