"""Site CAs and node certificates made with openssl, once per test session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ha_runtime.replication.link.tls import TlsFiles


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_site(d: Path, site: str, nodes: tuple[str, ...]) -> dict[str, TlsFiles]:
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = d / "ca.key", d / "ca.crt"
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
         "-subj", f"/O=hapair/CN=hapair site {site} CA")  # fmt: skip
    out = {}
    for n in nodes:
        key, csr, crt, ext = d / f"{n}.key", d / f"{n}.csr", d / f"{n}.crt", d / f"{n}.ext"
        ext.write_text(f"subjectAltName = DNS:{n}, IP:127.0.0.1\n")
        subj = f"/O=hapair/OU={site}/CN={n}"
        _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", subj)  # fmt: skip
        _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))  # fmt: skip
        out[n] = TlsFiles(ca, crt, key)
    return out


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_site(tmp_path_factory.mktemp("site-a"), "a", ("node1", "node2"))


@pytest.fixture(scope="session")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_site(tmp_path_factory.mktemp("site-b"), "b", ("node1", "node2"))
