"""`ha-lab`: bring up, break and tear down the lab of real nodes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .lab import Lab
from .system import LabError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ha-lab",
        description="A lab of real Linux servers (systemd-nspawn nodes) on this machine.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    up = sub.add_parser("up", help="bring the lab up (idempotent); prints a JSON description")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes, 2..4 (default 2)")
    sub.add_parser("down", help="remove everything the lab made (idempotent)")
    sub.add_parser("status", help="print the lab's JSON description")
    for verb, text in (
        ("exec", "run CMD inside NODE"),
        ("ssh", "open an SSH session (or run CMD) on NODE over mgmt"),
    ):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("node")
        cmd.add_argument("cmd", nargs=argparse.REMAINDER)
    for verb, text in (("client", "run CMD in the client namespace (10.77.0.50)"),
                       ("witness", "run CMD in the witness namespace (10.77.0.1)")):  # fmt: skip
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("crash", help="kill NODE outright; it vanishes from every network").add_argument(
        "node"
    )
    sub.add_parser("boot", help="start NODE again, its disk as it was").add_argument("node")
    cut = sub.add_parser("cut", help="cut NODE's link(s)")
    cut.add_argument("node")
    cut.add_argument("--net", default="all", choices=["mgmt", "lan", "hb", "all"])
    sub.add_parser("restore", help="heal every cut and loss of NODE").add_argument("node")
    loss = sub.add_parser("loss", help="drop PERCENT of NODE's packets (nftables numgen)")
    loss.add_argument("node")
    loss.add_argument("percent", type=int)
    loss.add_argument("--net", default="all", choices=["mgmt", "lan", "hb", "all"])
    fill = sub.add_parser("fill", help="fill the file system holding PATH on NODE")
    fill.add_argument("node")
    fill.add_argument("path")
    return parser


def _strip_dashes(argv: list[str]) -> list[str]:
    return argv[1:] if argv and argv[0] == "--" else argv


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lab = Lab()
    try:
        return _dispatch(lab, args)
    except (LabError, ValueError) as exc:
        print(f"ha-lab {args.verb}: {exc}", file=sys.stderr)
        return 1


def _dispatch(lab: Lab, args: argparse.Namespace) -> int:
    verb = args.verb
    if verb == "up":
        started = time.monotonic()
        description = lab.up(args.nodes)
        description["up_seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(description, indent=2))
    elif verb == "down":
        lab.down()
    elif verb == "status":
        print(json.dumps(lab.describe(), indent=2))
    elif verb in ("exec", "ssh", "client", "witness"):
        _exec(lab, args)
    elif verb == "crash":
        lab.crash(args.node)
    elif verb == "boot":
        lab.boot(args.node)
    elif verb == "cut":
        lab.cut(args.node, args.net)
    elif verb == "restore":
        lab.restore(args.node)
    elif verb == "loss":
        lab.loss(args.node, args.percent, args.net)
    elif verb == "fill":
        print(lab.fill(args.node, args.path))
    return 0


def _exec(lab: Lab, args: argparse.Namespace) -> None:
    """Replace ha-lab by the command so exit status, signals and the TTY pass through."""
    cmd = _strip_dashes(args.cmd)
    if args.verb == "ssh":
        argv = lab.node(args.node).ssh_command(cmd)
        argv.insert(1, "-t" if sys.stdin.isatty() and not cmd else "-T")
    elif not cmd:
        raise LabError(f"{args.verb}: give a command after --")
    elif args.verb == "exec":
        argv = lab.exec_argv(args.node, cmd)
    elif args.verb == "client":
        argv = lab.client_argv(cmd)
    else:
        argv = lab.witness_argv(cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main())
