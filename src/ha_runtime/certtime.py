"""The notAfter of a PEM certificate, read with the stdlib only (no extra dependency on the
nodes): the PEM's DER is walked down to tbsCertificate.validity (RFC 5280, 4.1)."""

from __future__ import annotations

import calendar
import ssl
import time
from pathlib import Path

_SEQUENCE, _UTCTIME, _GENERALIZEDTIME, _VERSION_TAG = 0x30, 0x17, 0x18, 0xA0


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at `at`."""
    tag, first = der[at], der[at + 1]
    if first < 0x80:
        return tag, at + 2, at + 2 + first
    n = first & 0x7F
    if not 1 <= n <= 4:
        raise ValueError("DER length form not supported")
    length = int.from_bytes(der[at + 2 : at + 2 + n], "big")
    return tag, at + 2 + n, at + 2 + n + length


def not_after(der: bytes) -> float:
    """notAfter of a DER certificate as a Unix time; ValueError if it is not one."""
    try:
        tag, cert, _ = _tlv(der, 0)
        tag2, tbs, _ = _tlv(der, cert)
        if (tag, tag2) != (_SEQUENCE, _SEQUENCE):
            raise ValueError("not an X.509 certificate")
        at = tbs
        if der[at] == _VERSION_TAG:  # explicit version, then serial, signature, issuer
            at = _tlv(der, at)[2]
        for _ in range(3):
            at = _tlv(der, at)[2]
        tag, validity, _ = _tlv(der, at)
        if tag != _SEQUENCE:
            raise ValueError("no validity")
        end_tag, start, end = _tlv(der, _tlv(der, validity)[2])  # skip notBefore
        text = der[start:end].decode("ascii")
    except IndexError as exc:
        raise ValueError("certificate cut short") from exc
    if end_tag == _UTCTIME:  # two-digit year: 50-99 are 19xx, 00-49 are 20xx (RFC 5280)
        text = ("19" if text[:2] >= "50" else "20") + text
    elif end_tag != _GENERALIZEDTIME:
        raise ValueError("notAfter is not a time")
    return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))


def cert_not_after(path: Path) -> float | None:
    """The certificate's notAfter as a Unix time, None if it cannot be read."""
    try:
        return not_after(ssl.PEM_cert_to_DER_cert(path.read_text(encoding="ascii")))
    except (OSError, ValueError, UnicodeError):
        return None
