"""The client side of the soak: drive a loraplex server over gRPC and account for every request.

`make_plan` draws the workload from a seed: each request picks unary Generate or GenerateStream,
an adapter (zipf popularity over `adapter_ids`, a few on the base model, some on the "churn"
adapters that a background task loads and unloads), and what the client does to it: nothing, a
cancellation (a stream after k tokens, a unary call after a delay) or a short deadline.

`run_soak` sends the plan with `concurrency` closed-loop workers on one grpc.aio channel while
the churn task calls LoadAdapter / UnloadAdapter (churn adapters, and popular adapters that
requests are using), and returns one `Outcome` per request. An outcome is written exactly once
per request id; a second write is itself recorded as a violation.

`check_outcome` says what a single client-side outcome must look like; `reconcile` compares the
client's outcomes with the server's own account (submitted ids, finished events) where it has one.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable

import grpc

from loraplex.api.pb.loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb, generation_pb2_grpc

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis in simple terms.", "List three uses of a paperclip.",
           "Once upon a time there was a little town by the sea.", "Why is the sky blue?")
NORMAL, CANCEL, DEADLINE = "normal", "cancel", "deadline"
FINISHED_OK = ("eos", "length", "stop")  # server finish reasons of a request that completed


@dataclass(frozen=True)
class SoakConfig:
    adapter_ids: tuple[str, ...]  # zipf-ranked: the first is the most popular
    requests: int = 300  # requests to send (an upper bound when duration_s is set)
    duration_s: float | None = None  # stop sending new requests after this many seconds
    concurrency: int = 8
    zipf_s: float = 1.0
    base_fraction: float = 0.05  # requests on the base model (no adapter)
    stream_fraction: float = 0.5  # GenerateStream; the rest are unary Generate
    cancel_fraction: float = 0.15
    deadline_fraction: float = 0.15
    deadline_s: tuple[float, float] = (0.05, 0.5)  # short deadlines, drawn uniformly
    cancel_after_s: tuple[float, float] = (0.01, 0.3)  # unary cancellations, after this delay
    max_new_tokens: tuple[int, int] = (4, 24)  # drawn uniformly; EOS is ignored
    # Churn: (adapter_id, folder) pairs the churn task loads and unloads; `churn_traffic` of the
    # requests go to them (NOT_FOUND while unloaded). Churn also unloads (and later reloads) one of
    # the `churn_popular` most popular adapters, which requests are using.
    churn: tuple[tuple[str, str], ...] = ()
    churn_every_s: float | None = None  # None = no churn
    churn_traffic: float = 0.1
    churn_popular: int = 4
    popular_paths: tuple[tuple[str, str], ...] = ()  # id -> folder for reloading popular adapters
    timeout_s: float = 120.0  # deadline of every request without a short one: a hang fails loudly
    seed: int = 0
    prompts: tuple[str, ...] = PROMPTS
    id_prefix: str = "soak"
    admin_token: str | None = None  # `authorization: Bearer` on every call (admin calls need it)

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1:
            raise ValueError("requests and concurrency must be >= 1")
        if self.cancel_fraction + self.deadline_fraction > 1:
            raise ValueError("cancel_fraction + deadline_fraction must be <= 1")
        for name in ("zipf_s", "base_fraction", "stream_fraction", "churn_traffic"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not 1 <= self.max_new_tokens[0] <= self.max_new_tokens[1]:
            raise ValueError("max_new_tokens: need 1 <= lo <= hi")
        if self.churn_every_s is not None and self.churn_every_s <= 0:
            raise ValueError("churn_every_s: must be > 0")


@dataclass(frozen=True)
class Planned:
    request_id: str
    adapter_id: str  # "" = base model
    stream: bool
    action: str  # NORMAL | CANCEL | DEADLINE
    max_new_tokens: int
    prompt: str
    cancel_after_tokens: int = 0  # streams: cancel once this many tokens arrived
    cancel_after_s: float = 0.0  # unary: cancel after this delay
    deadline_s: float = 0.0


def zipf_weights(n: int, s: float) -> list[float]:
    """P(rank k) ∝ 1 / k^s, k = 1..n."""
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def make_plan(cfg: SoakConfig) -> Iterable[Planned]:
    """The request stream (lazy: duration runs take as many as they send), deterministic per seed."""
    rng = random.Random(cfg.seed)
    weights = zipf_weights(len(cfg.adapter_ids), cfg.zipf_s) if cfg.adapter_ids else []
    churn_ids = [aid for aid, _ in cfg.churn]
    for i in range(cfg.requests):
        u = rng.random()
        if u < cfg.base_fraction or not cfg.adapter_ids:
            adapter = ""
        elif churn_ids and u < cfg.base_fraction + cfg.churn_traffic:
            adapter = rng.choice(churn_ids)
        else:
            adapter = rng.choices(cfg.adapter_ids, weights)[0]
        a = rng.random()
        action = CANCEL if a < cfg.cancel_fraction else (
            DEADLINE if a < cfg.cancel_fraction + cfg.deadline_fraction else NORMAL)
        n = rng.randint(*cfg.max_new_tokens)
        yield Planned(request_id=f"{cfg.id_prefix}-{i:06d}", adapter_id=adapter,
                      stream=rng.random() < cfg.stream_fraction, action=action, max_new_tokens=n,
                      prompt=rng.choice(cfg.prompts),
                      cancel_after_tokens=rng.randint(1, max(1, n - 1)),
                      cancel_after_s=rng.uniform(*cfg.cancel_after_s), deadline_s=rng.uniform(*cfg.deadline_s))


@dataclass
class Outcome:
    """What the client saw of one request. `status` is its one final status (a StatusCode name)."""
    request_id: str
    adapter_id: str
    stream: bool
    action: str
    status: str
    detail: str = ""
    messages: int = 0  # stream messages (1 for a unary response)
    finals: int = 0  # messages carrying a finish_reason (a unary response counts as one)
    final_not_last: bool = False  # a message arrived after the final one
    tokens: int = 0  # generated tokens received
    usage_tokens: int | None = None  # usage.completion_tokens of the final message
    finish_reason: str = ""
    id_mismatch: bool = False  # a message echoed another request id
    ttft_s: float | None = None  # client-side, streams only (a unary call sees no first token)
    e2e_s: float = 0.0
    cancel_sent: bool = False  # the client's cancel() reached a call that was still running


@dataclass
class SoakResult:
    outcomes: dict[str, Outcome]
    violations: list[str]  # client-side: duplicates, malformed endings
    admin: Counter  # "load OK", "unload NOT_FOUND", ...
    wall_s: float
    sent_ids: list[str]  # in the order the client sent them

    @property
    def sent(self) -> int:
        return len(self.sent_ids)


def _finish_name(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


class _Driver:
    def __init__(self, target: str, cfg: SoakConfig):
        self.cfg = cfg
        self.target = target
        self.outcomes: dict[str, Outcome] = {}
        self.violations: list[str] = []
        self.admin: Counter = Counter()
        self.sent_ids: list[str] = []
        # The server accepts the admin token on generation calls too (api/auth.py).
        self.md = (("authorization", f"Bearer {cfg.admin_token}"),) if cfg.admin_token else None

    def _record(self, out: Outcome) -> None:
        if out.request_id in self.outcomes:
            self.violations.append(f"{out.request_id}: a second final status ({out.status} after "
                                   f"{self.outcomes[out.request_id].status})")
            return
        self.outcomes[out.request_id] = out

    def _request(self, p: Planned) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            adapter_id=p.adapter_id, prompt=p.prompt, request_id=p.request_id,
            sampling=pb.SamplingParams(max_new_tokens=p.max_new_tokens, temperature=0.0, ignore_eos=True))

    async def one(self, p: Planned) -> None:
        out = Outcome(p.request_id, p.adapter_id, p.stream, p.action, status="")
        timeout = p.deadline_s if p.action == DEADLINE else self.cfg.timeout_s
        t0 = time.perf_counter()
        self.sent_ids.append(p.request_id)
        try:
            if p.stream:
                await self._stream(p, out, timeout, t0)
            else:
                await self._unary(p, out, timeout)
        except grpc.aio.AioRpcError as err:
            out.status, out.detail = err.code().name, (err.details() or "")[:200]
        except Exception as err:  # noqa: BLE001 - a client-side bug is a finding, not a crash
            out.status, out.detail = "CLIENT_ERROR", f"{type(err).__name__}: {err}"[:200]
        out.e2e_s = time.perf_counter() - t0
        self._record(out)

    async def _unary(self, p: Planned, out: Outcome, timeout: float) -> None:
        call = self.gen.Generate(self._request(p), timeout=timeout, metadata=self.md)
        timer = None
        if p.action == CANCEL:
            def cancel() -> None:
                out.cancel_sent = call.cancel()
            timer = asyncio.get_running_loop().call_later(p.cancel_after_s, cancel)
        try:
            resp = await call
        except asyncio.CancelledError:
            if not out.cancel_sent:
                raise  # our own task is being cancelled, not the call
            out.status = (await call.code()).name
            return
        finally:
            if timer is not None:
                timer.cancel()
        out.messages = out.finals = 1
        out.tokens, out.usage_tokens = len(resp.token_ids), resp.usage.completion_tokens
        out.finish_reason = _finish_name(resp.finish_reason)
        out.id_mismatch = resp.request_id != p.request_id
        out.status = (await call.code()).name

    async def _stream(self, p: Planned, out: Outcome, timeout: float, t0: float) -> None:
        call = self.gen.GenerateStream(self._request(p), timeout=timeout, metadata=self.md)
        try:
            async for msg in call:
                out.messages += 1
                out.final_not_last |= out.finals > 0
                out.id_mismatch |= msg.request_id != p.request_id
                if msg.token_ids and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                out.tokens += len(msg.token_ids)
                if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    out.finals += 1
                    out.usage_tokens = msg.usage.completion_tokens
                    out.finish_reason = _finish_name(msg.finish_reason)
                if (p.action == CANCEL and not out.finals and out.tokens >= p.cancel_after_tokens
                        and call.cancel()):
                    # cancel() is False once the call has ended: then keep reading what it sent.
                    out.cancel_sent = True
                    break
        except asyncio.CancelledError:
            if not out.cancel_sent:
                raise
        out.status = (await call.code()).name

    async def worker(self, plan) -> None:
        for p in plan:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return
            await self.one(p)

    async def churn(self, stop: asyncio.Event) -> None:
        """Every churn_every_s: load a churn adapter, unload another, and unload or reload one of
        the most popular adapters (requests use those all the time)."""
        rng = random.Random(self.cfg.seed + 1)
        churn = list(self.cfg.churn)
        popular = list(self.cfg.popular_paths)[: self.cfg.churn_popular]
        unloaded_popular: list[tuple[str, str]] = []
        tick = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.churn_every_s)
                return
            except asyncio.TimeoutError:
                pass
            tick += 1
            if churn:
                aid, path = rng.choice(churn)
                await self._admin("load", self.adapters.LoadAdapter,
                                  apb.LoadAdapterRequest(adapter_id=aid, path=path))
                aid, _ = rng.choice(churn)
                await self._admin("unload", self.adapters.UnloadAdapter, apb.UnloadAdapterRequest(adapter_id=aid))
            if popular and tick % 2 == 1:
                aid, path = rng.choice(popular)
                await self._admin("unload_popular", self.adapters.UnloadAdapter,
                                  apb.UnloadAdapterRequest(adapter_id=aid))
                unloaded_popular.append((aid, path))
            elif unloaded_popular:
                aid, path = unloaded_popular.pop(0)
                code = await self._admin("reload_popular", self.adapters.LoadAdapter,
                                         apb.LoadAdapterRequest(adapter_id=aid, path=path))
                if code == "ALREADY_EXISTS":  # still draining its requests: retry next round
                    unloaded_popular.append((aid, path))
        # Leave the popular adapters loaded, so a later run starts from the same state (without
        # --adapter-root nothing else would bring them back). Their last requests may still be
        # draining (ALREADY_EXISTS): aborts land within an engine step, so retry briefly.
        for aid, path in unloaded_popular:
            for _ in range(100):
                code = await self._admin("reload_popular", self.adapters.LoadAdapter,
                                         apb.LoadAdapterRequest(adapter_id=aid, path=path))
                if code != "ALREADY_EXISTS":
                    break
                await asyncio.sleep(0.05)

    async def _admin(self, what: str, method, request) -> str:
        """One adapter call; counts and returns its status name."""
        try:
            await method(request, timeout=30, metadata=self.md)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        self.admin[f"{what} {code}"] += 1
        return code

    async def run(self) -> SoakResult:
        cfg = self.cfg
        async with grpc.aio.insecure_channel(self.target) as channel:
            self.gen = generation_pb2_grpc.GenerationStub(channel)
            self.adapters = adapters_pb2_grpc.AdaptersStub(channel)
            t0 = time.monotonic()
            self.deadline = None if cfg.duration_s is None else t0 + cfg.duration_s
            plan = iter(make_plan(cfg))  # shared: each worker takes the next request
            stop = asyncio.Event()
            churn = (asyncio.ensure_future(self.churn(stop))
                     if cfg.churn_every_s is not None and (cfg.churn or cfg.popular_paths) else None)
            try:
                await asyncio.gather(*(self.worker(plan) for _ in range(cfg.concurrency)))
            finally:
                stop.set()
                if churn is not None:
                    await churn
            wall = time.monotonic() - t0
        return SoakResult(self.outcomes, self.violations, self.admin, wall, self.sent_ids)


async def run_soak(target: str, cfg: SoakConfig) -> SoakResult:
    return await _Driver(target, cfg).run()


async def prime(target: str, adapter_ids: Iterable[str], admin_token: str | None = None) -> Counter:
    """One 1-token request per adapter, one at a time: every adapter is then on the host tier, so
    memory measured afterwards holds all of them (a warm-up that missed some would make their
    first load look like growth). Returns the statuses."""
    md = (("authorization", f"Bearer {admin_token}"),) if admin_token else None
    statuses: Counter = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for aid in adapter_ids:
            req = pb.GenerateRequest(adapter_id=aid, prompt=PROMPTS[0], sampling=pb.SamplingParams(
                max_new_tokens=1, temperature=0.0, ignore_eos=True))
            try:
                await stub.Generate(req, timeout=120, metadata=md)
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as err:
                statuses[err.code().name] += 1
    return statuses


async def list_adapters(target: str, admin_token: str | None = None) -> list:
    md = (("authorization", f"Bearer {admin_token}"),) if admin_token else None
    async with grpc.aio.insecure_channel(target) as channel:
        resp = await adapters_pb2_grpc.AdaptersStub(channel).ListAdapters(
            apb.ListAdaptersRequest(), timeout=30, metadata=md)
    return list(resp.adapters)


# --- checks ----------------------------------------------------------------------------------------
def check_outcome(o: Outcome) -> list[str]:
    """What one request's ending must look like from the client's side.

    OK: exactly one final message, the last one, whose usage counts the tokens received, and
    every message echoing the request id. Any other status: no complete answer was delivered
    before it, except that a deadline may expire (or a cancel land) between a stream's final
    message and its trailing status, so at most one final message. A request with no short
    deadline that ends DEADLINE_EXCEEDED hit the safety timeout: a hang.
    """
    bad = []
    if o.id_mismatch:
        bad.append("a message carried another request id")
    if o.status == "OK":
        if o.finals != 1:
            bad.append(f"status OK with {o.finals} final messages")
        if o.final_not_last:
            bad.append("a message after the final one")
        if o.usage_tokens != o.tokens:
            bad.append(f"usage says {o.usage_tokens} tokens, {o.tokens} received")
        if o.finish_reason not in FINISHED_OK:
            bad.append(f"status OK with finish_reason {o.finish_reason!r}")
    else:
        if o.finals > 1 or o.final_not_last:
            bad.append(f"status {o.status} after {o.finals} final messages")
        if o.status in ("", "CLIENT_ERROR"):
            bad.append(f"no final status ({o.detail})")
    if o.status == "DEADLINE_EXCEEDED" and o.action != DEADLINE:
        bad.append("hit the safety timeout (hung)")
    if o.status == "CANCELLED" and not o.cancel_sent:
        bad.append("CANCELLED without a client cancel")
    return [f"{o.request_id}: {b}" for b in bad]


def reconcile(planned_ids: Iterable[str], outcomes: dict[str, Outcome], submitted: list[str],
              finished: list) -> list[str]:
    """Client outcomes vs the server's own account (ids submitted to the engine, finished events).

    - every planned request has exactly one outcome (none lost), and no outcome is unplanned;
    - the server finished each submitted request exactly once, and nothing it did not submit;
    - OK requests were submitted and finished as eos/length/stop with the same token count;
    - NOT_FOUND (and INVALID_ARGUMENT, RESOURCE_EXHAUSTED) requests never reached the engine;
    - CANCELLED / DEADLINE_EXCEEDED requests may or may not have reached it (the client may give
      up while the server still reads the adapter), and when they did the server may have
      finished them before the cancel arrived: any reason is fine, but exactly one.
    """
    bad = []
    planned = list(planned_ids)
    missing = [r for r in planned if r not in outcomes]
    extra = sorted(set(outcomes) - set(planned))
    bad += [f"{r}: sent but no final status" for r in missing]
    bad += [f"{r}: an outcome for a request never sent" for r in extra]
    sub_counts = Counter(submitted)
    fin_counts = Counter(f.request_id for f in finished)
    bad += [f"{r}: submitted {n} times" for r, n in sub_counts.items() if n > 1]
    bad += [f"{r}: finished {n} times on the server" for r, n in fin_counts.items() if n > 1]
    bad += [f"{r}: submitted but never finished on the server" for r in sub_counts if r not in fin_counts]
    bad += [f"{r}: finished on the server but never submitted" for r in fin_counts if r not in sub_counts]
    bad += [f"{r}: reached the server but the client never sent it" for r in sub_counts if r not in outcomes]
    by_id = {f.request_id: f for f in finished}
    for rid, o in outcomes.items():
        f = by_id.get(rid)
        if o.status == "OK":
            if f is None:
                bad.append(f"{rid}: OK on the client, never finished on the server")
            elif f.finish_reason not in FINISHED_OK or f.completion_tokens != o.tokens:
                bad.append(f"{rid}: OK with {o.tokens} tokens, server says {f.finish_reason} "
                           f"with {f.completion_tokens}")
        elif o.status in ("NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") and rid in sub_counts:
            bad.append(f"{rid}: {o.status} on the client but the engine took it")
    return bad


# --- summary ---------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def summarize(res: SoakResult) -> dict:
    outs = list(res.outcomes.values())
    statuses = Counter(o.status for o in outs)
    ok = [o for o in outs if o.status == "OK"]
    tokens = sum(o.tokens for o in outs)
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    e2e = [o.e2e_s for o in ok]

    def pcts(xs):
        return {f"p{q}": (None if percentile(xs, q) is None else round(percentile(xs, q) * 1000, 1))
                for q in (50, 90, 99)}

    return {
        "sent": res.sent,
        "completed": statuses.get("OK", 0),
        "cancelled": statuses.get("CANCELLED", 0),
        "deadline_exceeded": statuses.get("DEADLINE_EXCEEDED", 0),
        "failed_by_status": {k: v for k, v in sorted(statuses.items())
                             if k not in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")},
        "by_action": {a: dict(Counter(o.status for o in outs if o.action == a))
                      for a in (NORMAL, CANCEL, DEADLINE)},
        "streams": sum(o.stream for o in outs),
        "adapters_used": len({o.adapter_id for o in outs if o.adapter_id}),
        "tokens": tokens,
        "tokens_per_s": round(tokens / res.wall_s, 1) if res.wall_s else None,
        "completed_tokens": sum(o.tokens for o in ok),
        "wall_s": round(res.wall_s, 2),
        "ttft_ms_streams": pcts(ttft),
        "e2e_ms": pcts(e2e),
        "e2e_ms_mean": round(statistics.fmean(e2e) * 1000, 1) if e2e else None,
        "admin": dict(sorted(res.admin.items())),
        "client_violations": len(res.violations) + sum(len(check_outcome(o)) for o in outs),
    }


def outcome_rows(res: SoakResult) -> list[dict]:
    return [asdict(o) for o in res.outcomes.values()]
