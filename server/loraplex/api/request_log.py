"""One structured log line per finished request, as text or JSON.

`RequestLogger` is an engine observer: on each finished request it logs, on the
"loraplex.requests" logger at INFO, a message plus the fields in `record.request` (a dict).
`JsonFormatter` renders any record as one JSON object per line and merges those fields at the
top level, so log shippers (Loki, Elasticsearch, Cloud Logging) index them without parsing:

    {"ts": "2026-11-23T11:20:03.512Z", "level": "INFO", "logger": "loraplex.requests",
     "msg": "request finished", "request_id": "r1", "adapter_id": "sql", "finish_reason": "eos",
     "prompt_tokens": 12, "completion_tokens": 40, "cached_prompt_tokens": 0,
     "queue_seconds": 0.002, "ttft_seconds": 0.031, "total_seconds": 0.52,
     "itl_mean_seconds": 0.012, "itl_max_seconds": 0.04}

`configure_logging(fmt, level)` sets the root handler for `loraplex serve --log-format`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

REQUEST_LOGGER = "loraplex.requests"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestLogger:
    """Engine observer logging one line per finished request (its on_step does nothing)."""

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger(REQUEST_LOGGER)

    def on_step(self, num_seqs: int, num_tokens: int, distinct_adapters: int) -> None:
        pass

    def on_finish(self, req) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return  # building the fields is the only cost; skip it when nobody listens
        fields = request_fields(req)
        self.log.info(
            "request finished id=%s adapter=%s reason=%s prompt_tokens=%d cached_prompt_tokens=%d "
            "completion_tokens=%d queue=%.3fs ttft=%.3fs total=%.3fs", fields["request_id"],
            fields["adapter_id"] or "-", fields["finish_reason"], fields["prompt_tokens"],
            fields["cached_prompt_tokens"], fields["completion_tokens"], fields["queue_seconds"],
            fields["ttft_seconds"], fields["total_seconds"],
            extra={"request": fields})


def request_fields(req) -> dict:
    """engine.FinishedRequest -> flat JSON-safe dict (timings rounded to microseconds)."""
    t = req.timings
    gaps = req.inter_token_gaps
    return {
        "request_id": req.request_id,
        "adapter_id": req.adapter_id,
        "finish_reason": req.finish_reason.value,
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": req.completion_tokens,
        "cached_prompt_tokens": getattr(req, "cached_prompt_tokens", 0),
        "queue_seconds": round(t.queue_seconds, 6) if t else None,
        "ttft_seconds": round(t.ttft_seconds, 6) if t and req.completion_tokens else None,
        "total_seconds": round(t.total_seconds, 6) if t else None,
        "itl_mean_seconds": round(sum(gaps) / len(gaps), 6) if gaps else None,
        "itl_max_seconds": round(max(gaps), 6) if gaps else None,
    }


class JsonFormatter(logging.Formatter):
    """Every record as one JSON line; a record's `request` dict is merged at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "request", None)
        # The human message duplicates the fields in JSON: keep it short there.
        out["msg"] = "request finished" if isinstance(fields, dict) else record.getMessage()
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(fmt: str = "text", level: str | int = "INFO", stream=None) -> logging.Handler:
    """Replace the root logger's handlers with one writing `fmt` ("text" | "json") to stream."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log_format: expected one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
