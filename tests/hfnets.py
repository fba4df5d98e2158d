"""Tiny Hugging Face models and a tokenizer built from configs in the tests (nothing downloaded),
written as local folders the way a user's model arrives: config.json + safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "This program is free software: you can redistribute it and/or modify it under the terms of the "
    "license as published by the foundation, either version three of the license, or any later version. "
    "It is distributed in the hope that it will be useful, but without any warranty; without even the "
    "implied warranty of merchantability or fitness for a particular purpose. "
) * 12


def tokenizer_folder(folder: Path, text: str = TEXT):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def llama_folder(folder: Path, *, train_steps: int = 0, seed: int = 0) -> Path:
    """A 2-block LlamaForCausalLM (hidden 32) with tied embeddings, optionally trained a few steps
    on TEXT so that it predicts something."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_folder(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    if train_steps:
        ids = torch.tensor(tok.encode(TEXT))[: 64 * 8].view(8, 64)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(train_steps):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().save_pretrained(folder)
    return folder


def bert_folder(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_folder(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder
