"""hactl: the node daemon and the operator's command line.

Long because: one argparse tree of every hactl subcommand and its small handler, read as
the command reference; each handler only parses and calls the API or a module.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ha_runtime import api_client
from ha_runtime.advice import format_advice
from ha_runtime.config import (
    DEFAULT_API_SOCKET,
    DEFAULT_CLUSTER_FILE,
    ConfigError,
    check_file,
    load_cluster,
    load_site,
)
from ha_runtime.journal_log import stderr_handler
from ha_runtime.states import State
from ha_runtime.status_wait import SYNC_STATES, Refused, module_entry, wait_for_state
from ha_runtime.version import runtime_version

if TYPE_CHECKING:
    from ha_runtime.security import SiteKeys

EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2
STATE_NAMES = tuple(s.name for s in State)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hactl", description="hapair: control the HA modules of this node"
    )
    p.add_argument("--version", action="version", version=f"hactl {runtime_version()}")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CLUSTER_FILE, help="node file (default %(default)s)"
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="API socket (default: api_socket of the node file)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("daemon", help="run the node daemon (hapair.service)")
    d.set_defaults(func=cmd_daemon)

    rel = sub.add_parser(
        "release",
        help="(internal, systemd ExecStopPost) drop the VIPs and farm rules of a dead daemon",
    )
    rel.set_defaults(func=cmd_release)

    s = sub.add_parser("status", help="state of the modules on this node")
    s.add_argument("module", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    _add_wait(sub)

    for name, text in (
        ("start", "start the module on this node"),
        ("stop", "stop the module on this node (application stopped, VIP released)"),
        ("restart", "restart the application (primary) or the module (elsewhere)"),
        ("prim", "make this node primary (forces it when the data is not known to be newest)"),
        ("second", "make this node secondary (on the primary: a switchover)"),
        ("swap", "planned switchover of the module to the other node"),
        ("drain", "farm: give this node's buckets away (maintenance); established ones finish"),
        ("undrain", "farm: take this node's share of the buckets back"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("module")
        c.add_argument("--json", action="store_true")
        c.set_defaults(func=cmd_action, action=name)

    v = sub.add_parser("verify", help="compare per-file digests of the replicated directories")
    v.add_argument("module")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    rs = sub.add_parser("resync", help="resynchronise the secondary (primary only)")
    rs.add_argument("module")
    rs.add_argument("--full", action="store_true", help="checksum delta over the whole tree")
    rs.add_argument("--json", action="store_true")
    rs.add_argument("--wait", action="store_true", help="wait until the peer is in sync again")
    rs.set_defaults(func=cmd_resync)

    rp = sub.add_parser("replicate", help="(internal) one replicated directory, run by the daemon")
    rp.add_argument("role", choices=("primary", "secondary", "spare"))
    rp.add_argument("module")
    rp.add_argument("--dir", type=int, default=0, dest="dir_index")
    rp.set_defaults(func=cmd_replicate)

    e = sub.add_parser("events", help="audit log of transitions")
    e.add_argument("module", nargs="?")
    e.add_argument("-n", "--limit", type=int, default=50)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_events)

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    chk = csub.add_parser("check", help="validate node or module files like the daemon does")
    chk.add_argument("files", nargs="+", type=Path, metavar="FILE")
    chk.add_argument("--cluster", type=Path, default=None, help="node file for module cross-checks")
    chk.add_argument(
        "--no-file-checks", action="store_true", help="do not require scripts to exist"
    )
    chk.set_defaults(func=cmd_config_check)
    return p


def _add_wait(sub: Any) -> None:
    w = sub.add_parser("wait", help="wait until the module is in one of STATE on this node")
    w.add_argument("module")
    w.add_argument("states", nargs="+", metavar="STATE", type=str.upper, choices=STATE_NAMES)
    w.add_argument("--sync", choices=SYNC_STATES, help="a SECOND must also be in this sub-state")
    w.add_argument("--timeout", type=float, default=60.0, help="seconds (default %(default)s)")
    w.add_argument("--json", action="store_true", help="print the last status as JSON")
    w.set_defaults(func=cmd_wait)


# --------------------------------------------------------------------------- daemon


def cmd_daemon(args: argparse.Namespace) -> int:
    import trio  # noqa: PLC0415 - only the daemon needs the event loop

    from ha_runtime.daemon import NodeDaemon  # noqa: PLC0415

    _setup_logging()
    log = logging.getLogger("hapair")
    loaded = _load_for_daemon(args.config)
    if isinstance(loaded, list):
        for line in loaded:
            log.error("%s", line)
        return EXIT_REFUSED
    site, keys, pair_keys = loaded
    daemon = NodeDaemon(site, keys.current, pair_keys=pair_keys, accepted_keys=keys.accepted)
    trio.run(daemon.run)
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    from ha_runtime.release import main as release  # noqa: PLC0415 - pyroute2, nft

    _setup_logging()
    return release(args.config)


def _load_for_daemon(path: Path) -> tuple[Any, SiteKeys, dict[str, bytes]] | list[str]:
    """The site, its keys and the heartbeat pair keys, or why the daemon must not start."""
    from ha_runtime.heartbeat.keys import read_pair_keys  # noqa: PLC0415
    from ha_runtime.security import InsecureFile, check_secrets, read_site_keys  # noqa: PLC0415

    try:
        site = load_site(path)
    except ConfigError as exc:
        return [*exc.errors, f"hapair: {len(exc.errors)} configuration error(s), not starting"]
    try:
        check_secrets(site.cluster)
        keys = read_site_keys(site.cluster.site_key)
        peers = [n.name for n in site.cluster.nodes if n.name != site.cluster.node]
        pair_keys = read_pair_keys(site.cluster.site_key, peers)
    except InsecureFile as exc:
        return [f"hapair: {exc}"]
    return site, keys, pair_keys


def _setup_logging() -> None:
    # Under systemd the journal adds time and unit; a timestamp of our own is noise there.
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, handlers=[stderr_handler(fmt, "%(asctime)s " + fmt)])


# --------------------------------------------------------------------------- client side


def _socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    try:
        return load_cluster(args.config).api_socket
    except ConfigError:
        return DEFAULT_API_SOCKET


def _call(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any] | None:
    path = _socket(args)
    try:
        resp = api_client.call(path, request)
    except FileNotFoundError:
        print(f"hactl: {path} not found: is hapair.service running?", file=sys.stderr)
        return None
    except PermissionError:
        print(f"hactl: permission denied on {path}: run as root", file=sys.stderr)
        return None
    except (OSError, ValueError, TypeError) as exc:
        print(f"hactl: cannot talk to the daemon on {path}: {exc}", file=sys.stderr)
        return None
    if not resp.get("ok"):
        print(f"hactl: {resp.get('error', 'unknown error')}", file=sys.stderr)
        return {"__refused__": True}
    return resp


def cmd_status(args: argparse.Namespace) -> int:
    resp = _call(args, {"command": "status", "module": args.module})
    if resp is None:
        return EXIT_UNREACHABLE
    if "__refused__" in resp:
        return EXIT_REFUSED
    result = with_versions(resp["result"])
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(format_status(result))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    path = _socket(args)

    def ask() -> dict[str, Any]:
        resp = api_client.call(path, {"command": "status", "module": args.module}, timeout=10.0)
        if not resp.get("ok"):
            raise Refused(str(resp.get("error", "unknown error")))
        result: dict[str, Any] = resp["result"]
        return result

    res = wait_for_state(ask, args.module, args.states, sync=args.sync, timeout=args.timeout)
    entry = module_entry(res.status, args.module)
    if args.json and res.status is not None:
        # the versions once, for the answer printed: not on every poll
        print(json.dumps(with_versions(res.status), indent=2))
    elif entry is not None:
        print(
            f"{args.module}: {entry.get('state')}"
            + (f" ({entry['sync']})" if entry.get("sync") else "")
        )
    if res.reached:
        return EXIT_OK
    if res.refused:
        print(f"hactl: {res.error}", file=sys.stderr)
        return EXIT_REFUSED
    want = "/".join(args.states) + (f" ({args.sync})" if args.sync else "")
    now = "unknown" if entry is None else str(entry.get("state"))
    why = f"; the daemon on {path}: {res.error}" if res.error else ""
    print(
        f"hactl: {args.module} is {now}, not {want}, after {args.timeout:g} s{why}", file=sys.stderr
    )
    return EXIT_UNREACHABLE if res.status is None else EXIT_REFUSED


def with_versions(result: dict[str, Any]) -> dict[str, Any]:
    """The status with `version`: the running daemon's when it tells, else the installed one.

    `installed_version` is this hactl's; after an upgrade without a restart they differ.
    """
    installed = runtime_version()
    return {**result, "version": result.get("version", installed), "installed_version": installed}


def format_status(result: dict[str, Any]) -> str:
    cols = ("MODULE", "TYPE", "STATE", "PEER", "PEER STATE", "VIP", "DATA", "SINCE", "REASON")
    rows = [cols]
    for m in result["modules"]:
        state = m["state"] + (f" ({m['sync']})" if m.get("sync") else "")
        rows.append(
            (
                m["module"],
                m["type"],
                state,
                m["peer"],
                m["peer_state"],
                (m["vip"] or "-") + (" *" if m.get("vip_held") else ""),
                m.get("data", ""),
                m["last_transition"],
                m["reason"],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols) - 1)]
    version = f"  hapair {result['version']}" if result.get("version") else ""
    lines = [f"node {result['node']}{version}  (* = VIP held here)"]
    for r in rows:
        lines.append(
            "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + str(r[-1])
        )
    for m in result["modules"]:
        if m.get("type") == "farm" and isinstance(m.get("farm"), dict):
            lines += format_farm(m)
    repl = [format_replication(m) for m in result["modules"]]
    if any(repl):
        lines += ["", "replication:", *[r for r in repl if r]]
    lines += format_advice(result)  # what each abnormal state means, what to type next
    return "\n".join(lines)


def format_farm(m: dict[str, Any]) -> list[str]:
    """The members of a farm module: who is in, how many of the 256 buckets each serves."""
    f = m["farm"]
    drained = ", drained" if m.get("drained") else ""
    lines = [
        "",
        f"farm {m['module']}: VIP {f['vip']} MAC {f['mac']} ({f['mac_mode']}){drained}; "
        f"here: {f['my_buckets']} buckets, {f['connections_served']} connections served",
    ]
    rows = [("MEMBER", "POWER", "ALIVE", "UP", "BUCKETS")]
    for mem in f["members"]:
        buckets = "-" if mem["buckets"] is None else str(mem["buckets"])
        rows.append(
            (
                mem["node"] + (" (this node)" if mem["node"] == m["node"] else ""),
                str(mem["power"]),
                "yes" if mem["alive"] else "no",
                "yes" if mem["eligible"] else "no",
                buckets,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def cmd_action(args: argparse.Namespace) -> int:
    resp = _call(args, {"command": args.action, "module": args.module})
    if resp is None:
        return EXIT_UNREACHABLE
    if "__refused__" in resp:
        return EXIT_REFUSED
    result = resp["result"]
    print(json.dumps(result, indent=2) if args.json else result["message"])
    return EXIT_OK


def cmd_replicate(args: argparse.Namespace) -> int:
    from ha_runtime.replication import child  # noqa: PLC0415 - the daemon's children only

    role = args.role
    if role == "spare":
        try:
            assigned = child.await_role()
        except ValueError as exc:
            print(f"hactl replicate: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        if assigned is None:
            return EXIT_OK  # dropped before use
        role = assigned
    # Read after the role is known: a spare may have waited through a configuration change.
    try:
        site = load_site(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_REFUSED
    module = next((m for m in site.modules if m.name == args.module), None)
    if module is None or not 0 <= args.dir_index < len(module.replicated_dirs):
        print(f"hactl: {args.module} has no replicated directory {args.dir_index}", file=sys.stderr)
        return EXIT_REFUSED
    return child.main(role, site.cluster, module, args.dir_index)


def cmd_verify(args: argparse.Namespace) -> int:
    resp = _call(args, {"command": "verify", "module": args.module})
    if resp is None:
        return EXIT_UNREACHABLE
    if "__refused__" in resp:
        return EXIT_REFUSED
    result = resp["result"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["message"])
        for d in result["dirs"]:
            word = "identical" if d["equal"] else f"{len(d['differences'])} difference(s)"
            print(f"  {d['dir']}: {d['files']} files, {word}")
            for diff in d["differences"]:
                print(f"    {diff}")
    return EXIT_OK if result["equal"] else EXIT_REFUSED


def cmd_resync(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    resp = _call(args, {"command": "resync", "module": args.module, "full": args.full})
    if resp is None:
        return EXIT_UNREACHABLE
    if "__refused__" in resp:
        return EXIT_REFUSED
    print(json.dumps(resp["result"], indent=2) if args.json else resp["result"]["message"])
    if not args.wait:
        return EXIT_OK
    time.sleep(1.0)  # the link is re-established before the resync starts
    while True:
        st = _call(args, {"command": "status", "module": args.module})
        if st is None or "__refused__" in st:
            return EXIT_UNREACHABLE if st is None else EXIT_REFUSED
        m = st["result"]["modules"][0]
        rep = m.get("replication") or {}
        if rep.get("in_sync") and m["state"] == "PRIM":
            print(f"{args.module}: peer in sync")
            return EXIT_OK
        line = format_replication(m)
        if line:
            print(line.strip())
        time.sleep(1.0)


def format_replication(m: dict[str, Any]) -> str:
    """One line per replicated module: state, progress of a resync, quarantine."""
    r = m.get("replication")
    if not isinstance(r, dict):
        return ""
    text = f"  {m['module']}: replication {r['role']} {r['state']}"
    text += " (in sync)" if r.get("in_sync") else ""
    p = r.get("resync")
    if isinstance(p, dict):
        eta = p.get("eta_s")
        text += (
            f"; resync {p.get('kind')}: {_size(p.get('bytes_done', 0))} done,"
            f" {_size(p.get('bytes_left', 0))} left, {_size(p.get('rate_bps', 0))}/s,"
            f" ETA {'?' if eta is None else f'{eta:.0f} s'}"
        )
    errors = [d["last_error"] for d in r.get("dirs", []) if d.get("last_error")]
    if errors and not r.get("in_sync"):
        text += f"; last error: {errors[0]}"
    if r.get("quarantine"):
        text += f"; SPLIT BRAIN QUARANTINE kept: {', '.join(r['quarantine'])}"
    return text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_events(args: argparse.Namespace) -> int:
    resp = _call(args, {"command": "events", "module": args.module, "limit": args.limit})
    if resp is None:
        return EXIT_UNREACHABLE
    if "__refused__" in resp:
        return EXIT_REFUSED
    records: list[dict[str, Any]] = resp["result"]
    if args.json:
        print(json.dumps(records, indent=2))
        return EXIT_OK
    for r in records:
        if r.get("event") == "transition":
            detail = f"{r.get('from')} -> {r.get('to')}: {r.get('reason')}"
        else:
            detail = ", ".join(
                f"{k}={v}" for k, v in r.items() if k not in ("time", "ts", "module", "event")
            )
        print(f"{r.get('time')}  {r.get('module'):<14} {r.get('event'):<12} {detail}")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    cluster = args.cluster
    if cluster is None and DEFAULT_CLUSTER_FILE.exists():
        cluster = DEFAULT_CLUSTER_FILE
    errors: list[str] = []
    for f in args.files:
        errors += check_file(f, cluster, check_files=not args.no_file_checks)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        print(f"hactl: {len(errors)} error(s)", file=sys.stderr)
        return EXIT_REFUSED
    print(f"hactl: {len(args.files)} file(s) valid")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
