"""A site CA with node and operator certificates made with openssl, for console tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_ca(d: Path, days: int = 2) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    key, crt = d / "ca.key", d / "ca.crt"
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(crt), "-days", str(days),
         "-subj", "/O=hapair/CN=hapair test site CA")  # fmt: skip
    return crt, key


def make_cert(d: Path, ca: tuple[Path, Path], cn: str, days: int = 2) -> tuple[Path, Path]:
    """A certificate for `cn` signed by `ca` (SAN: the name and 127.0.0.1)."""
    key, csr, crt, ext = d / f"{cn}.key", d / f"{cn}.csr", d / f"{cn}.crt", d / f"{cn}.ext"
    ext.write_text(f"subjectAltName = DNS:{cn}, IP:127.0.0.1\n")
    _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", f"/O=hapair/CN={cn}")  # fmt: skip
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-out", str(crt), "-days", str(days), "-extfile", str(ext))  # fmt: skip
    key.chmod(0o600)
    return crt, key
