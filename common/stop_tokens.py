"""The ids that end a completion, the same for vLLM and HF generate, in training and in evaluation.

A real model has more than one way to end its turn. Qwen2.5-1.5B (base): the tokenizer's EOS is `<|endoftext|>`
(151643) and so is generation_config.json's `eos_token_id`, but a prompt built with the chat template (as
common/data.py's `encode_prompts` builds every prompt of a tokenizer that has one) makes the model close its turn
with `<|im_end|>` (151645). Qwen2.5-1.5B-Instruct: the tokenizer's EOS is `<|im_end|>` and generation_config.json
lists both, `[151645, 151643]`. A stop set without `<|im_end|>` lets a completion run on past the end of its turn
(a made-up new turn, maybe another \\boxed{}) to `<|endoftext|>` or the token limit, and all of it is trained on.

    stop_token_ids(tokenizer, model_dir, applies_chat_template(tokenizer))
      = the tokenizer's EOS, every id of generation_config.eos_token_id (an int or a list; config.json's when the
        model has no generation_config.json), and <|im_end|> when the chat template was applied; in that order,
        without repeats.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

CHAT_END = "<|im_end|>"  # ChatML's end of turn (Qwen's chat template)


def applies_chat_template(tokenizer) -> bool:
    """True when common.data.encode_prompts wraps prompts in the chat template: the tokenizer has one."""
    return bool(getattr(tokenizer, "chat_template", None))


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def model_eos_ids(model_dir_or_config) -> list[int]:
    """Every eos id a model declares: generation_config.json's `eos_token_id`, else config.json's (the text
    config's for a multimodal one). Accepts a model dir (local or a hub id, read through transformers), a
    GenerationConfig or PretrainedConfig, or a dict of either file."""
    if model_dir_or_config is None:
        return []
    if isinstance(model_dir_or_config, Mapping):
        return _as_list(model_dir_or_config.get("eos_token_id"))
    if not isinstance(model_dir_or_config, (str, Path)):  # a config object
        config = model_dir_or_config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return _as_list(getattr(config, "eos_token_id", None))
    path = Path(model_dir_or_config)
    if path.is_dir():  # local: read the files, so that a dir without config.json still works
        for name in ("generation_config.json", "config.json"):
            f = path / name
            if f.is_file():
                data = json.loads(f.read_text())
                eos = data.get("eos_token_id", (data.get("text_config") or {}).get("eos_token_id"))
                if eos is not None:
                    return _as_list(eos)
        return []
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_dir_or_config)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        try:
            eos = AutoConfig.from_pretrained(str(model_dir_or_config)).get_text_config().eos_token_id
        except OSError:
            eos = None
    return _as_list(eos)


def stop_token_ids(tokenizer, model_dir_or_config, chat_template: bool) -> list[int]:
    """The stop set of a run (see the module docstring). chat_template: whether the prompts were built with the
    tokenizer's chat template (`applies_chat_template(tokenizer)` for prompts from common.data)."""
    ids = _as_list(tokenizer.eos_token_id) + model_eos_ids(model_dir_or_config)
    if chat_template:
        vocab = tokenizer.get_vocab()
        if CHAT_END in vocab:
            ids.append(vocab[CHAT_END])
    ids = list(dict.fromkeys(ids))
    if not ids:
        from common.data import UserError

        raise UserError(f"model {str(model_dir_or_config)!r} has no eos token: neither its tokenizer's eos_token nor "
                        f"the eos_token_id of its generation_config.json or config.json is set, and its prompts do "
                        f"not use a chat template that ends turns with {CHAT_END}, so completions would never stop. "
                        f"Set eos_token_id in the model's generation_config.json (--model).")
    return ids
