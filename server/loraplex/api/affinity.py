"""The `x-adapter-id` header: the adapter a request asks for, readable by a proxy.

A proxy in front of several replicas cannot read a protobuf (or JSON) body, so clients repeat the
request's adapter in gRPC metadata / an HTTP header named `x-adapter-id`, and the proxy hashes on
it (deploy/nginx, deploy/envoy): every request for one adapter reaches the replica that already
holds it. loraplex.client sets it by itself.

The server checks that the header tells the truth, since a header that disagrees with the body
would silently route requests to a replica that has to load the adapter again:

    header absent              no check (clients that know nothing of proxies keep working)
    header "sql"               the request must ask for adapter "sql"
    header "" (present, empty) the request must ask for the base model

For the base model, clients should rather leave the header out: the proxies spread requests
without the header evenly, while an empty value is hashed like any other by some proxies (Envoy).
A mismatch is INVALID_ARGUMENT (HTTP 400) naming the header.
"""

from __future__ import annotations

from typing import Iterable

from loraplex.api.status import ApiError, Code

HEADER = "x-adapter-id"


def header_values(pairs: Iterable[tuple[str, str]] | None) -> list[str]:
    """The values of HEADER among (key, value) metadata pairs (gRPC keys are lower-case)."""
    return [value for key, value in pairs or () if key.lower() == HEADER]


def check_adapter_header(values: list[str], adapter_id: str) -> None:
    """Raise INVALID_ARGUMENT unless the header (all its `values`; none = absent) names the
    request's adapter (`adapter_id`, "" for the base model)."""
    if not values:
        return
    if len(values) > 1:
        raise ApiError(Code.INVALID_ARGUMENT, f"{HEADER}: sent {len(values)} times; send it once")
    (value,) = values
    if value == adapter_id:
        return
    asked = f"adapter {adapter_id!r}" if adapter_id else "the base model"
    hint = "leave the header out (or empty) for the base model" if not adapter_id else \
        "it must repeat the request's adapter"
    raise ApiError(Code.INVALID_ARGUMENT, f"{HEADER}: {value!r} disagrees with the request, which asks for "
                                          f"{asked}; {hint}")
