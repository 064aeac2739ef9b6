"""TLS for the server: load `cert.pem`/`key.pem` from a folder, or make a self-signed pair there.

Browsers only give a page the microphone on https (or localhost), so serving remote users needs a
certificate; a self-signed one works once the user accepts the browser's warning.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

CERT_FILE, KEY_FILE = "cert.pem", "key.pem"


def self_signed(folder: str | Path, hosts: list[str] | None = None, days: int = 365) -> tuple[Path, Path]:
    """Writes a self-signed RSA certificate for `hosts` (default: this machine's names and
    localhost) into folder/cert.pem and folder/key.pem; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hosts = hosts or sorted({"localhost", "127.0.0.1", "::1", socket.gethostname()})
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "openmoshi")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(folder: str | Path) -> ssl.SSLContext:
    """An SSL context from folder/cert.pem and folder/key.pem (ValueError if missing or invalid)."""
    folder = Path(folder)
    cert, key = folder / CERT_FILE, folder / KEY_FILE
    for path in (cert, key):
        if not path.is_file():
            raise ValueError(f"--ssl {folder}: {path.name} not found (or pass --self-signed to create one)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as e:
        raise ValueError(f"--ssl {folder}: cannot load {cert.name}/{key.name}: {e}") from None
    return context
