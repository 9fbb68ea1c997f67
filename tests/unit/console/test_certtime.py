"""ha_runtime.certtime: a certificate's notAfter from its DER, checked against OpenSSL's own
reading of real certificates (UTCTime and GeneralizedTime), and never a crash on junk."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ha_runtime.certtime import cert_not_after, not_after


def _openssl_cert(tmp: Path, days: int) -> Path:
    cert = tmp / f"c{days}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp / "k.pem"), "-out", str(cert), "-days", str(days),
         "-subj", "/CN=node1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


@pytest.mark.parametrize("days", [1, 397, 3650, 40000])  # 40000 days: GeneralizedTime
def test_not_after_is_openssls(tmp_path: Path, days: int) -> None:
    cert = _openssl_cert(tmp_path, days)
    # The oracle: the stdlib's test helper (OpenSSL's decoding), fine in a test.
    decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    assert cert_not_after(cert) == float(ssl.cert_time_to_seconds(decoded["notAfter"]))


def test_missing_or_foreign_files_are_absent(tmp_path: Path) -> None:
    assert cert_not_after(tmp_path / "none.pem") is None
    (tmp_path / "x.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    assert cert_not_after(tmp_path / "x.pem") is None


@given(st.binary(max_size=300))
def test_junk_der_is_a_value_error_never_a_crash(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        not_after(data)
