"""Shared parts of minirlvr: what every algorithm script needs and a reader does not study.

- `common.reward`: math-verify reward checking, bounded in time, never executes model output.
- `common.logprobs`: per-token log-probs (and entropy) without a full fp32 [N, V] copy;
  Triton kernels on CUDA, a chunked torch reference elsewhere.
- `common.vllm_engine`: the colocated vLLM rollout engine and in-place weight sync.
- `common.data`: datasets, prompts and the model/tokenizer loading.
"""
