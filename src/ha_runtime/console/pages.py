"""Server-rendered HTML of the console: no script, no external asset, every value escaped.

The style sheet is inline and allowed by its hash in the Content-Security-Policy; nothing
else may load or run. The pair page refreshes itself with a meta refresh; progress is a
<progress> element (style attributes would need the policy loosened).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from ha_runtime.advice import module_advice

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#111}
header{background:#1d2733;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header h1{font-size:16px;margin:0;flex:1}
header form{margin:0}
main{padding:12px 16px;max-width:1200px}
section{background:#fff;border:1px solid #ccd;border-radius:6px;margin:0 0 12px;padding:8px 12px}
h2{font-size:15px;margin:4px 0 8px}
h3{font-size:14px;margin:8px 0 4px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #e3e5e8;vertical-align:top}
.st{font-weight:700;padding:1px 6px;border-radius:4px}
.ok{background:#cdeccd}.warn{background:#ffe7a8}.bad{background:#f8b9b9;color:#600}
.muted{color:#666}
progress{width:220px;height:14px;vertical-align:middle}
.actions form{display:inline-block;margin:2px 4px 2px 0}
button{font:inherit;padding:3px 10px;cursor:pointer}
button.danger{background:#b3261e;color:#fff;border:1px solid #7a1a14}
.msg{padding:8px 12px;border-radius:6px;margin:0 0 12px}
.login{max-width:340px;margin:60px auto}
.login input{width:100%;box-sizing:border-box;margin:2px 0 10px;padding:4px}
code{background:#eef;padding:0 3px}
#events td:first-child{white-space:nowrap}
"""

CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
CSP = (
    "default-src 'none'; "
    f"style-src 'sha256-{CSS_HASH}'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

PRIMARY = ("PRIM", "ALONE", "UP")
ACTIONS: dict[str, str] = {
    "swap": "Switch over",
    "stop": "Stop here",
    "start": "Start here",
    "resync": "Start a resync",
    "drain": "Drain here",
    "undrain": "Undrain here",
}


def describe_action(action: str, module: str, node: str) -> str:
    """What the confirmation page says the action will do."""
    return {
        "swap": f"Planned switchover of {module}: the primary stops the application and releases"
        " the VIP, the other node takes both over. Refused if the other node is not ready"
        " (not started, data not in sync).",
        "stop": f"Stop {module} on {node}. If {node} is primary, the other node takes over when"
        f" its data is in sync; {module} stays stopped on {node}, across reboots, until"
        " started again.",
        "start": f"Start {module} on {node}: it rejoins the pair (as secondary if the other node"
        " serves).",
        "resync": f"Start an incremental resync of {module} from the primary to the other node."
        " Runs on the primary only.",
        "drain": f"Drain {module} on {node}: it stops taking new connections; the others serve.",
        "undrain": f"Undrain {module} on {node}: it takes connections again.",
    }[action]


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, *, refresh_s: int | None = None, header: str = "") -> bytes:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width">'
        f"{refresh}<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body>{header}<main>{body}</main></body></html>"
    ).encode()


def _header(node: str, user: str | None, role: str | None, csrf: str | None) -> str:
    who = ""
    if user is not None and csrf is not None:
        who = (
            f"<span>{_e(user)} ({_e(role)})</span>"
            '<form method=post action="/logout">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            "<button>Log out</button></form>"
        )
    return f"<header><h1>hapair console: {_e(node)}</h1>{who}</header>"


def login_page(node: str, message: str | None = None) -> bytes:
    msg = f'<div class="msg bad">{_e(message)}</div>' if message else ""
    body = (
        '<section class="login"><h2>Log in</h2>'
        f"{msg}"
        '<form method=post action="/login">'
        "<label>User<input name=user autocomplete=username required maxlength=32></label>"
        "<label>Password<input name=password type=password autocomplete=current-password"
        " required maxlength=256></label>"
        "<button>Log in</button></form>"
        '<p class="muted">Or present a client certificate of the site CA.</p></section>'
    )
    return page(f"hapair {node}: log in", body, header=_header(node, None, None, None))


def message_page(node: str, title: str, text: str, ok: bool, *, user: str | None = None,
                 role: str | None = None, csrf: str | None = None) -> bytes:  # fmt: skip
    cls = "ok" if ok else "bad"
    body = (
        f'<div class="msg {cls}" id=result><b>{_e(title)}</b><br>{_e(text)}</div>'
        '<p><a href="/">Back to the pair</a></p>'
    )
    return page(f"hapair {node}: {title}", body, header=_header(node, user, role, csrf))


