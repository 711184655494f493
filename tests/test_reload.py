"""A trained model reloads exactly: the same token ids for the same prompts and the same greedy completions,
through the project's loader and through plain transformers (`AutoTokenizer` / `AutoModelForCausalLM`).

transformers 5.19 saves the embedded model's tokenizer as `"tokenizer_class": "TokenizersBackend"`, and its
`AutoTokenizer` builds `Qwen2Tokenizer` for any qwen2 model, which encodes the embedded vocabulary to other ids
(`\\boxed{` is no longer one token). The model here is the embedded one after one real AdamW step, so a reload
that fell back to the shipped weights would show too.
"""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Tokenizer

from common.data import (EMBEDDED_INSTRUCTION, EMBEDDED_MODEL, EMBEDDED_TEST, load_examples, load_model_and_tokenizer,
                         load_tokenizer, save_model_and_tokenizer)

N_PROMPTS = 48


def prompt_ids(tokenizer) -> list[list[int]]:
    """The first N_PROMPTS embedded eval prompts, built as training builds them."""
    source = (str(EMBEDDED_TEST), None, None, "question", "answer", "gsm8k")
    examples, _ = load_examples(source, tokenizer, EMBEDDED_INSTRUCTION, 512, "eval")
    return [e.prompt_ids for e in examples[:N_PROMPTS]]


@torch.no_grad()
def greedy(model, ids: list[list[int]], pad_id: int) -> list[list[int]]:
    """Greedy completions (token ids) of a left-padded batch."""
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    out = model.eval().generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=pad_id)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def trained():
    """The embedded model after one AdamW step on the cross-entropy of its own prompts (weights now differ from
    tiny/model's), its tokenizer, the prompt ids and greedy completions before saving."""
    torch.manual_seed(0)
    model, tok, _ = load_model_and_tokenizer("embedded", torch.float32)
    ids = prompt_ids(tok)
    batch = torch.tensor([p[:16] for p in ids if len(p) >= 16][:8])
    loss = model(input_ids=batch, labels=batch).loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss.backward()
    optimizer.step()
    shipped = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL)
    assert not torch.equal(model.model.embed_tokens.weight, shipped.model.embed_tokens.weight)
    return model, tok, ids, greedy(model, ids, tok.pad_token_id)


def check_reload(model_dir, tok, reloaded_tok, ids, completions):
    assert prompt_ids(reloaded_tok) == ids
    assert (reloaded_tok.eos_token_id, reloaded_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert greedy(model, prompt_ids(reloaded_tok), reloaded_tok.pad_token_id) == completions
    assert reloaded_tok.batch_decode(completions) == tok.batch_decode(completions)


def test_run_finish_save_reloads_through_the_project_loader(trained, tmp_path):
    """Saved as Run.finish saves (save_pretrained twice), loaded as `--model runs/<run>/final` loads."""
    model, tok, ids, completions = trained
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    reloaded, reloaded_tok, _ = load_model_and_tokenizer(str(tmp_path), torch.float32)
    check_reload(tmp_path, tok, reloaded_tok, ids, completions)
    assert greedy(reloaded, ids, tok.pad_token_id) == completions


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_save_model_and_tokenizer_reloads_through_plain_transformers(trained, tmp_path, trust_remote_code):
    model, tok, ids, completions = trained
    save_model_and_tokenizer(model, tok, tmp_path)
    check_reload(tmp_path, tok, load_tokenizer(str(tmp_path)), ids, completions)
    check_reload(tmp_path, tok, AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=trust_remote_code), ids,
                 completions)


def test_other_local_tokenizer_layouts(tmp_path):
    """What else a local dir can hold: tokenizer.json alone (no tokenizer_config.json: eos from the model's config),
    and a Qwen2Tokenizer saved as vocab.json + merges.txt (no tokenizer.json): each loads as it was saved."""
    shipped = load_tokenizer(str(EMBEDDED_MODEL))
    ids = prompt_ids(shipped)

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        (bare / name).write_bytes((EMBEDDED_MODEL / name).read_bytes())
    tok = load_tokenizer(str(bare))
    assert prompt_ids(tok) == ids and (tok.eos_token_id, tok.pad_token_id) == (0, 0)

    # an older Qwen2 layout: vocab.json + merges.txt, tokenizer_config.json naming Qwen2Tokenizer
    vocab_merges = tmp_path / "qwen2"
    vocab_merges.mkdir()
    spec = json.loads((EMBEDDED_MODEL / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    (vocab_merges / "vocab.json").write_text(json.dumps(spec["vocab"]))
    (vocab_merges / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (vocab_merges / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    (vocab_merges / "config.json").write_bytes((EMBEDDED_MODEL / "config.json").read_bytes())
    qwen = Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m.split(" ")) for m in merges])
    tok = load_tokenizer(str(vocab_merges))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert prompt_ids(tok) == prompt_ids(qwen) != ids  # Qwen2's own pre-tokenizer: other ids, as that layout means


def test_a_tokenizer_autotokenizer_reloads_right_gets_no_extra_files(tmp_path):
    """A Qwen2Tokenizer saved next to a qwen2 model (what a run from a hub Qwen model saves): AutoTokenizer already
    builds that class back, so the save adds neither the auto_map nor the module, and the ids are unchanged."""
    model, _, _ = load_model_and_tokenizer("embedded", torch.float32)
    spec = json.loads((EMBEDDED_MODEL / "tokenizer.json").read_text())["model"]
    qwen = Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                       for m in spec["merges"]])
    save_model_and_tokenizer(model, qwen, tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not list(tmp_path.glob("*.py"))
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert prompt_ids(reloaded) == prompt_ids(qwen)
