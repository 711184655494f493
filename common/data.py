"""Datasets, prompts, and model/tokenizer loading, with errors that say what to do.

Every algorithm script reads its data and model through these functions so that a comparison
between scripts is a comparison of algorithms, not of data pipelines.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import dist

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = ROOT / "tiny" / "model"
EMBEDDED_TRAIN = ROOT / "tiny" / "data" / "train.jsonl"
EMBEDDED_TEST = ROOT / "tiny" / "data" / "test.jsonl"
EMBEDDED_INSTRUCTION = " Answer in \\boxed{}."  # must equal tiny/make_tiny.py's PROMPT_SUFFIX (tested)
DEFAULT_INSTRUCTION = " Please reason step by step, and put your final answer within \\boxed{}."

# name -> (train source, eval source); a source is (hub id, config, split, question field, answer field, answer format)
HUB_DATASETS = {
    "gsm8k": (("openai/gsm8k", "main", "train", "question", "answer", "gsm8k"),
              ("openai/gsm8k", "main", "test", "question", "answer", "gsm8k")),
    # MATH training problems (the 7.5k Hendrycks train split); evaluation on MATH-500.
    "math": (("DigitalLearningGmbH/MATH-lighteval", "default", "train", "problem", "solution", "boxed"),
             ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "plain")),
}


class UserError(SystemExit):
    """Bad input from the user: printed as one paragraph, exit status 1, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"minirlvr: error: {message}")


@dataclass
class Example:
    prompt_ids: list[int]
    gold: str  # the final answer as a string, checked with math-verify


def resolve_model_name(name: str) -> str:
    """`embedded` -> the shipped tiny model; a bare `Qwen2.5-1.5B` -> `Qwen/Qwen2.5-1.5B`; paths stay."""
    if name == "embedded":
        return str(EMBEDDED_MODEL)
    if os.path.exists(name) or "/" in name:
        return name
    if name.lower().startswith("qwen"):
        return f"Qwen/{name}"
    return name