def confirm_page(
    node: str,
    module: str,
    action: str,
    *,
    user: str,
    role: str,
    csrf: str,
    precheck: str | None = None,
) -> bytes:
    """`precheck`: why the daemon would refuse the action now (None: it would not)."""
    check = (
        f'<p class="msg bad" id=precheck>Pre-check: this would be refused now: {_e(precheck)}</p>'
        if precheck
        else '<p class="msg ok" id=precheck>Pre-check: nothing stands in the way now.</p>'
    )
    body = (
        f"<section><h2>Confirm: {_e(ACTIONS[action])} {_e(module)}</h2>"
        f"<p>{_e(describe_action(action, module, node))}</p>{check}"
        f"<p>Asked by <b>{_e(user)}</b> on <b>{_e(node)}</b>; it is written to the events log."
        "</p>"
        '<form method=post action="/confirm">'
        f'<input type=hidden name=csrf value="{_e(csrf)}">'
        f'<input type=hidden name=module value="{_e(module)}">'
        f'<input type=hidden name=action value="{_e(action)}">'
        f"<button class=danger id=confirm>Yes: {_e(ACTIONS[action])} {_e(module)}</button>"
        "</form>"
        '<p><a href="/" id=cancel>Cancel</a></p></section>'
    )
    return page(f"hapair {node}: confirm {action}", body, header=_header(node, user, role, csrf))


def _state(s: Any) -> str:
    name = str(s or "UNKNOWN")
    cls = "ok" if name in (*PRIMARY, "SECOND") else "bad" if name in ("LOST", "STOP") else "warn"
    return f'<span class="st {cls}">{_e(name)}</span>'


def _size(n: Any) -> str:
    v = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def _duration(s: Any) -> str:
    if s is None:
        return "unknown"
    sec = int(float(s))
    return (
        f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"
    )


def _node_row(node: str, m: Mapping[str, Any] | None, fallback: Mapping[str, Any]) -> str:
    """One node's line for a module; `fallback` is what the other node's heartbeats say."""
    if m is None:
        return (
            f"<tr><td class=node>{_e(node)}</td><td>{_state(fallback.get('state'))}</td>"
            f"<td>{'yes' if fallback.get('state') in PRIMARY else 'no'}</td>"
            f"<td>{_e(fallback.get('generation'))}</td>"
            '<td class="muted" colspan=3>from heartbeats (console of this node not reachable)'
            "</td></tr>"
        )
    checkers = ", ".join(
        f"{c['name']}: {'ok' if c.get('ok') else 'FAILING' if c.get('ok') is False else 'not run'}"
        for c in m.get("checkers") or []
    )
    note = m.get("blocked") or m.get("yielding") or m.get("reason")
    return (
        f"<tr><td class=node>{_e(node)}</td><td>{_state(m.get('state'))}</td>"
        f"<td>{'yes' if m.get('vip_held') else 'no'}</td>"
        f"<td>{_e(m.get('generation'))}</td><td>{_e(m.get('data'))}</td>"
        f"<td>{_e(checkers) or '-'}</td><td>{_e(note)}</td></tr>"
    )


def _replication(rep: Mapping[str, Any] | None, where: str) -> str:
    if not rep:
        return ""
    rows = []
    for d in rep.get("dirs") or []:
        rs = d.get("resync")
        progress = ""
        if rs:
            done, left = int(rs.get("bytes_done") or 0), int(rs.get("bytes_left") or 0)
            pct = 100 * done / (done + left) if done + left else 0
            progress = (
                f'<progress max=100 value="{pct:.0f}">{pct:.0f} %</progress> '
                f"{_e(rs.get('kind'))} resync: {_size(done)} of {_size(done + left)} "
                f"({pct:.0f} %), {_size(rs.get('rate_bps'))}/s, ETA {_duration(rs.get('eta_s'))}"
            )
        rows.append(
            f"<tr><td><code>{_e(d.get('dir'))}</code></td><td>{_state_repl(d.get('state'))}</td>"
            f"<td>{_e(d.get('link'))}</td>"
            f"<td>{_size(d.get('inflight_bytes'))}, "
            f"{max(0, int(d.get('last_seq') or 0) - int(d.get('acked_seq') or 0))} records</td>"
            f"<td>{_size(d.get('dirty_bytes'))} in {_e(d.get('dirty_paths'))} paths</td>"
            f"<td class=progress>{progress or '-'}</td></tr>"
        )
    ok = "in sync" if rep.get("in_sync") else "NOT in sync"
    return (
        f"<h3>Replication ({_e(where)}, {_e(rep.get('role'))}, ack {_e(rep.get('ack'))}): "
        f"{_e(ok)}</h3>"
        "<table><tr><th>directory</th><th>state</th><th>link</th><th>in flight</th>"
        "<th>dirty log</th><th>resync</th></tr>" + "".join(rows) + "</table>"
    )


def _state_repl(s: Any) -> str:
    name = str(s or "stopped")
    cls = "ok" if name == "sync" else "warn" if name == "resyncing" else "bad"
    return f'<span class="st {cls}">{_e(name)}</span>'


def _actions(module: Mapping[str, Any], node: str, csrf: str) -> str:
    names = ["drain", "undrain", "stop", "start"] if module.get("type") == "farm" else [
        "swap", "stop", "start", "resync",
    ]  # fmt: skip
    forms = []
    for a in names:
        forms.append(
            '<form method=post action="/action">'
            f'<input type=hidden name=csrf value="{_e(csrf)}">'
            f'<input type=hidden name=module value="{_e(module.get("module"))}">'
            f'<input type=hidden name=action value="{a}">'
            f'<button id="{_e(a)}-{_e(module.get("module"))}">{_e(ACTIONS[a])}</button></form>'
        )
    return f"<div class=actions>Actions (on {_e(node)}): {''.join(forms)}</div>"


