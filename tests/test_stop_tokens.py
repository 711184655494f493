"""common/stop_tokens.py on the Qwen2.5 stand-in (tests/qwen_standin.py): a base-style model (tokenizer EOS and
generation_config eos both <|endoftext|>, an int) needs <|im_end|> added when its prompts use the chat template; an
instruct-style one (EOS <|im_end|>, generation_config eos a list) keeps every id of the list."""
import json
import shutil

import pytest

from common.data import EMBEDDED_MODEL, UserError, encode_prompts, load_tokenizer
from common.stop_tokens import applies_chat_template, model_eos_ids, stop_token_ids
from qwen_standin import ENDOFTEXT, IM_END, IM_START, qwen_base, qwen_instruct, qwen_root  # noqa: F401


def test_base_model(qwen_base):
    tok = load_tokenizer(str(qwen_base))
    assert applies_chat_template(tok)
    # common.data builds the prompts with the chat template: the model is asked to close its turn with <|im_end|>
    prompt = encode_prompts(tok, ["What is 1+1?"], " Answer in \\boxed{}.")[0]
    assert prompt[0] == IM_START and prompt[-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert stop_token_ids(tok, qwen_base, chat_template=True) == [ENDOFTEXT, IM_END]
    assert stop_token_ids(tok, str(qwen_base), chat_template=False) == [ENDOFTEXT]


def test_instruct_model(qwen_instruct):
    tok = load_tokenizer(str(qwen_instruct))
    assert tok.eos_token_id == IM_END
    assert model_eos_ids(qwen_instruct) == [IM_END, ENDOFTEXT]
    assert stop_token_ids(tok, qwen_instruct, chat_template=True) == [IM_END, ENDOFTEXT]
    assert stop_token_ids(tok, qwen_instruct, chat_template=False) == [IM_END, ENDOFTEXT]  # the list, not its first


def test_config_forms(qwen_instruct, tmp_path):
    from transformers import AutoConfig, GenerationConfig

    tok = load_tokenizer(str(qwen_instruct))
    assert model_eos_ids(GenerationConfig.from_pretrained(qwen_instruct)) == [IM_END, ENDOFTEXT]
    assert model_eos_ids({"eos_token_id": 7}) == [7] and model_eos_ids({"eos_token_id": [7, 8]}) == [7, 8]
    assert stop_token_ids(tok, {"eos_token_id": 7}, chat_template=False) == [IM_END, 7]  # the tokenizer's EOS first
    # no generation_config.json: config.json's eos (the instruct model's config says <|im_end|>)
    bare = tmp_path / "bare"
    shutil.copytree(qwen_instruct, bare, ignore=shutil.ignore_patterns("generation_config.json", "*.safetensors"))
    assert model_eos_ids(bare) == [IM_END]
    assert model_eos_ids(AutoConfig.from_pretrained(bare)) == [IM_END]
    cfg = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [IM_END, 5]}))
    assert stop_token_ids(tok, bare, chat_template=True) == [IM_END, 5]


def test_embedded_model():
    tok = load_tokenizer(str(EMBEDDED_MODEL))
    assert not applies_chat_template(tok)  # its prompts are plain text
    assert stop_token_ids(tok, EMBEDDED_MODEL, applies_chat_template(tok)) == [tok.eos_token_id]


def test_no_eos_at_all(qwen_base, tmp_path):
    tok = load_tokenizer(str(qwen_base))
    tok.eos_token = None
    with pytest.raises(UserError, match="generation_config.json"):
        stop_token_ids(tok, {}, chat_template=False)
    assert stop_token_ids(tok, {}, chat_template=True) == [IM_END]
