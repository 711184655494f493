"""Rollouts with HF `generate` on the trainer's own model, behind the interface of `VLLMEngine`.

A script holds one engine and calls `engine.rollout(model, version, prompt_ids, n=G, ...)` whatever the engine
is: the vLLM engine wakes up, loads the policy's weights when they changed, samples and sleeps; this engine
samples from the model itself, so there is nothing to load, wake or put to sleep. Both return a `RolloutBatch`,
grouped (prompt 0's n completions first), each completion cut after its first stop token, which is kept: the
policy is trained on it.

Differences that remain, by design:
- `logprobs` is None here: the sampler IS the trainer's model, so its log-probs are the trainer's own.
- `seed` is ignored in one process: HF sampling draws from torch's global generator, which `--seed` seeds and
  checkpoints save and restore, so a resumed run samples the same completions. Under torchrun each rank samples
  from its own stream seeded by (seed, rank) (common/dist.py), and `generate` runs with `synced_gpus` (a sharded
  model's forward is a collective: a rank whose completions have all stopped keeps stepping until every rank's
  have).
- `residual`: a module whose output is added to the LM head's logits while sampling (R2PO's rollout head:
  logits = lm_head(h) + head(h)); vLLM cannot do that without a model class of its own.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch

from common import dist
from common.vllm_engine import RolloutBatch


class HFEngine:
    """`generate` on the trainer's model; `push_weights`, `wake_up`, `sleep`, `close` are no-ops."""

    def __init__(self, model, *, stop_token_ids: Sequence[int], pad_id: int, autocast=None,
                 residual: torch.nn.Module | None = None, temperature: float | None = None):
        """stop_token_ids: ids that end a completion (the first one generated is kept). autocast: the context the
        trainer computes in (bf16 on CUDA). residual: added to the LM head's output while sampling.
        temperature: sample at this temperature whatever a call asks (R2PO's explorer samples at 0.9 while its
        log-probs are taken at 1.0); None: the call's."""
        self.model, self.stop_token_ids, self.pad_id = model, list(stop_token_ids), pad_id
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.residual, self.temperature = residual, temperature

    def push_weights(self, model, version=None) -> float:
        return 0.0  # the engine samples from the model itself

    def wake_up(self) -> None:
        pass

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seed: int | None = None) -> RolloutBatch:
        """n completions per prompt (temperature 0: one greedy completion per prompt), left-padded in one batch."""
        start = time.perf_counter()
        temperature = temperature if self.temperature is None or temperature == 0 else self.temperature
        greedy = temperature == 0
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)  # left padding
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                              top_k=0)
        hook = None
        if self.residual is not None:  # logits = lm_head(h) + residual(h); the LM head's input is h
            hook = self.model.get_output_embeddings().register_forward_hook(
                lambda module, inputs, logits: logits + self.residual(inputs[0]))
        was_training = self.model.training
        self.model.eval()
        reseed = dist.WORLD > 1 and seed is not None  # torchrun: this rank's own stream, global RNG untouched
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if reseed \
            else contextlib.nullcontext()
        try:
            with self.autocast, rng:
                if reseed:
                    torch.manual_seed(dist.rank_seed(seed))
                out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                          max_new_tokens=max_tokens, num_return_sequences=1 if greedy else n,
                                          eos_token_id=self.stop_token_ids, pad_token_id=self.pad_id, use_cache=True,
                                          repetition_penalty=1.0,  # not an Instruct model's generation_config 1.1
                                          synced_gpus=dist.ON,
                                          **sampling)[:, width:].tolist()
        finally:
            self.model.train(was_training)
            if hook is not None:
                hook.remove()
        completions, finished = [], []
        for row in out:
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stop_token_ids), None)
            completions.append(row[:cut] if cut else row)
            finished.append(cut is not None)
        return RolloutBatch(completions, None, finished, time.perf_counter() - start)

    def rollout(self, model, version, prompt_ids, **sampling) -> RolloutBatch:
        """One rollout phase: the same call as `VLLMEngine.rollout` (nothing to sync here)."""
        return self.generate(prompt_ids, **sampling)
