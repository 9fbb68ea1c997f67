"""A small, strict HTTP/1.1 server side: one request per connection, bounded everywhere.

Only what the console needs: GET and POST, a Content-Length body of at most MAX_BODY
bytes (no chunked bodies), headers of at most MAX_HEAD bytes, URL-encoded forms. Anything
else is refused with a status that says why, before the body is read.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import trio

MAX_HEAD = 16 * 1024
MAX_HEADERS = 64
MAX_BODY = 8 * 1024
READ_TIMEOUT_S = 10.0

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TARGET = re.compile(r"^/[\x21-\x7e]*$")


class HttpError(Exception):
    """A request refused before it reached the application (status and the why)."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names, one value each
    body: bytes = b""
    form: dict[str, str] = field(default_factory=dict)

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
        return None


async def read_request(stream: trio.abc.ReceiveStream) -> Request:
    """Read and parse one request; raises HttpError (or trio.TooSlowError on a slow one)."""
    buf = bytearray()
    with trio.fail_after(READ_TIMEOUT_S):
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                raise HttpError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
                )
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise HttpError(HTTPStatus.BAD_REQUEST, "connection closed mid-request")
            buf += chunk
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        req = parse_head(head)
        length = _content_length(req)
        if length > MAX_BODY:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes (limit {MAX_BODY})"
            )
        body = bytearray(rest)
        while len(body) < length:
            chunk = await stream.receive_some(length - len(body))
            if not chunk:
                raise HttpError(HTTPStatus.BAD_REQUEST, "body shorter than Content-Length")
            body += chunk
    if len(body) > length:
        raise HttpError(HTTPStatus.BAD_REQUEST, "bytes after the body (one request per connection)")
    req.body = bytes(body)
    if req.method == "POST":
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected a URL-encoded form")
        req.form = _form(req.body)
    return req


def parse_head(head: bytes) -> Request:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "non-ASCII request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, _ = parts
    if method not in ("GET", "POST"):
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {method[:16]!r} not allowed")
    if not _TARGET.match(target) or len(target) > 2048:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")
    headers: dict[str, str] = {}
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):  # also refuses obsolete line folding
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
        key = name.lower()
        if key in headers and key in ("content-length", "host", "cookie", "origin"):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"repeated {name} header")
        headers[key] = value.strip(" \t")
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query, max_num_fields=16).items()}
    return Request(method, url.path, query, headers)


def _content_length(req: Request) -> int:
    if "transfer-encoding" in req.headers:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted")
    raw = req.headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    return int(raw)


def _form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=16, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed form") from None
    if any(len(v) != 1 for v in fields.values()):
        raise HttpError(HTTPStatus.BAD_REQUEST, "a form field given twice")
    return {k: v[0] for k, v in fields.items()}


SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it Chromium sends "Origin: null" on form posts (refused here)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass
class Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status.value} {self.status.phrase}"]
        hdrs = {
            **SECURITY_HEADERS,
            "Content-Type": self.content_type,
            "Content-Length": str(len(self.body)),
            "Connection": "close",
            **self.headers,
        }
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        lines += [f"Set-Cookie: {c}" for c in self.cookies]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body


def redirect(location: str) -> Response:
    return Response(HTTPStatus.SEE_OTHER, headers={"Location": location})


async def send(stream: trio.abc.SendStream, resp: Response) -> None:
    with (
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        trio.move_on_after(READ_TIMEOUT_S),
    ):
        await stream.send_all(resp.encode())