def load_tokenizer(path: str):
    """Load a tokenizer so that it encodes exactly as the one that was saved.

    transformers 5.19's `AutoTokenizer` builds the class its table maps the model type to (a qwen2 model gets
    `Qwen2Tokenizer`, whatever `tokenizer_config.json` names), and that class rebuilds the pre-tokenizer and
    normalizer from its own code: a custom vocabulary such as the embedded model's then encodes to other ids. A
    local dir holding a `tokenizer.json` is therefore loaded from that file as is (`PreTrainedTokenizerFast`),
    whatever class its config names (`PreTrainedTokenizerFast`, `TokenizersBackend`, `Qwen2Tokenizer`, none);
    anything else (a hub id, vocab.json + merges.txt, a sentencepiece model) goes through `AutoTokenizer`.
    A tokenizer without an eos token takes the model's (generation_config.json, else config.json).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    local = Path(path)
    if (local / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None and local.is_dir():
        from common.stop_tokens import model_eos_ids

        eos = model_eos_ids(local)
        if eos:
            tok.eos_token = tok.convert_ids_to_tokens(eos[0])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Written next to a saved tokenizer that plain `AutoTokenizer` would otherwise rebuild with another class (see
# save_model_and_tokenizer). A subclass with no __init__ of its own is loaded from tokenizer.json unchanged.
_TOKENIZER_MODULE = "tokenization_minirlvr"
_TOKENIZER_MODULE_TEXT = '''"""Written by minirlvr (common/data.py, save_model_and_tokenizer) so that AutoTokenizer
loads tokenizer.json as saved, with or without trust_remote_code: a class with no code of its own."""
from transformers import PreTrainedTokenizerFast


class TokenizerFromFile(PreTrainedTokenizerFast):
    pass
'''


def _same_tokenizer(a, b) -> bool:
    """True when two fast tokenizers hold the same pipeline (normalizer, pre-tokenizer, model, added tokens,
    post-processor, decoder) and the same special tokens."""
    def pipeline(tok):
        d = json.loads(tok.backend_tokenizer.to_str())
        return {k: v for k, v in d.items() if k not in ("truncation", "padding")}

    return pipeline(a) == pipeline(b) and (a.eos_token, a.pad_token, a.bos_token) == (b.eos_token, b.pad_token,
                                                                                      b.bos_token)


def save_model_and_tokenizer(model, tokenizer, path, state_dict: dict | None = None) -> None:
    """`model.save_pretrained` (of `state_dict` when given: a sharded model's gathered weights) +
    `tokenizer.save_pretrained`, such that both the project's loader and plain
    `AutoTokenizer.from_pretrained(path)` / `AutoModelForCausalLM.from_pretrained(path)` load them back exactly.

    transformers 5.19's `AutoTokenizer` gives a qwen2 model `Qwen2Tokenizer` (see load_tokenizer), which encodes a
    custom vocabulary such as the embedded model's to other ids. When it would, `tokenizer_config.json` gets an
    `auto_map` naming a class with no code of its own, written next to it: `AutoTokenizer` then loads
    tokenizer.json unchanged (trust_remote_code off: as `TokenizersBackend`; on: as that class). Checked after
    writing: a save that still reloads differently gets a warning (the project's loader reads it right anyway).
    """
    import warnings

    from transformers import AutoTokenizer

    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if type(model).__name__.startswith("FSDP"):  # FSDP2 subclasses the model's class; the saved name is the model's
        cfg = json.loads((path / "config.json").read_text())
        cfg["architectures"] = [type(model).__name__[len("FSDP"):]]
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        return  # a slow (python) tokenizer has no tokenizer.json: AutoTokenizer rebuilds it from its own files
    if _same_tokenizer(AutoTokenizer.from_pretrained(path), tokenizer):
        return
    (path / f"{_TOKENIZER_MODULE}.py").write_text(_TOKENIZER_MODULE_TEXT)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, f"{_TOKENIZER_MODULE}.TokenizerFromFile"]}
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    if not _same_tokenizer(AutoTokenizer.from_pretrained(path), tokenizer):
        warnings.warn(f"{path}: transformers' AutoTokenizer does not load this tokenizer back unchanged; load it "
                      f"with PreTrainedTokenizerFast.from_pretrained or common.data.load_tokenizer")


def load_model_and_tokenizer(name: str, dtype):
    """Returns (model, tokenizer, resolved name). Unknown names get a UserError, not a traceback."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_name(name)
    if resolved != name:
        print(f"model: {name!r} resolved to {resolved!r}")
    try:
        tok = load_tokenizer(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except (OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set, so the hub was not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(
            f"could not load model {name!r} (resolved to {resolved!r}){offline}: {str(e).splitlines()[0]} "
            f"Pass a local directory holding an HF model (config.json, weights, tokenizer), a hub id such as "
            f"'Qwen/Qwen2.5-1.5B', or 'embedded' for the tiny model that ships with minirlvr."
        ) from None
    return model, tok, resolved


def _read_rows(source: str) -> list[dict]:
    """Rows of a local .jsonl/.json/.parquet file."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"dataset file {source!r} does not exist. Pass an existing .jsonl or .parquet file, "
                        f"or one of: embedded, {', '.join(HUB_DATASETS)}.")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"dataset file {source!r}, line {n}, is not valid JSON ({e.msg}). "
                                    f"Each line must hold one JSON object.") from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UserError(f"dataset file {source!r} has an unknown extension {path.suffix!r}: use .jsonl or .parquet.")


def _read_hub(hub_id: str, config: str | None, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(hub_id, config, split=split))
    except Exception as e:  # hub errors come in many classes; the message names the cause
        raise UserError(f"could not load {hub_id!r} (split {split!r}) from the hub: {str(e).splitlines()[0]} "
                        f"Without network access, download it elsewhere and pass the local .jsonl/.parquet file "
                        f"with --dataset PATH (and --prompt-field/--answer-field).") from None


def gold_from_field(value, answer_format: str, where: str) -> str:
    """The gold final answer of a row: GSM8K's `#### N`, a MATH solution's last \\boxed{}, or plain text."""
    from common.reward import extract_boxed, gsm8k_gold

    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UserError(f"{where}: the answer field holds a {type(value).__name__}, expected a string or number.")
    text = str(value)
    if answer_format == "gsm8k":
        if "####" not in text:
            raise UserError(f"{where}: answer {text[:80]!r} has no '#### N' final answer (answer format gsm8k). "
                            f"Use --answer-format boxed or plain if your answers look different.")
        return gsm8k_gold(text)
    if answer_format == "boxed":
        boxed = extract_boxed(text)
        if boxed is None:
            raise UserError(f"{where}: answer {text[:80]!r} has no \\boxed{{...}} (answer format boxed).")
        return boxed
    return text.strip()


def resolve_dataset(dataset: str, prompt_field: str | None, answer_field: str | None, answer_format: str | None,
                    eval_dataset: str | None):
    """Turn the --dataset flags into (train source, eval source or None), sources as in HUB_DATASETS.

    A local file's eval set is --eval-dataset (same field names); without it the run has no evaluation.
    """
    if dataset in HUB_DATASETS:
        train, test = HUB_DATASETS[dataset]
    elif dataset == "embedded":
        train = (str(EMBEDDED_TRAIN), None, None, "question", "answer", "gsm8k")
        test = (str(EMBEDDED_TEST), None, None, "question", "answer", "gsm8k")
    else:
        train, test = (dataset, None, None, "question", "answer", "gsm8k"), None
    train = (*train[:3], prompt_field or train[3], answer_field or train[4], answer_format or train[5])
    if eval_dataset is not None:
        test = (eval_dataset, None, None, *train[3:])
    return train, test


def load_examples(source, tokenizer, instruction: str, max_prompt_len: int, name: str) -> tuple[list[Example], int]:
    """Read, validate and tokenize a dataset. Returns (examples, number skipped for being too long)."""
    path, config, split, q_field, a_field, a_format = source
    rows = _read_hub(path, config, split) if split is not None else _read_rows(path)
    if not rows:
        raise UserError(f"{name} dataset {path!r} is empty: it needs at least one row with fields "
                        f"{q_field!r} and {a_field!r}.")
    for i, row in enumerate(rows):
        where = f"{name} dataset {path!r}, row {i}"
        if not isinstance(row, dict):
            raise UserError(f"{where} is a {type(row).__name__}, expected an object with fields {q_field!r}, {a_field!r}.")
        for field in (q_field, a_field):
            if field not in row:
                raise UserError(f"{where} has no field {field!r} (it has: {', '.join(map(str, row)) or 'none'}). "
                                f"Name the fields with --prompt-field and --answer-field.")
        if not isinstance(row[q_field], str):
            raise UserError(f"{where}: the prompt field {q_field!r} holds a {type(row[q_field]).__name__}, "
                            f"expected a string.")
    all_ids = encode_prompts(tokenizer, [row[q_field] for row in rows], instruction)
    examples, skipped = [], 0
    for i, (row, ids) in enumerate(zip(rows, all_ids)):
        if len(ids) > max_prompt_len:
            skipped += 1
            continue
        examples.append(Example(ids, gold_from_field(row[a_field], a_format, f"{name} dataset {path!r}, row {i}")))
    if not examples:
        raise UserError(f"every prompt of the {name} dataset {path!r} is longer than --max-prompt-len "
                        f"{max_prompt_len} tokens ({skipped} skipped). Raise --max-prompt-len.")
    return examples, skipped


def encode_prompts(tokenizer, questions: list[str], instruction: str) -> list[list[int]]:
    """Each question plus the \\boxed{} instruction, in the tokenizer's chat template where it has one."""
    contents = [q + instruction for q in questions]
    if getattr(tokenizer, "chat_template", None):
        contents = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                  add_generation_prompt=True) for c in contents]
    return tokenizer(contents, add_special_tokens=False)["input_ids"]  # one batched call: fast tokenizers parallelise


def load_datasets(args, tokenizer) -> tuple[list[Example], list[Example], int]:
    """The run's train and eval examples from its flags (--dataset and its field flags, --instruction,
    --max-prompt-len, --eval-every, --eval-limit), and the number of train prompts skipped as too long; prints what
    was read. No eval set: --eval-every 0, or a local --dataset without --eval-dataset."""
    train_src, eval_src = resolve_dataset(args.dataset, args.prompt_field, args.answer_field, args.answer_format,
                                          args.eval_dataset)
    train_set, skipped = load_examples(train_src, tokenizer, args.instruction, args.max_prompt_len, "train")
    eval_set = []
    if eval_src is not None and args.eval_every:
        eval_set, _ = load_examples(eval_src, tokenizer, args.instruction, args.max_prompt_len, "eval")
        eval_set = eval_set[: args.eval_limit]
    print(f"data: {len(train_set)} train prompts ({skipped} skipped as longer than {args.max_prompt_len} tokens), "
          f"{len(eval_set)} eval prompts")
    return train_set, eval_set, skipped


def step_prompts(examples: list[Example], seed: int, step: int, prompts_per_step: int) -> list[Example]:
    """The prompts of rollout step `step` (1-based): epoch e walks a permutation seeded by (seed, e), so a resumed
    run needs nothing but the step to continue the data order. Under torchrun: this rank's contiguous share."""
    batch = []
    for pos in range((step - 1) * prompts_per_step, step * prompts_per_step):
        epoch, i = divmod(pos, len(examples))
        batch.append(examples[np.random.default_rng([seed, epoch]).permutation(len(examples))[i]])
    return dist.share(batch)
