"""A private certificate authority for tests, made with the `openssl` command.

`Pki(directory)` creates a CA; `server("name")` and `client("name")` issue certificates it
signs (servers for 127.0.0.1, localhost and `*.modelwatch.test`). Every certificate carries
the extensions strict verifiers (Python 3.13's default flags) insist on. A test that needs
it without openssl installed is skipped.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_NAMES = "IP:127.0.0.1,DNS:localhost,DNS:*.modelwatch.test"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class Pki:
    """A CA in `directory` (`ca.pem`) that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "modelwatch test CA") -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed (apt-get install openssl)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = Pair(directory / "ca.pem", directory / "ca.key")
        self._key(self.ca.key)
        _openssl(
            *("req", "-x509", "-new", "-key", str(self.ca.key), "-out", str(self.ca.cert)),
            *("-days", "2", "-subj", f"/CN={name}"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        )

    def server(self, name: str = "server", alt_names: str = SERVER_NAMES) -> Pair:
        """A certificate for a server answering as `alt_names`."""
        return self._issue(name, "serverAuth", f"subjectAltName={alt_names}")

    def client(self, name: str = "client") -> Pair:
        """A certificate for a client (mutual TLS)."""
        return self._issue(name, "clientAuth", None)

    def server_context(self, pair: Pair, *, require_client: bool = False) -> ssl.SSLContext:
        """A server-side context presenting `pair`; optionally requiring a client certificate
        this CA signed."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca.cert)
        return context

    def _issue(self, name: str, usage: str, alt: str | None) -> Pair:
        pair = Pair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        request = self.directory / f"{name}.csr"
        extensions = self.directory / f"{name}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
        ]
        extensions.write_text("\n".join([*lines, *([alt] if alt else [])]) + "\n")
        self._key(pair.key)
        _openssl("req", "-new", "-key", str(pair.key), "-out", str(request), "-subj", f"/CN={name}")
        _openssl(
            *("x509", "-req", "-in", str(request), "-CA", str(self.ca.cert)),
            *("-CAkey", str(self.ca.key), "-CAcreateserial", "-out", str(pair.cert)),
            *("-days", "2", "-extfile", str(extensions)),
        )
        return pair

    @staticmethod
    def _key(path: Path) -> None:
        _openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
        )
        path.chmod(0o600)
