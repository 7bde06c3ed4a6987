"""One status vocabulary for both front doors.

Everything below the front doors (request conversion, adapter resolution, submission, the adapter
calls, auth, limits) fails with `ApiError(code, message)`, where `code` is a grpc.StatusCode and
`message` starts with the offending request field. The gRPC servicers abort with the code as it
is; the OpenAI-compatible HTTP front answers with `HTTP_STATUS[code]` and an OpenAI error object
whose `type` is `OPENAI_ERROR_TYPE[code]` and whose `param` is the field. The README's table is
generated from these two dicts' contents (tests/test_http_api.py checks it stays in step).
"""

from __future__ import annotations

import grpc

Code = grpc.StatusCode


class ApiError(Exception):
    """A refusal with its status. `message` reads "field: what is wrong" where a field is at fault."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def field(self) -> str | None:
        """The request field the message starts with ("sampling.temperature", "model"), if any."""
        head, sep, _ = self.message.partition(": ")
        if not sep or " " in head or not head:
            return None
        return head


# gRPC status -> HTTP status of the OpenAI-compatible front. 499 is nginx's "client closed
# request": the client went away, nobody reads the answer, but logs and tests can tell it.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INTERNAL: 500,
    Code.DATA_LOSS: 500,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}

# The `type` of OpenAI's error object, by HTTP status (what the official client's exception
# classes are chosen by is the HTTP status; `type` is for people and logs).
_TYPE_BY_HTTP = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 499: "cancelled_error", 501: "not_implemented_error",
                 503: "service_unavailable_error", 504: "timeout_error"}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def openai_error_type(status: int) -> str:
    return _TYPE_BY_HTTP.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error_body(status: int, message: str, param: str | None = None,
                      code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": openai_error_type(status), "param": param,
                      "code": code}}
