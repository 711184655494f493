"""Build the embedded default task and the warm-started tiny model that `python grpo.py` uses.

Everything under tiny/ is produced by this one seeded script (CPU, about a minute on 2 cores):
1. data/train.jsonl, data/test.jsonl: "a + b" word problems with two-digit numbers, rows in
   GSM8K's schema ({"question", "answer": "... \\n#### N"}); no (a, b) pair of the test split is
   in the training split, so test accuracy measures arithmetic, not recall.
2. model/: a byte-level BPE tokenizer trained on the task text (digits split one per token) and
   a 2-layer Qwen2ForCausalLM (head_dim 32, tied embeddings), warm-started by a short supervised
   pass on prompt -> "\\boxed{N}" + EOS. The pass stops part-way up its learning curve (greedy
   test accuracy climbs from 6% to 48% between SFT steps 300 and 600 at this lr), so RL starts
   partly right and on a slope it can keep climbing. A warm start trained to convergence (an
   earlier version: "a + b - c", cosine decay to 0, 19%) left RL nothing it could reach.

    python tiny/make_tiny.py                      # regenerate tiny/data and tiny/model
    python tiny/make_tiny.py --out-dir /tmp/tiny --sft-steps 200
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# The prompt is the question plus this suffix (the tiny tokenizer has no chat template).
# common/data.py mirrors this constant: change both together.
PROMPT_SUFFIX = " Answer in \\boxed{}."
EOS_TOKEN = "<|endoftext|>"  # also the pad token, id 0, as in Qwen2.5 base models


@dataclass
class Args:
    out_dir: Path = Path(__file__).resolve().parent
    """directory that receives data/ and model/"""
    seed: int = 0
    """seeds the problems, the weight init and the SFT batches"""
    n_train: int = 20_000
    """training problems"""
    n_test: int = 200
    """held-out problems (no (a, b, c) triple shared with train)"""
    sft_steps: int = 350
    """supervised warm-start steps; a step count, not wall time, so the result is reproducible"""
    warmup_steps: int = 50
    """linear warmup, then a constant lr: the warm start stops mid-climb, not annealed into a minimum"""
    batch_size: int = 64
    """prompts per SFT step"""
    lr: float = 1e-3
    """AdamW learning rate of the warm start"""
    threads: int = 2
    """torch CPU threads (the default CPU run targets a 2-core laptop)"""


# Question templates. Each states a, then b, so a test can recompute the answer from the first two
# numbers of the question.
TEMPLATES = [
    "{name} has {a} {obj}. {He} gets {b} more. How many {obj} does {he} have now?",
    "{name} had {a} {obj} and found {b} more. How many {obj} are there?",
    "A box holds {a} {obj}. {name} puts in {b} more. How many {obj} are in the box?",
    "{name} buys {a} {obj}, then {b} more. How many {obj} does {he} have?",
]
NAMES = [("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Zoe", "she")]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells"]


def format_prompt(question: str) -> str:
    """The exact text the policy is conditioned on, in SFT here and in RL."""
    return question + PROMPT_SUFFIX


def format_target(answer: int) -> str:
    """The completion the warm start teaches (EOS is appended as a token id, not as text)."""
    return f"\\boxed{{{answer}}}"


def extract_boxed_int(text: str) -> int | None:
    """Integer inside the last \\boxed{...}, or None (no box, or not an integer)."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if not found:
        return None
    try:
        return int(found[-1].strip())
    except ValueError:
        return None


