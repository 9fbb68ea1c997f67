"""Log lines on stderr with their syslog priority when stderr is the journal.

Shared by the daemon (cli) and the replication children, whose stderr is the same stream.
"""

from __future__ import annotations

import logging
import os
import sys


class JournalFormatter(logging.Formatter):
    """Prefixes every line with its syslog priority (<4> warning, <3> error...).

    journald reads the prefix of each stderr line (SyslogLevelPrefix=, on by default), so
    `journalctl -p warning -u hapair` shows the warnings; without it everything is info.
    """

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def journal_priority(levelno: int) -> int:
    """syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    for floor, priority in (
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
    ):
        if levelno >= floor:
            return priority
    return 7


def stderr_handler(fmt: str, plain_fmt: str | None = None) -> logging.Handler:
    """A stderr handler: `<N>`-prefixed `fmt` under journald (systemd sets JOURNAL_STREAM),
    else `plain_fmt` (default `fmt`)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter(fmt))
    else:
        handler.setFormatter(logging.Formatter(plain_fmt or fmt))
    return handler
