"""A self-signed certificate for nginx's TLS (voteflow.conf), made once.

    python self_signed_cert.py DIRECTORY [NAME ...]

writes DIRECTORY/tls.crt and DIRECTORY/tls.key (an ECDSA P-256 key, readable
by its owner only) for the NAMEs (host names or IP addresses; ``localhost``
if none), valid for a year. A certificate already there is kept: put your own
tls.crt and tls.key in the directory and this script leaves them alone.

For a first start (the Compose project runs it) and for tests. Browsers warn
about a self-signed certificate: anything public needs one from a CA (Let's
Encrypt's certbot, or your load balancer's). Needs the ``cryptography``
package, which voteflow's image has (PyJWT's crypto extra).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=365)


def _subject_names(names: list[str]) -> list[x509.GeneralName]:
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    return alternatives


def make(directory: Path, names: list[str]) -> bool:
    """Write the pair unless tls.crt exists; True if it was written."""
    certificate, key_file = directory / "tls.crt", directory / "tls.key"
    if certificate.exists():
        return False
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    # Its own issuer, so a client may trust it as its CA (tests do).
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName(_subject_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem_key)
    # The certificate last: its presence says the pair is complete.
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    directory, names = Path(argv[0]), argv[1:] or ["localhost"]
    written = make(directory, names)
    print(f"{directory / 'tls.crt'}: {'written' if written else 'kept as it was'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