def make_rows(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """n_test distinct (a, b) pairs for test; n_train rows drawn from the other 8100 - n_test pairs.

    A pair can recur in train under another template, name or object (there are only 8100 pairs);
    no test pair is ever in train. Two-digit a + b is learned steadily by the tiny model, with a
    long partly-right window (3-digit answers need the carry).
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]

    def row(a: int, b: int) -> dict:
        name, he = rng.choice(NAMES)
        question = rng.choice(TEMPLATES).format(name=name, He=he.capitalize(), he=he, obj=rng.choice(OBJECTS), a=a, b=b)
        return {"question": question, "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}

    test = [row(a, b) for a, b in test_pairs]
    train = [row(*rng.choice(train_pairs)) for _ in range(n_train)]
    return train, test


def gold_int(row: dict) -> int:
    return int(row["answer"].split("####")[-1].strip())


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE (any text encodes, every id decodes), digits one per token, \\boxed{ one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # GPT-2-like word split, with " \boxed{" kept whole so BPE can merge it into one token
            pre_tokenizers.Split(Regex(r" ?\\boxed\{| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+|\p{N}+"), "isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,  # an upper bound: merges stop once every task word is one token
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # model_max_length matches max_position_embeddings below
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=256)


def make_model(vocab_size: int, eos_id: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM needs head_dim >= 32
        intermediate_size=384,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B/1.5B: the default run exercises the tied path
        bos_token_id=eos_id,  # Qwen2.5 convention: no separate BOS, none is prepended
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def sft_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+target+EOS ids; labels are -100 except on the target and EOS."""
    seqs, labels = [], []
    for row in rows:
        # prompt and target tokenized apart, as in RL where the target is generated after the prompt
        p = tokenizer(format_prompt(row["question"]))["input_ids"]
        t = tokenizer(format_target(gold_int(row)))["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, attention_mask, label_ids


@torch.no_grad()
def greedy_completions(model, tokenizer, questions: list[str], max_new_tokens: int = 10, batch_size: int = 100) -> list[str]:
    """Greedy decode of left-padded prompts; returns the completion texts (EOS stripped)."""
    model.eval()
    out = []
    for s in range(0, len(questions), batch_size):
        prompts = [format_prompt(q) for q in questions[s : s + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def greedy_accuracy(model, tokenizer, rows: list[dict]) -> float:
    completions = greedy_completions(model, tokenizer, [r["question"] for r in rows])
    return sum(extract_boxed_int(c) == gold_int(r) for c, r in zip(completions, rows)) / len(rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # data
    train_rows, test_rows = make_rows(args.n_train, args.n_test, args.seed)
    write_jsonl(args.out_dir / "data" / "train.jsonl", train_rows)
    write_jsonl(args.out_dir / "data" / "test.jsonl", test_rows)

    # tokenizer: trained on exactly the texts the model reads and writes
    texts = [format_prompt(r["question"]) for r in train_rows] + [format_target(gold_int(r)) for r in train_rows]
    tokenizer = wrap_tokenizer(train_tokenizer(texts))
    eos_id = tokenizer.eos_token_id
    assert eos_id == 0 and tokenizer.pad_token_id == 0

    # model: vocab exactly the tokenizer's, so every id the model can emit decodes
    model = make_model(len(tokenizer), eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, params {n_params:,}, initial greedy acc {greedy_accuracy(model, tokenizer, test_rows):.3f}")

    # supervised warm start: next-token CE on the completion tokens only
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / args.warmup_steps),
    )
    batch_rng = random.Random(args.seed + 1)
    t0 = time.time()
    model.train()
    for step in range(1, args.sft_steps + 1):
        input_ids, attention_mask, labels = sft_batch(tokenizer, batch_rng.sample(train_rows, args.batch_size))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == args.sft_steps:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    sft_s = time.time() - t0

    acc = greedy_accuracy(model, tokenizer, test_rows)
    sample = greedy_completions(model, tokenizer, [test_rows[0]["question"]])[0]
    print(f"SFT {args.sft_steps} steps in {sft_s:.0f}s; greedy test acc {acc:.3f}; e.g. {sample!r}")
    n_tok = len(tokenizer(format_target(123))["input_ids"]) + 1
    print(f"tokens in '\\boxed{{123}}' + EOS: {n_tok}")

    # save: safetensors fp32 weights, tokenizer as PreTrainedTokenizerFast (never AutoTokenizer, see README)
    model_dir = args.out_dir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=eos_id).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # what common/data.py keys on
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    print(f"saved {model_dir} ({size / 1e6:.1f} MB)")
