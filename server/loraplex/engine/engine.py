"""The engine: one thread that loops schedule -> run -> postprocess over all in-flight requests.

Threading model: `submit`, `abort`, `shutdown` and `stats` may be called from any thread. They only
touch a small lock-protected inbox (new sequences, abort ids, the id registry); the step loop
drains that inbox at the top of every step and is the only thread that touches the scheduler,
the block manager, the KV cache and the sequences. Callbacks run on the engine thread.

Every request gets exactly one finished event, whatever ends it (EOS, length, stop string, abort,
an error in its step, shutdown).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, Sequence as Seq

import torch

from loraplex.config import EngineConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.detokenizer import IncrementalDetokenizer, check_finish
from loraplex.engine.errors import OUT_OF_MEMORY, AdapterNotFoundError, EngineStoppedError, QueueFullError
from loraplex.engine.logprobs import TokenLogprob, gather_logprobs
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.request import (FinishReason, InvalidRequestError, OutputCallback, Request,
                                     RequestOutput, SamplingParams, Timings)
from loraplex.engine.sampler import Sampler, plain_argmax
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.stats import EngineStats
from loraplex.engine.structured.compiler import GrammarCompiler
from loraplex.engine.structured.grammar import GrammarVocab
from loraplex.engine.structured.masks import MaskBuilder
from loraplex.model import compiled_layers
from loraplex.model.fused_linear import fuse_siblings
from loraplex.model.kv_cache import KVCache, element_dtype
from loraplex.model.amx_linear import amx_wanted
from loraplex.model.packed_linear import pack_lm_head
from loraplex.model.projection_packing import pack_projections
from loraplex.model.weight_arena import move_to_huge_pages
from loraplex.model.widened_linear import widen_projections
from loraplex_kernels import openmp_pool

log = logging.getLogger(__name__)

# When requests wait but none can be scheduled (e.g. every adapter slot is pinned), re-check this
# often instead of spinning; submit/abort/shutdown wake the loop at once anyway.
_BLOCKED_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class FinishedRequest:
    """What observers learn about one request when it ends (once per request)."""
    request_id: str
    adapter_id: str  # "" = base model
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    inter_token_gaps: tuple[float, ...]  # seconds between consecutive generated tokens
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class EngineObserver(Protocol):
    """Metrics and request logs hook in here. Both calls run on the engine thread: keep them
    cheap, never block, never raise (an observer that raises is logged and skipped)."""

    def on_step(self, num_seqs: int, num_tokens: int, distinct_adapters: int) -> None: ...

    def on_finish(self, req: FinishedRequest) -> None: ...


def pack_cpu_weights(model: Any) -> None:
    """bfloat16 CPU weights packed once for faster small GEMMs: for our AMX kernel where the CPU
    has AMX-BF16 (model/amx_linear.py; LORAPLEX_AMX=0 turns it off), else in oneDNN's blocked
    layout (bit-identical to F.linear). The projections, q/k/v and gate/up as one GEMM each, and
    the vocab projection (a tied one as a packed copy of the embedding table unless
    LORAPLEX_PACK_TIED_HEAD=0)."""
    n = pack_projections(model)
    groups = fuse_siblings(model)
    extra = pack_lm_head(model, tied_copy=os.environ.get("LORAPLEX_PACK_TIED_HEAD", "1") != "0")
    if n or groups:
        log.info("packed %d bfloat16 projections for %s, %d q/k/v or gate/up groups fused into one "
                 "GEMM each (LORAPLEX_PACK_WEIGHTS=0 turns it off)", n,
                 "our AMX kernel (LORAPLEX_AMX=0: oneDNN)" if amx_wanted() else "oneDNN", groups)
        moved = move_to_huge_pages(model)  # before anything keeps the weights' addresses
        if moved:
            log.info("%.0f MiB of packed weights on huge pages (LORAPLEX_HUGEPAGES=0 turns it off)", moved / 2**20)
        compiled_layers.attach(model)  # the decoder layers as one compiled call where they qualify
    if extra:
        log.info("packed a copy of the tied lm_head: +%.1f MiB (LORAPLEX_PACK_TIED_HEAD=0 turns it off)",
                 extra / 2**20)
    # Where oneDNN can neither pack nor compute bfloat16 natively (AVX2-only CPUs), the bfloat16
    # GEMMs run our float32-math kernel instead of torch's emulated one (model/widened_linear.py).
    if os.environ.get("LORAPLEX_WIDEN_BF16", "1") != "0":
        widened = widen_projections(model)
        if widened:
            log.info("%d bfloat16 projections run the compiled float32-math GEMM (this CPU has no "
                     "native bfloat16; LORAPLEX_WIDEN_BF16=0 turns it off)", widened)


class _SlotHook:
    """The scheduler's adapter hook: the LoRA manager, remembering why an adapter could not be
    acquired (its background load failed, or memory ran out), so that its requests end with the
    adapter error's own status (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED) rather than
    INTERNAL (the scheduler keeps only a message)."""

    def __init__(self, manager: Any):
        self.manager = manager
        self.errors: dict[str, BaseException] = {}

    def acquire(self, adapter_id: str) -> int | None:
        try:
            return self.manager.acquire(adapter_id)
        except Exception as exc:
            self.errors[adapter_id] = exc
            raise

    def release(self, adapter_id: str) -> None:
        self.manager.release(adapter_id)

    def observe_wait(self, seconds: float) -> None:
        self.manager.observe_wait(seconds)


def _size_kv_cache(config: EngineConfig, loaded: Any) -> EngineConfig:
    """config with num_kv_blocks = what kv_cache_memory holds, when that is set (the block size
    and the cache's element type decide a block's bytes)."""
    if config.kv_cache_memory is None:
        return config
    arch = loaded.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, config.block_size, arch.num_kv_heads, arch.head_dim,
                                        element_dtype(config.kv_cache_dtype, loaded.dtype))
    return dataclasses.replace(config, num_kv_blocks=config.kv_blocks(per_block))


class Engine:
    def __init__(self, loaded: Any, config: EngineConfig, lora_manager: Any = None,
                 observers: Seq[EngineObserver] = ()):
        config = _size_kv_cache(config, loaded)
        self.config = config
        # Observers are fixed at construction: the step reads a tuple, never a lock.
        self._observers = tuple(observers)
        self.tokenizer = loaded.tokenizer
        self.arch = loaded.arch
        self.lora_manager = lora_manager
        self._num_threads = torch.get_num_threads()  # the creating thread's pool size
        model = loaded.model
        self.device = device = next(model.parameters()).device
        if device.type == "cpu" and os.environ.get("LORAPLEX_PACK_WEIGHTS", "1") != "0":
            pack_cpu_weights(model)
        # A sequence must fit in the cache on its own, or preemption could never make room for it.
        self.max_model_len = min(config.max_model_len, loaded.arch.max_position_embeddings,
                                 config.num_kv_blocks * config.block_size)
        eos = set(loaded.arch.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        if self.max_model_len < config.max_model_len:
            log.info("max_model_len capped from %d to %d (model limit %d, KV cache %d tokens)",
                     config.max_model_len, self.max_model_len, loaded.arch.max_position_embeddings,
                     config.num_kv_blocks * config.block_size)

        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self._slots = _SlotHook(lora_manager) if lora_manager is not None else None
        self.scheduler = Scheduler(config, self.block_manager, adapter_slots=self._slots)
        self.runner = ModelRunner(model, loaded.arch, config, dtype=loaded.dtype, device=device,
                                  lora_batch_builder=getattr(lora_manager, "build_lora_batch", None),
                                  decode_graphs="cuda" if config.cuda_graphs else "off")
        self.sampler = Sampler()
        # Structured output: grammars compile in the compiler's own thread (never this engine's
        # loop); per step, the masks of the constrained rows are built while the forward runs.
        vocab_size = loaded.arch.vocab_size
        self.grammars = GrammarCompiler(
            lambda: GrammarVocab.from_hf(self.tokenizer, vocab_size, self.eos_token_ids),
            timeout_s=config.structured_output_compile_timeout,
            max_bytes=config.structured_output_max_bytes, cache_size=config.structured_output_cache_size)
        self._masks = MaskBuilder(vocab_size, overlap=config.structured_output_overlap)

        self._cv = threading.Condition()  # guards everything below
        self._inbox: deque[Sequence] = deque()
        self._abort_ids: list[str] = []
        self._live: dict[str, Sequence] = {}  # request_id -> sequence, submit to finished event
        self._waiting_snapshot = 0  # scheduler.num_waiting as of the last step (for the bound)
        self._accepting = True
        self._stop = False
        self._step_lock = threading.Lock()  # one step (or warmup) at a time
        self._thread: threading.Thread | None = None
        self._counters = dict(steps=0, prompt_tokens=0, generation_tokens=0)
        self._finished_total: dict[str, int] = {r.value: 0 for r in FinishReason}
        self._schedule_failures = 0  # consecutive steps whose schedule() raised

    # --- public API (any thread) -----------------------------------------------------------
    def start(self) -> None:
        """Starts the engine's thread, which runs the steps from now on. The calling thread's
        OpenMP workers are released (openmp_pool.py): a second pool on the same cores makes libgomp
        stop spinning between the engine's parallel regions, and its steps ran ~1.8x slower. Warm up
        before starting; heavy torch work on this thread afterwards brings its pool back."""
        with self._cv:
            if self._thread is not None:
                return
            if self._stop:
                raise EngineStoppedError("the engine was shut down")
            self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
            self._thread.start()
        openmp_pool.release_thread_pool()

    def submit(self, request: Request, callback: OutputCallback) -> None:
        """Queue a request. One with a constraint but no compiled grammar compiles it here, in the
        caller's thread (bounded by the compile timeout): never call that from the engine thread."""
        self._validate(request)
        if request.constraint is not None and request.grammar is None:
            request.grammar = self.grammars.compile(request.constraint)
        seq = Sequence.from_request(request, callback, device=self.device)
        if request.grammar is not None:
            seq.matcher = request.grammar.matcher()
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                 stop=request.sampling.stop)
        # Token arrival times, for inter-token latency: one list append per token, only when
        # someone observes (None otherwise; _on_token checks it).
        seq.token_times = [] if self._observers else None
        reserved = False
        if request.adapter_id and self.lora_manager is not None:
            # Counts the request in flight: its adapter cannot be freed or dropped from the host
            # tier until the request's finished event (see LoraManager).
            self.lora_manager.reserve(request.adapter_id)
            reserved = True
        try:
            if self.config.enable_prefix_caching:
                seq.prefix_cache_key = self._prefix_cache_key(request.adapter_id)
            with self._cv:
                if not self._accepting:
                    raise EngineStoppedError("the engine is shutting down")
                if request.request_id in self._live:
                    raise InvalidRequestError("request_id", f"{request.request_id!r} is already in flight")
                if len(self._inbox) + self._waiting_snapshot >= self.config.max_waiting:
                    raise QueueFullError(self.config.max_waiting)
                self._live[request.request_id] = seq
                self._inbox.append(seq)
                self._cv.notify_all()
        except Exception:
            if reserved:
                self.lora_manager.finish(request.adapter_id)
            raise

    @property
    def accepting(self) -> bool:
        """False once shutdown() began: new requests are refused, running ones drain."""
        return self._accepting

    def abort(self, request_id: str) -> None:
        """Cancel a request; its callback gets a CANCELLED finished event within a step. Unknown
        or already finished ids are ignored (the client may race with the request's end)."""
        with self._cv:
            if request_id in self._live:
                self._abort_ids.append(request_id)
                self._cv.notify_all()

    def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_seconds`, then cancel
        the rest and stop the loop. Every request gets its finished event before this returns."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("shutdown() called from the engine thread (e.g. from a callback)")
        deadline = time.monotonic() + max(grace_seconds, 0.0)
        with self._cv:
            self._accepting = False
            while self._live and self._thread is not None and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        # The loop has exited: this thread now owns the engine state. Cancel what is left.
        with self._step_lock:
            self._drain_inbox()
            for seq in list(self._live.values()):
                self._finish(seq, FinishReason.CANCELLED)
        self.grammars.shutdown()
        self._masks.shutdown()

    def stats(self) -> EngineStats:
        with self._cv:
            num_inbox = len(self._inbox)
            counters = dict(self._counters)
            finished = dict(self._finished_total)
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + num_inbox,
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            steps_total=counters["steps"],
            prompt_tokens_total=counters["prompt_tokens"],
            generation_tokens_total=counters["generation_tokens"],
            preemptions_total=self.scheduler.num_preemptions_total,
            finished_total=finished,
            prefix_cache_queried_tokens_total=self.block_manager.queried_tokens_total,
            prefix_cache_hit_tokens_total=self.block_manager.hit_tokens_total,
            prefix_cache_blocks=self.block_manager.num_cached_blocks,
            prefix_cache_evictions_total=self.block_manager.evictions_total,
            structured_output_cache_hits_total=self.grammars.hits,
            structured_output_cache_misses_total=self.grammars.misses,
            structured_output_compile_failures_total=self.grammars.failures,
            structured_output_cached_grammars=self.grammars.cache_len,
        )

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (e.g. to measure cold prompts); blocks in use stay with
        their requests. Returns how many blocks were registered. Any thread."""
        with self._step_lock:
            return self.block_manager.reset_prefix_cache()

    def warmup(self) -> None:
        """One tiny forward (a 2-token prefill) so the first real request pays no first-call costs.
        It runs on the calling thread: after start(), that thread's OpenMP pool is released again."""
        req = Request("__warmup__", [0] * min(2, self.max_model_len), SamplingParams(max_new_tokens=1))
        seq = Sequence.from_request(req, device=self.device)
        with self._step_lock:
            self.block_manager.allocate(seq, seq.num_tokens)
            try:
                self.runner.run([seq], [seq.num_tokens])
            finally:
                self.block_manager.free(seq)
        if self._thread is not None and threading.current_thread() is not self._thread:
            openmp_pool.release_thread_pool()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> int:
        """One iteration: take in new requests and aborts, schedule, run, emit. Returns the number
        of sequences that ran. Called by the loop thread (tests may call it with no thread)."""
        with self._step_lock:
            self._drain_inbox()
            try:
                batch = self.scheduler.schedule()
            except Exception as exc:  # fail what the broken schedule touched; the loop goes on
                log.exception("scheduling failed")
                self._fail_after_schedule_error(exc)
                batch = ScheduledBatch()
            else:
                self._schedule_failures = 0
            for seq, message in batch.failed:
                cause = self._slots.errors.get(seq.adapter_id) if self._slots is not None else None
                self._finish(seq, FinishReason.ERROR, error=message,
                             out_of_memory=isinstance(cause, OUT_OF_MEMORY), cause=cause)
            if self._slots is not None:
                self._slots.errors.clear()
            if batch.seqs:
                if self._observers:  # before the run: a client that got its last token sees it
                    self._notify_step(batch)
                self._execute(batch)
        with self._cv:
            self._waiting_snapshot = self.scheduler.num_waiting
            self._counters["steps"] += 1
        return len(batch)

    def _fail_after_schedule_error(self, exc: Exception) -> None:
        """After schedule() raised: fail the running sequences (their blocks may be half
        allocated) and any it had taken out of the queues, but keep the waiting ones, untouched
        by a crash in an earlier phase: a one-off fault costs only the requests in flight. If the
        next schedule fails too, a waiting request is likely the cause: fail those as well."""
        self._schedule_failures += 1
        self._fail_in_flight(exc, keep_waiting=self._schedule_failures == 1)

    def _fail_in_flight(self, exc: Exception, keep_waiting: bool) -> None:
        """Fail every request taken in from the inbox -- running, waiting (unless keep_waiting)
        or dropped out of both queues by the crash, which would otherwise never get its finished
        event -- but not those submitted since the drain."""
        error = f"{type(exc).__name__}: {exc}"
        keep = {id(s) for s in self.scheduler.waiting} if keep_waiting else set()
        with self._cv:
            keep |= {id(s) for s in self._inbox}
            live = list(self._live.values())
        for seq in live:
            if id(seq) not in keep:
                self._finish(seq, FinishReason.ERROR, error=error)

    def _execute(self, batch: ScheduledBatch) -> None:
        sampling = [i for i in range(len(batch)) if batch.samples(i)]  # rows that reach their end
        sampled = [batch.seqs[i] for i in sampling]
        num_decodes = sum(s.is_decoding for s in batch.seqs)
        try:
            params = [s.sampling for s in sampled]
            if plain_argmax(params) and all(s.matcher is None for s in sampled):
                # Every token is its row's argmax and nobody asked for the distribution: the model
                # returns the tokens [S] alone (no logits written and read back).
                greedy = self.runner.run(batch.seqs, batch.num_new_tokens, greedy=True)  # [S]
                tokens = (greedy if len(sampling) == greedy.shape[0] else greedy[sampling]).tolist()
                logprobs = [None] * len(tokens)
            else:
                # Structured output: the constrained rows' masks are computed while the forward runs.
                pending = self._masks.start([s.matcher for s in sampled])
                logits = self.runner.run(batch.seqs, batch.num_new_tokens)  # [S, vocab]
                # Every row samples on a pure decode step: skip the [S, vocab] gather (a 6 MB copy).
                rows = logits if len(sampling) == logits.shape[0] else logits[sampling]
                tokens = self.sampler(rows, params, [s.token_array for s in sampled], [s.generator for s in sampled],
                                      [s.num_prompt_tokens for s in sampled],
                                      masks=pending.result() if pending is not None else None)
                top_ks = [p.logprobs for p in params]
                # From the raw logits: the sampler never writes into its input (it clones first).
                logprobs = (gather_logprobs(rows, tokens, top_ks) if any(k is not None for k in top_ks)
                            else [None] * len(tokens))
        except Exception as exc:  # fail this step's requests only; the loop goes on
            log.exception("engine step failed for %d requests", len(batch))
            for seq in batch.seqs:
                self._finish(seq, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)  # its newly full blocks become shareable
        with self._cv:
            self._counters["prompt_tokens"] += batch.num_tokens - num_decodes
            self._counters["generation_tokens"] += len(tokens)
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            self._on_token(seq, token, logprob)

    def _on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        try:
            now = time.monotonic()
            seq.append_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            times = getattr(seq, "token_times", None)
            if times is not None:
                times.append(now)
            is_eos = token in self.eos_token_ids and not seq.sampling.ignore_eos
            delta = "" if is_eos else seq.detokenizer.add_token(token)
            reason = check_finish(token, seq.num_generated, seq.num_tokens, seq.sampling,
                                  self.eos_token_ids, self.max_model_len, seq.detokenizer.stopped)
            if seq.matcher is not None:
                reason = self._advance_grammar(seq, token, reason)
        except Exception as exc:
            log.exception("postprocessing failed for request %s", seq.request_id)
            self._finish(seq, FinishReason.ERROR, (token,), error=f"{type(exc).__name__}: {exc}")
            return
        logprobs = () if logprob is None else (logprob,)
        if reason is None:
            self._deliver(seq, RequestOutput(seq.request_id, (token,), delta, logprobs=logprobs))
        else:
            self._finish(seq, reason, (token,), delta + seq.detokenizer.flush(), logprobs=logprobs)

    @staticmethod
    def _advance_grammar(seq: Sequence, token: int, reason: FinishReason | None) -> FinishReason | None:
        """Structured output: the matcher consumes the token just appended (exactly once per
        token: a recompute after preemption replays tokens without coming here). A complete
        structure ends the request (GRAMMAR), also when its last token used up max_new_tokens;
        EOS and stop strings keep their own reasons."""
        if not seq.matcher.advance(token):  # the mask allowed it, so this is a bug, not bad input
            raise RuntimeError(f"structured output: token {token} rejected by the grammar: {seq.matcher.error}")
        if seq.matcher.stopped and reason in (None, FinishReason.LENGTH):
            return FinishReason.GRAMMAR
        return reason

    def _finish(self, seq: Sequence, reason: FinishReason, new_token_ids: tuple[int, ...] = (),
                text_delta: str = "", error: str | None = None, out_of_memory: bool = False,
                cause: BaseException | None = None, logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        if self._live.get(seq.request_id) is not seq:
            return  # already reported (e.g. aborted and failed in the same step)
        self.scheduler.finish(seq)  # frees KV blocks and the adapter slot
        if seq.adapter_id and self.lora_manager is not None:
            self.lora_manager.finish(seq.adapter_id)  # pairs with reserve() in submit
        seq.finish_reason = reason
        out = RequestOutput(
            seq.request_id, new_token_ids, text_delta, finished=True, finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_generated,
            cached_prompt_tokens=seq.num_cached_prompt_tokens,
            timings=seq.timings(), error=error if reason is FinishReason.ERROR else None,
            out_of_memory=out_of_memory and reason is FinishReason.ERROR,
            cause=cause if reason is FinishReason.ERROR else None, logprobs=logprobs)
        with self._cv:
            if self._live.get(seq.request_id) is seq:
                del self._live[seq.request_id]
            self._finished_total[reason.value] += 1
            self._cv.notify_all()  # shutdown() waits for _live to empty
        if self._observers:  # before delivery: a client that saw the end sees it counted
            self._notify_finish(seq, out)
        self._deliver(seq, out)

    # --- observers (engine thread; once per step / once per finished request) ------------------
    def _notify_step(self, batch: ScheduledBatch) -> None:
        adapters = {s.adapter_id for s in batch.seqs}
        adapters.discard("")  # the base model is not an adapter
        for obs in self._observers:
            try:
                obs.on_step(len(batch.seqs), batch.num_tokens, len(adapters))
            except Exception:
                log.exception("engine observer %r failed in on_step", obs)

    def _notify_finish(self, seq: Sequence, out: RequestOutput) -> None:
        times = getattr(seq, "token_times", None) or ()
        summary = FinishedRequest(
            request_id=seq.request_id, adapter_id=seq.adapter_id, finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            cached_prompt_tokens=out.cached_prompt_tokens, timings=out.timings,
            inter_token_gaps=tuple(b - a for a, b in zip(times, times[1:])))
        for obs in self._observers:
            try:
                obs.on_finish(summary)
            except Exception:
                log.exception("engine observer %r failed in on_finish", obs)

    @staticmethod
    def _deliver(seq: Sequence, out: RequestOutput) -> None:
        if seq.callback is None:
            return
        try:
            seq.callback(out)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("output callback failed for request %s", seq.request_id)

    def _drain_inbox(self) -> None:
        with self._cv:
            new, self._inbox = list(self._inbox), deque()
            abort_ids, self._abort_ids = self._abort_ids, []
        for seq in new:
            self.scheduler.add(seq, check_bound=False)  # bounded at submit (inbox + waiting)
        for request_id in abort_ids:
            seq = self._live.get(request_id)
            if seq is not None:
                self._finish(seq, FinishReason.CANCELLED)

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        # OpenMP's thread count is per OS thread: without this, torch ops issued from this
        # (non-main) thread ran with a smaller pool and measurably slower on CPU.
        torch.set_num_threads(self._num_threads)
        while True:
            with self._cv:
                idle = self._idle()
            if idle:
                # Nothing to step: this thread's OpenMP workers go (openmp_pool.py), so that
                # torch work on another thread meanwhile has the cores' pool to itself; the next
                # step starts a new one (~0.1 ms, once per busy period).
                openmp_pool.release_thread_pool()
            with self._cv:
                while self._idle():
                    self._cv.wait()  # idle: no busy spin
                if self._stop:
                    return
            try:
                ran = self.step()
            except Exception as exc:  # a bug outside the model call: fail what is in flight
                log.exception("engine step crashed")
                with self._step_lock:
                    self._fail_in_flight(exc, keep_waiting=False)
                ran = 1
            if ran == 0:
                with self._cv:
                    if not (self._stop or self._inbox or self._abort_ids):
                        self._cv.wait(_BLOCKED_POLL_SECONDS)

    def _idle(self) -> bool:
        """Under _cv: nothing to step and no stop asked for."""
        return not (self._stop or self._inbox or self._abort_ids or self.scheduler.has_work())

    def _prefix_cache_key(self, adapter_id: str) -> str | None:
        """What a request's K/V depends on besides its tokens: nothing for the base model, else
        the adapter's weights (the manager's content key: another one when the id is loaded again
        with other weights). Read once, at submit: reserve() keeps the weights until the end.
        None (never cached) for an adapter manager that cannot name its weights."""
        if not adapter_id:
            return ""
        content_key = getattr(self.lora_manager, "content_key", None)
        return None if content_key is None else content_key(adapter_id)

    # --- validation ----------------------------------------------------------------------------
    def _validate(self, request: Request) -> None:
        prompt = request.prompt_token_ids
        if len(prompt) == 0:
            raise InvalidRequestError("prompt", "must not be empty")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(prompt)} tokens is longer than the context: at most "
                f"{self.max_model_len - 1} prompt tokens fit (max_model_len {self.max_model_len})")
        bad = next((t for t, _ in request.sampling.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab})")
        cap = self.config.max_new_tokens_cap
        if request.sampling.max_new_tokens > cap:
            raise InvalidRequestError(
                "max_new_tokens", f"{request.sampling.max_new_tokens} is above the cap of {cap}")
        if request.adapter_id and (self.lora_manager is None
                                   or not self.lora_manager.exists(request.adapter_id)):
            raise AdapterNotFoundError(request.adapter_id)