def _fallbacks(m: Mapping[str, Any], others: list[str]) -> dict[str, dict[str, Any]]:
    """What this node's heartbeats say of each other node (mirror: one peer; farm:
    "node2=UP,node3=LOST")."""
    if m.get("type") == "farm":
        states = dict(
            part.split("=", 1) for part in str(m.get("peer_state") or "").split(",") if "=" in part
        )
        return {n: {"state": states.get(n)} for n in others}
    return {
        n: {"state": m.get("peer_state"), "generation": m.get("peer_generation")} for n in others
    }


def pair_page(
    *,
    node: str,
    local: Mapping[str, Any],
    peers: Mapping[str, Mapping[str, Any]],
    peer_errors: Iterable[str],
    events: Iterable[Mapping[str, Any]],
    user: str,
    role: str,
    csrf: str,
    refresh_s: int = 5,
) -> bytes:
    """`peers`: the status each other node's console gave (node -> status)."""
    peer_mods = {
        (n, pm.get("module")): pm for n, st in peers.items() for pm in st.get("modules", [])
    }
    sections = []
    for m in local.get("modules", []):
        name = m.get("module")
        others = [n for n in str(m.get("peer") or "").split(",") if n]
        fallback = _fallbacks(m, others)
        rows = [(node, m, m.get("state"))] + [
            (n, peer_mods.get((n, name)), (peer_mods.get((n, name)) or fallback[n]).get("state"))
            for n in others
        ]
        holders = [n for n, pm, st in rows if (pm or {}).get("vip_held") or st in PRIMARY]
        holder = ", ".join(dict.fromkeys(holders)) or "nobody"
        reps = [(pm.get("replication"), n) for n, pm, _ in rows if pm is not None]
        quarantine = [q for rep, _ in reps if rep for q in rep.get("quarantine") or []]
        qhtml = (
            '<p class="msg bad">Split-brain quarantine (review, merge, then remove): '
            + ", ".join(f"<code>{_e(q)}</code>" for q in quarantine)
            + "</p>"
            if quarantine
            else '<p class="muted">Quarantine: empty</p>'
        )
        networks = m.get("peer_networks")
        if isinstance(networks, dict):  # farm: per member
            networks = [f"{n}: {'/'.join(v) or 'none'}" for n, v in sorted(networks.items())]
        sections.append(
            f'<section id="module-{_e(name)}"><h2>{_e(name)} ({_e(m.get("type"))})'
            f" VIP {_e(m.get('vip') or 'none')} on <span class=vip-holder>{_e(holder)}</span>"
            f"{', sync: ' + _e(m.get('sync')) if m.get('sync') else ''}</h2>"
            "<table><tr><th>node</th><th>state</th><th>VIP</th><th>generation</th>"
            "<th>data</th><th>checkers</th><th>why</th></tr>"
            + "".join(_node_row(n, pm, fallback.get(n, {})) for n, pm, _ in rows)
            + "</table>"
            + f'<p class="muted">Heartbeat networks up: {_e(", ".join(networks or []) or "none")}'
            "</p>"
            + "".join(_replication(rep, where) for rep, where in reps)
            + qhtml
            + _advice({**m, "networks": local.get("networks")})
            + (_actions(m, node, csrf) if role == "operator" else "")
            + "</section>"
        )
    if not sections:
        sections.append("<section>No module is managed on this node.</section>")
    peer_note = "".join(
        f'<p class="msg warn">Peer console not reachable: {_e(err)}</p>' for err in peer_errors
    )
    ev_rows = "".join(
        f"<tr><td>{_e(e.get('time'))}</td><td>{_e(e.get('module'))}</td>"
        f"<td>{_e(e.get('event'))}</td><td>{_e(_event_detail(e))}</td></tr>"
        for e in reversed(list(events))
    )
    body = (
        peer_note
        + "".join(sections)
        + "<section><h2>Last events on this node</h2><table id=events>"
        "<tr><th>time</th><th>module</th><th>event</th><th>detail</th></tr>"
        f"{ev_rows}</table></section>"
        f'<p class="muted">Updated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},'
        f" every {refresh_s} s.</p>"
    )
    return page(f"hapair {node}", body, refresh_s=refresh_s, header=_header(node, user, role, csrf))


def _advice(m: Mapping[str, Any]) -> str:
    items = module_advice(dict(m))
    if not items:
        return ""
    return (
        '<div class="msg warn advice"><b>Attention</b><ul>'
        + "".join(f"<li>{_e(a.what)}<br>next: <code>{_e(a.next)}</code></li>" for a in items)
        + "</ul></div>"
    )


def _event_detail(e: Mapping[str, Any]) -> str:
    skip = {"time", "ts", "module", "event"}
    return ", ".join(f"{k}={v}" for k, v in e.items() if k not in skip)
