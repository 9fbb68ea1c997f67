"""The web console of two real daemons over real TLS: login, the pair page, a switchover
with its confirmation, and bad input (unauthenticated, wrong role, forged CSRF token,
cross-origin, oversized or malformed requests) refused and written to the events log."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from .pair import PASSWORDS, Pair, run_pair


def _refusals(p: Pair) -> list[str]:
    return [str(e.get("reason")) for e in p.events() if e.get("event") == "console_refused"]


def test_login_pair_page_and_switchover(tmp_path: Path) -> None:
    def scenario(p: Pair) -> None:
        assert p.request("GET", "/").headers["location"] == "/login"
        login = p.request("GET", "/login")
        assert login.status == 200 and "Log in" in login.body
        assert "default-src 'none'" in login.headers["content-security-policy"]
        cookie = p.login("ops")
        # The checker's first probe on the primary comes a moment after the promotion.
        body = _page_when(p, cookie, "<td>alive: ok</td>")
        # Both nodes, node2 from its own console (its checker: not run on a secondary,
        # which heartbeats do not carry), and the VIP holder.
        assert "VIP 10.77.0.100/24 on <span class=vip-holder>node1</span>" in body
        assert "<td>alive: ok</td>" in body and "<td>alive: not run</td>" in body
        assert ">PRIM<" in body and ">SECOND<" in body
        assert "console_login" in body  # the last events
        assert '<meta http-equiv="refresh" content="5">' in body
        csrf = p.csrf(cookie)
        form = {"csrf": csrf, "module": "flightdata", "action": "swap"}
        confirm = p.request("POST", "/action", cookie=cookie, form=form)
        assert confirm.status == 200 and "Planned switchover of flightdata" in confirm.body
        assert "Pre-check: nothing stands in the way now." in confirm.body
        assert p.holders == {"flightdata": "node1"}  # nothing done before the confirmation
        done = p.request("POST", "/confirm", cookie=cookie, form=form)
        assert done.status == 200 and "switched over to node2" in done.body, done.body
        deadline = time.monotonic() + 10
        while p.holders.get("flightdata") != "node2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.holders == {"flightdata": "node2"}
        # The same page on node2 now says node2 holds the VIP.
        cookie2 = p.login("ops", node="node2")
        page2 = p.request("GET", "/", node="node2", cookie=cookie2).body
        assert "<span class=vip-holder>node2</span>" in page2
        # Refused by the daemon's own pre-check: resync runs on the primary (now node2).
        form = {"csrf": csrf, "module": "flightdata", "action": "resync"}
        ask = p.request("POST", "/action", cookie=cookie, form=form).body
        assert "would be refused now: flightdata has no replicated_dirs" in ask
        refused = p.request("POST", "/confirm", cookie=cookie, form=form)
        assert refused.status == 409
        assert "flightdata has no replicated_dirs" in refused.body
        logout = p.request("POST", "/logout", cookie=cookie, form={"csrf": csrf})
        assert logout.status == 303
        assert p.request("GET", "/", cookie=cookie).headers["location"] == "/login"

    p = run_pair(tmp_path, scenario)
    actions = [e for e in p.events() if e.get("event") == "console_action"]
    assert [(e["action"], e["phase"], e["user"]) for e in actions] == [
        ("swap", "asked", "ops"),
        ("swap", "done", "ops"),
        ("resync", "asked", "ops"),
        ("resync", "refused", "ops"),
    ]
    assert actions[1]["remote"] == "127.0.0.1" and actions[1]["via"] == "password"
    logins = [e for e in p.events() if e.get("event") == "console_login"]
    assert logins[0]["user"] == "ops" and logins[0]["via"] == "password"


def _page_when(p: Pair, cookie: str, text: str, node: str = "node1") -> str:
    deadline = time.monotonic() + 10
    while True:
        page = p.request("GET", "/", node=node, cookie=cookie)
        assert page.status == 200
        if text in page.body or time.monotonic() > deadline:
            return page.body
        time.sleep(0.1)


def test_bad_input_refused_and_logged(tmp_path: Path) -> None:
    seen: dict[str, int] = {}

    def scenario(p: Pair) -> None:
        form = {"csrf": "x", "module": "flightdata", "action": "swap"}
        seen["anon"] = p.request("POST", "/confirm", form=form).status
        viewer = p.login("viewer")
        vform = {**form, "csrf": p.csrf(viewer)}
        r = p.request("POST", "/confirm", cookie=viewer, form=vform)
        seen["viewer"] = r.status
        assert "role viewer may not act" in r.body
        assert "Switch over" not in p.request("GET", "/", cookie=viewer).body  # no buttons
        ops = p.login("ops")
        seen["forged"] = p.request("POST", "/confirm", cookie=ops, form=form).status
        seen["no_csrf"] = p.request(
            "POST", "/confirm", cookie=ops, form={"module": "flightdata", "action": "swap"}
        ).status
        good = {**form, "csrf": p.csrf(ops)}
        seen["cross_origin"] = p.request(
            "POST", "/confirm", cookie=ops, form=good, headers={"Origin": "https://evil.example"}
        ).status
        seen["bad_action"] = p.request(
            "POST", "/action", cookie=ops, form={**good, "action": "rm -rf"}
        ).status
        seen["bad_module"] = p.request(
            "POST", "/action", cookie=ops, form={**good, "module": "nope"}
        ).status
        seen["oversized"] = p.request(
            "POST", "/confirm", cookie=ops, raw_body=b"a=" + b"x" * 100_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ).status  # fmt: skip
        seen["chunked"] = _raw(p, b"POST /login HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")  # fmt: skip
        seen["huge_head"] = _raw(p, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        seen["garbage"] = _raw(p, b"\x16\x03 nonsense\r\n\r\n")
        seen["not_found"] = p.request("GET", "/etc/passwd", cookie=ops).status
        for _ in range(5):
            seen["bad_password"] = p.request(
                "POST", "/login", form={"user": "ops", "password": "guess"}
            ).status
        seen["throttled"] = p.request(
            "POST", "/login", form={"user": "ops", "password": PASSWORDS["ops"]}
        ).status
        assert p.holders == {"flightdata": "node1"}  # none of it did anything

    p = run_pair(tmp_path, scenario)
    assert seen == {
        "anon": 401,
        "viewer": 403,
        "forged": 403,
        "no_csrf": 403,
        "cross_origin": 403,
        "bad_action": 400,
        "bad_module": 400,
        "oversized": 413,
        "chunked": 411,
        "huge_head": 431,
        "garbage": 400,
        "not_found": 404,
        "bad_password": 401,
        "throttled": 429,
    }
    reasons = "\n".join(_refusals(p))
    for expected in (
        "/confirm: not logged in: 127.0.0.1",
        "swap flightdata: role viewer may not act: viewer from 127.0.0.1",
        "/confirm: bad or missing CSRF token: ops from 127.0.0.1",
        "cross-origin request from 'https://evil.example': ops from 127.0.0.1",
        "action 'rm -rf' not allowed on flightdata",
        "body of 100002 bytes (limit 8192): 127.0.0.1",
        "chunked bodies are not accepted",
        "request head too large",
        "login: wrong user or password for 'ops': 127.0.0.1",
        "login: 5 failures in 60 s, wait",
    ):
        assert expected in reasons, f"{expected!r} not logged in:\n{reasons}"
    assert not [e for e in p.events() if e.get("event") == "console_action"]


def _raw(p: Pair, data: bytes) -> int:
    """Send bytes as they are over TLS; the status code of the answer."""
    ctx = ssl.create_default_context(cafile=str(p.ca))
    ctx.check_hostname = False
    host, _, port = p.urls["node1"].rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=15) as s,
        ctx.wrap_socket(s) as t,
    ):
        t.sendall(data)
        reply = b""
        while b"\r\n" not in reply:
            chunk = t.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ")[1])


def test_client_certificate_login_and_peer_status(tmp_path: Path) -> None:
    def scenario(p: Pair) -> None:
        r = p.request("GET", "/", cert="alice")
        assert r.status == 303 and r.headers["location"] == "/"
        cookie = r.cookies[0].split(";")[0]
        assert "Secure" in r.cookies[0] and "HttpOnly" in r.cookies[0]
        assert "SameSite=Strict" in r.cookies[0]
        page = p.request("GET", "/", cert="alice", cookie=cookie)
        assert page.status == 200 and "alice (operator)" in page.body
        # The session is bound to the certificate: the cookie alone is not enough.
        assert p.request("GET", "/", cookie=cookie).headers["location"] == "/login"
        # A certificate of the site CA that is no console user logs nobody in.
        assert p.request("GET", "/", cert="bob").headers["location"] == "/login"
        # A node's certificate reads the status (the peer's page uses it), nothing else.
        st = p.request("GET", "/status.json", cert="node2")
        assert st.status == 200 and '"node": "node1"' in st.body
        assert p.request("GET", "/", cert="node2").headers["location"] == "/login"
        assert p.request("GET", "/status.json").status == 401

    p = run_pair(tmp_path, scenario)
    logins = [e for e in p.events() if e.get("event") == "console_login"]
    assert [(e["user"], e["via"]) for e in logins] == [("alice", "certificate")]


def test_refusal_flood_bounded_in_log_and_metrics(tmp_path: Path) -> None:
    """Many distinct bad requests: the events log and the metric labels stay bounded."""

    def scenario(p: Pair) -> None:
        for i in range(FLOOD):
            assert p.request("POST", f"/nowhere-{i}", form={"a": "b"}).status == 401

    p = run_pair(tmp_path, scenario)
    refused = [e for e in p.events() if e.get("event") == "console_refused"]
    assert 1 <= len(refused) <= MAX_REFUSAL_EVENTS, len(refused)
    outcomes = {
        s.labels["outcome"]
        for fam in p.d1.metrics.registry.collect()
        if fam.name == "hapair_console_requests"
        for s in fam.samples
    }
    assert outcomes and outcomes <= {"ok", "400", "401", "403", "404", "408", "411", "413",
                                     "415", "429", "431", "tls", "busy"}, outcomes  # fmt: skip


FLOOD = 150
MAX_REFUSAL_EVENTS = 40
