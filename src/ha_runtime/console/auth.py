"""Console authentication: password hashes from the inventory, sessions, CSRF tokens.

Password hashes (only the hash is in the inventory; make one with
``python3 -m ha_runtime.console.auth``):
  scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>
  pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>

Sessions live in the daemon's memory only (a restart logs everybody out); each carries
its own CSRF token. A session opened by a client certificate stays bound to it.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")

SCRYPT_LOG2_N = 15
SCRYPT_R, SCRYPT_P = 8, 1
PBKDF2_MIN_ITERATIONS = 100_000
MAX_SESSIONS = 256


class BadHash(ValueError):
    """A password hash that is not in one of the accepted formats (message says why)."""


@dataclass(frozen=True)
class PasswordHash:
    scheme: Literal["scrypt", "pbkdf2_sha256"]
    params: tuple[int, ...]
    salt: bytes
    digest: bytes

    def compute(self, password: str) -> bytes:
        pw = password.encode()
        if self.scheme == "scrypt":
            log2n, r, p = self.params
            return hashlib.scrypt(
                pw, salt=self.salt, n=1 << log2n, r=r, p=p, maxmem=256 << 20,
                dklen=len(self.digest),
            )  # fmt: skip
        return hashlib.pbkdf2_hmac("sha256", pw, self.salt, self.params[0], len(self.digest))

    def verify(self, password: str) -> bool:
        return hmac.compare_digest(self.compute(password), self.digest)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise BadHash(f"{what} is not base64") from None


def parse_hash(text: str) -> PasswordHash:
    parts = text.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            log2n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            if not (10 <= log2n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
                raise BadHash("scrypt parameters out of range (log2 n 10..20, r 1..32, p 1..16)")
            h = PasswordHash(
                "scrypt", (log2n, r, p), _b64(parts[4], "salt"), _b64(parts[5], "hash")
            )
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            it = int(parts[1])
            if not PBKDF2_MIN_ITERATIONS <= it <= 10_000_000:
                raise BadHash(f"pbkdf2 iterations must be {PBKDF2_MIN_ITERATIONS} or more")
            h = PasswordHash("pbkdf2_sha256", (it,), _b64(parts[2], "salt"), _b64(parts[3], "hash"))
        else:
            raise BadHash(
                "expected scrypt$LOG2N$R$P$SALT$HASH or pbkdf2_sha256$ITERATIONS$SALT$HASH"
                " (make one with: python3 -m ha_runtime.console.auth)"
            )
    except ValueError as exc:
        if isinstance(exc, BadHash):
            raise
        raise BadHash("a parameter is not an integer") from None
    if len(h.salt) < 8 or len(h.digest) < 16:
        raise BadHash("salt (8+ bytes) or hash (16+ bytes) too short")
    return h


def make_hash(password: str, log2n: int = SCRYPT_LOG2_N) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=1 << log2n, r=SCRYPT_R, p=SCRYPT_P, maxmem=256 << 20,
        dklen=32,
    )  # fmt: skip
    enc = base64.b64encode
    return f"scrypt${log2n}${SCRYPT_R}${SCRYPT_P}${enc(salt).decode()}${enc(digest).decode()}"


_dummy: list[PasswordHash] = []


def _dummy_hash() -> PasswordHash:
    """A hash to spend the same time on for an unknown user name (no enumeration by timing);
    made on first use, not at import (the config loader imports this module)."""
    if not _dummy:
        _dummy.append(parse_hash(make_hash(secrets.token_hex(8))))
    return _dummy[0]


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str | None = None
    certificate: bool = False  # may log in with a site-CA client certificate whose CN is name


@dataclass
class Session:
    token: str
    user: str
    role: Role
    via: str  # "password" | "certificate"
    csrf: str
    cert_fingerprint: str | None
    last_seen: float
    created: float = field(default_factory=time.time)


class Authenticator:
    def __init__(
        self,
        users: tuple[User, ...],
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.users = {u.name: u for u in users}
        self._hashes = {
            u.name: parse_hash(u.password_hash) for u in users if u.password_hash is not None
        }
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def check_password(self, name: str, password: str) -> User | None:
        """Slow on purpose (scrypt); run it in a thread."""
        h = self._hashes.get(name)
        ok = (h or _dummy_hash()).verify(password)
        return self.users[name] if ok and h is not None else None

    def user_for_certificate(self, cn: str | None) -> User | None:
        u = self.users.get(cn or "")
        return u if u is not None and u.certificate else None

    def open(self, user: User, via: str, cert_fingerprint: str | None = None) -> Session:
        self._expire()
        if len(self._sessions) >= MAX_SESSIONS:  # oldest out: a login flood cannot grow memory
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            del self._sessions[oldest.token]
        s = Session(
            token=secrets.token_urlsafe(32),
            user=user.name,
            role=user.role,
            via=via,
            csrf=secrets.token_urlsafe(32),
            cert_fingerprint=cert_fingerprint,
            last_seen=self._clock(),
        )
        self._sessions[s.token] = s
        return s

    def session(self, token: str | None, cert_fingerprint: str | None) -> Session | None:
        if not token:
            return None
        self._expire()
        s = self._sessions.get(token)
        if s is None:
            return None
        if s.cert_fingerprint is not None and s.cert_fingerprint != cert_fingerprint:
            return None  # a certificate session without its certificate
        user = self.users.get(s.user)
        if user is None or user.role != s.role:
            self._sessions.pop(token, None)  # the inventory changed under it
            return None
        s.last_seen = self._clock()
        return s

    def close(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def _expire(self) -> None:
        now = self._clock()
        for t in [t for t, s in self._sessions.items() if now - s.last_seen > self.idle_timeout_s]:
            del self._sessions[t]


def csrf_ok(session: Session, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())


def main() -> int:
    """Print the hash of a password read from the terminal (or stdin), for the inventory."""
    if sys.stdin.isatty():
        pw = getpass.getpass("console password: ")
        if pw != getpass.getpass("again: "):
            print("the two passwords differ", file=sys.stderr)
            return 1
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if len(pw) < 12:
        print("refusing a password shorter than 12 characters", file=sys.stderr)
        return 1
    print(make_hash(pw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
