"""The web console: HTTPS on the management address, inside the node daemon's trio loop.

Reads go through the daemon's own status and events; actions through ``NodeDaemon.handle``,
the code path of the control API and ``hactl`` (same pre-checks, same refusals). Every
action is written to the events log with who asked, from where, and how it ended; every
refused request is logged too (rate-limited per reason, see events.RefusalLog).

TLS: the node's certificate and key and the site CA of cluster.yml. A client certificate
signed by the site CA is optional: one whose CN is a console user with ``certificate:
true`` logs that user in; one whose CN is a node of the cluster may read /status.json
(how each node's page shows its peer's own view).

Long because: one request path (TLS, login, CSRF, role check, action, audit, refusal
budget) kept in one place so every refusal is visibly on it; the pages and the HTTP
parsing are already apart (pages.py, http.py, auth.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

from ha_runtime import api
from ha_runtime.config import ConsoleSpec, TlsSpec
from ha_runtime.console import pages
from ha_runtime.console.auth import Authenticator, Role, Session, User, csrf_ok
from ha_runtime.console.http import HttpError, Request, Response, read_request, redirect, send
from ha_runtime.events import NODE_WIDE, EventLog
from ha_runtime.metrics import Metrics
from ha_runtime.node_view import OperatedNode


class ConsoleNode(OperatedNode, Protocol):
    """The node as the console sees it: OperatedNode, and the metrics it counts requests in."""

    @property
    def metrics(self) -> Metrics: ...


log = logging.getLogger(__name__)

COOKIE = "hapair_console"
MAX_CONNECTIONS = 32
HANDSHAKE_TIMEOUT_S = 10.0
PEER_TIMEOUT_S = 2.0
MAX_PEER_REPLY = 1 << 20
LOGIN_FAILURES = 5  # per remote address within LOGIN_WINDOW_S, then refused for that long
LOGIN_WINDOW_S = 60.0
EVENTS_SHOWN = 15
CRLF = b"\r\n"


def server_context(tls: TlsSpec) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # browsers with a password; operators' certs optional
    return ctx


def client_context(tls: TlsSpec) -> ssl.SSLContext:
    """To the peer's console: our node certificate, its certificate checked against the CA
    (its name is checked after the handshake: console addresses need not be in the SAN)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def common_name(cert: Mapping[str, Any] | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass
class Client:
    remote: str
    cert_cn: str | None
    cert_fingerprint: str | None

    def who(self, session: Session | None = None) -> str:
        if session is not None:
            return f"{session.user} from {self.remote}"
        return f"{self.remote}" + (f" (certificate {self.cert_cn})" if self.cert_cn else "")


class Refused(Exception):
    def __init__(self, status: HTTPStatus, reason: str, page: bytes | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.page = status, reason, page


class ConsoleServer:
    def __init__(self, daemon: ConsoleNode, spec: ConsoleSpec) -> None:
        self.daemon = daemon
        self.spec = spec
        self.node = daemon.cluster.node
        self.node_names = {n.name for n in daemon.cluster.nodes}
        users = tuple(
            User(u.name, _role(u.role), u.password_hash, u.certificate) for u in spec.users
        )
        self.auth = Authenticator(users, spec.session_timeout_s)
        self.refusals = RefusalBudget(daemon.events)
        self._tls = daemon.cluster.tls
        self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._hashing = trio.CapacityLimiter(2)
        self._failures: dict[str, list[float]] = {}
        self.port: int | None = None

    # ----------------------------------------------------------------- serving

    async def serve(
        self, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        host, _, port = self.spec.address.rpartition(":")
        try:
            ctx = server_context(self._tls)
            listeners = await trio.open_tcp_listeners(int(port), host=host)
        except (OSError, ssl.SSLError) as exc:
            # The console must never take the HA daemon down with it.
            log.error("console: cannot serve on %s: %s", self.spec.address, exc)  # noqa: TRY400
            self.daemon.events.append(
                NODE_WIDE, "console_error", node=self.node, reason=f"cannot serve: {exc}"
            )
            task_status.started(None)
            return
        self._ctx = ctx
        self.port = int(listeners[0].socket.getsockname()[1])
        log.info("console on https://%s:%d/", host, self.port)
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        remote = str(tcp.socket.getpeername()[0])
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await tcp.aclose()
            self._count("busy")
            return
        try:
            stream = trio.SSLStream(tcp, self._ctx, server_side=True, https_compatible=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError):
                self._count("tls")
                await tcp.aclose()
                return
            der = stream.getpeercert(binary_form=True)
            client = Client(
                remote,
                common_name(stream.getpeercert()) if der else None,
                hashlib.sha256(der).hexdigest() if der else None,
            )
            await self._exchange(stream, client)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                with trio.move_on_after(2):
                    await stream.aclose()
        finally:
            self._limiter.release()
            await tcp.aclose()

    async def _exchange(self, stream: trio.SSLStream[trio.SocketStream], client: Client) -> None:
        try:
            req = await read_request(stream)
            resp = await self.handle(req, client)
        except HttpError as exc:
            resp = self._refuse(client, None, exc.status, exc.reason)
            resp.headers.setdefault("Content-Security-Policy", pages.CSP)
            await send(stream, resp)
            # A client still sending a refused body would get a reset instead of the
            # answer if we closed now: read and drop what it sends, within bounds.
            await _drain(stream)
            return
        except trio.TooSlowError:
            resp = self._refuse(client, None, HTTPStatus.REQUEST_TIMEOUT, "request too slow")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # the console must outlive a bug in one page
            log.exception("console: request failed")
            resp = Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error", "text/plain")
        resp.headers.setdefault("Content-Security-Policy", pages.CSP)
        await send(stream, resp)

    def _count(self, outcome: str) -> None:
        self.daemon.metrics.console_requests.labels(outcome).inc()

    def _refuse(
        self,
        client: Client,
        session: Session | None,
        status: HTTPStatus,
        reason: str,
        page: bytes | None = None,
    ) -> Response:
        self._count(str(status.value))  # a fixed set of labels, whatever the input
        self.refusals(f"{reason}: {client.who(session)}", status.value, client.remote)
        log.warning("console: refused %s: %s", client.who(session), reason)
        body = page or pages.message_page(
            self.node, f"{status.value} {status.phrase}", reason, False
        )
        return Response(status, body)

    # ----------------------------------------------------------------- routing

    async def handle(self, req: Request, client: Client) -> Response:
        try:
            return await self._route(req, client)
        except Refused as r:
            session = self._session(req, client)
            return self._refuse(client, session, r.status, r.reason, r.page)

    async def _route(self, req: Request, client: Client) -> Response:
        key = (req.method, req.path)
        if key == ("GET", "/login"):
            if self._session(req, client):
                return redirect("/")
            if (cert := self._certificate_login(client)) is not None:
                return _logged_in(cert)
            return Response(HTTPStatus.OK, pages.login_page(self.node))
        if key == ("POST", "/login"):
            self._check_origin(req)
            return await self._password_login(req, client)
        if key == ("GET", "/status.json") and self._is_peer_node(client):
            self._count("ok")
            return _json(await self._status())
        session = self._session(req, client)
        if session is None and req.method == "GET" and req.path == "/":
            if (cert := self._certificate_login(client)) is not None:
                return _logged_in(cert)
            return redirect("/login")
        if session is None:
            raise Refused(HTTPStatus.UNAUTHORIZED, f"{req.method} {req.path}: not logged in")
        if req.method == "POST":
            self._check_origin(req)
            if not csrf_ok(session, req.form.get("csrf")):
                raise Refused(HTTPStatus.FORBIDDEN, f"{req.path}: bad or missing CSRF token")
        self._count("ok")
        if key == ("GET", "/"):
            return Response(HTTPStatus.OK, await self._pair_page(session))
        if key == ("GET", "/status.json"):
            return _json(await self._status())
        if key == ("POST", "/logout"):
            self.auth.close(session.token)
            self.daemon.events.append(
                NODE_WIDE, "console_logout", node=self.node, user=session.user, remote=client.remote
            )
            resp = redirect("/login")
            resp.cookies.append(f"{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
            return resp
        if req.method == "POST" and req.path in ("/action", "/confirm"):
            module, action = self._check_action(req, session)
            if req.path == "/action":
                return Response(
                    HTTPStatus.OK,
                    pages.confirm_page(
                        self.node, module, action, user=session.user, role=session.role,
                        csrf=session.csrf, precheck=self._precheck(module, action),
                    ),
                )  # fmt: skip
            return await self._run_action(module, action, session, client)
        raise Refused(HTTPStatus.NOT_FOUND, f"{req.method} {req.path}: no such page")

    # ----------------------------------------------------------------- authentication

    def _session(self, req: Request, client: Client) -> Session | None:
        return self.auth.session(req.cookie(COOKIE), client.cert_fingerprint)

    def _is_peer_node(self, client: Client) -> bool:
        return client.cert_cn in self.node_names and client.cert_fingerprint is not None

    def _certificate_login(self, client: Client) -> Session | None:
        if client.cert_cn in self.node_names:
            return None  # a node's certificate reads the status, never logs in
        user = self.auth.user_for_certificate(client.cert_cn)
        if user is None or client.cert_fingerprint is None:
            return None
        s = self.auth.open(user, "certificate", client.cert_fingerprint)
        self.daemon.events.append(
            NODE_WIDE, "console_login", node=self.node, user=user.name, role=user.role,
            via="certificate", remote=client.remote,
        )  # fmt: skip
        return s

    async def _password_login(self, req: Request, client: Client) -> Response:
        now = time.monotonic()
        recent = [t for t in self._failures.get(client.remote, []) if now - t < LOGIN_WINDOW_S]
        self._failures[client.remote] = recent
        if len(recent) >= LOGIN_FAILURES:
            raise Refused(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"login: {len(recent)} failures in {LOGIN_WINDOW_S:g} s, wait",
                pages.login_page(self.node, "Too many failed logins: wait a minute."),
            )
        name = req.form.get("user", "")[:32]
        password = req.form.get("password", "")[:256]
        # scrypt takes 32 MiB and ~0.1 s: two at a time, so a login flood cannot exhaust
        # the node's memory (the daemon's thread pool would run 40 at once).
        user = await trio.to_thread.run_sync(
            self.auth.check_password, name, password, limiter=self._hashing
        )
        if user is None:
            recent.append(now)
            if len(self._failures) > 1024:  # bounded: forget the oldest remotes
                self._failures.pop(next(iter(self._failures)))
            raise Refused(
                HTTPStatus.UNAUTHORIZED,
                f"login: wrong user or password for {name!r}",
                pages.login_page(self.node, "Wrong user or password."),
            )
        s = self.auth.open(user, "password")
        self.daemon.events.append(
            NODE_WIDE, "console_login", node=self.node, user=user.name, role=user.role,
            via="password", remote=client.remote,
        )  # fmt: skip
        return _logged_in(s)

    def _check_origin(self, req: Request) -> None:
        """A browser's cross-site POST names its origin: it must be this very site."""
        origin = req.headers.get("origin")
        if origin is None:
            return  # not a browser, or an old one: the CSRF token decides
        host = req.headers.get("host", "")
        parts = urlsplit(origin)
        if parts.scheme != "https" or parts.netloc != host:
            raise Refused(
                HTTPStatus.FORBIDDEN, f"{req.path}: cross-origin request from {origin[:80]!r}"
            )

    # ----------------------------------------------------------------- actions

    def _check_action(self, req: Request, session: Session) -> tuple[str, str]:
        module, action = req.form.get("module", ""), req.form.get("action", "")
        if session.role != "operator":
            raise Refused(
                HTTPStatus.FORBIDDEN,
                f"{action or '?'} {module or '?'}: role {session.role} may not act",
            )
        kind = self._module_type(module)
        if kind is None:
            raise Refused(HTTPStatus.BAD_REQUEST, f"unknown module {module[:40]!r}")
        allowed = ("drain", "undrain", "stop", "start") if kind == "farm" else (
            "swap", "stop", "start", "resync",
        )  # fmt: skip
        if action not in allowed:
            raise Refused(HTTPStatus.BAD_REQUEST, f"action {action[:20]!r} not allowed on {module}")
        return module, action

    def _precheck(self, module: str, action: str) -> str | None:
        """The daemon's own refusal, evaluated without acting (the confirmation page says
        it before anyone confirms; the action itself checks again)."""
        mod = self.daemon.modules.get(module)
        return mod.refusal(action) if mod is not None else None

    def _module_type(self, module: str) -> str | None:
        mod = self.daemon.modules.get(module)
        return mod.KIND if mod is not None else None

    async def _run_action(
        self, module: str, action: str, session: Session, client: Client
    ) -> Response:
        who = {"user": session.user, "role": session.role, "via": session.via,
               "remote": client.remote}  # fmt: skip
        self.daemon.events.append(
            module, "console_action", node=self.node, action=action, **who, phase="asked"
        )
        try:
            result = await self.daemon.handle({"command": action, "module": module})
            ok, message = True, str(result.get("message", "done"))
        except api.ApiError as exc:
            ok, message = False, str(exc)
        self.daemon.events.append(
            module, "console_action", node=self.node, action=action, **who,
            phase="done" if ok else "refused", message=message,
        )  # fmt: skip
        title = f"{pages.ACTIONS[action]} {module}: " + ("done" if ok else "refused")
        return Response(
            HTTPStatus.OK if ok else HTTPStatus.CONFLICT,
            pages.message_page(
                self.node, title, message, ok, user=session.user, role=session.role,
                csrf=session.csrf,
            ),
        )  # fmt: skip

    # ----------------------------------------------------------------- views

    async def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.daemon.handle({"command": "status"})
        return status

    async def _pair_page(self, session: Session) -> bytes:
        local = await self._status()
        peers, errors = await self._peer_statuses()
        return pages.pair_page(
            node=self.node,
            local=local,
            peers=peers,
            peer_errors=errors,
            events=self.daemon.events.read(None, EVENTS_SHOWN),
            user=session.user,
            role=session.role,
            csrf=session.csrf,
        )

    async def _peer_statuses(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Every other node's own status, asked of its console at once (2 s at most)."""
        peers: dict[str, dict[str, Any]] = {}
        errors: list[str] = []

        async def one(name: str, address: str) -> None:
            try:
                with trio.fail_after(PEER_TIMEOUT_S):
                    peers[name] = await self._fetch_peer(name, address)
            except (OSError, ssl.SSLError, trio.TooSlowError, trio.BrokenResourceError,
                    ValueError, TypeError) as exc:  # fmt: skip
                errors.append(f"{name} at {address}: {exc or type(exc).__name__}")

        async with trio.open_nursery() as n:
            for name, address in sorted(self.spec.peers.items()):
                n.start_soon(one, name, address)
        return peers, sorted(errors)

    async def _fetch_peer(self, name: str, address: str) -> dict[str, Any]:
        host, _, port = address.rpartition(":")
        tcp = await trio.open_tcp_stream(host, int(port))
        stream = trio.SSLStream(tcp, client_context(self._tls), server_hostname=None,
                                https_compatible=True)  # fmt: skip
        async with stream:
            await stream.do_handshake()
            if common_name(stream.getpeercert()) != name:
                raise ValueError(f"certificate is not {name}'s")
            await stream.send_all(
                b"GET /status.json HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                % address.encode()
            )
            buf = bytearray()
            while len(buf) <= MAX_PEER_REPLY:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
        head, _, body = bytes(buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise ValueError(f"answered {head.partition(CRLF)[0][:60]!r}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise TypeError("answered something that is not a status")
        return data


DRAIN_BYTES = 1 << 20
DRAIN_S = 2.0


async def _drain(stream: trio.SSLStream[trio.SocketStream]) -> None:
    seen = 0
    with (
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        trio.move_on_after(DRAIN_S),
    ):
        while seen < DRAIN_BYTES:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            seen += len(chunk)


class RefusalBudget:
    """Refused requests in the events log, at most ``per_minute`` a minute whatever they
    are (a flood of distinct bad requests must not fill the disk); those left out are
    counted in the next one logged."""

    def __init__(
        self, events: EventLog, per_minute: int = 30, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.events = events
        self.per_minute = per_minute
        self.clock = clock
        self._logged: deque[float] = deque()
        self.suppressed = 0

    def __call__(self, reason: str, status: int, remote: str) -> None:
        now = self.clock()
        while self._logged and now - self._logged[0] >= 60:
            self._logged.popleft()
        if len(self._logged) >= self.per_minute:
            self.suppressed += 1
            return
        self._logged.append(now)
        self.events.append(
            NODE_WIDE, "console_refused", reason=reason[:300], status=status, remote=remote,
            not_logged_before=self.suppressed,
        )  # fmt: skip
        self.suppressed = 0


def _role(text: str) -> Role:
    return "operator" if text == "operator" else "viewer"


def _logged_in(session: Session) -> Response:
    resp = redirect("/")
    resp.cookies.append(f"{COOKIE}={session.token}; Path=/; Secure; HttpOnly; SameSite=Strict")
    return resp


def _json(data: Any) -> Response:
    return Response(HTTPStatus.OK, json.dumps(data, default=str).encode(), "application/json")
