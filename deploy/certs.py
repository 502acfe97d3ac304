"""``fedglioma certs``: the federation's TLS certificates, per-site authentication keys and the
key that signs the apps the sites run.

Layout of ``OUT_DIR`` (what Flower's flags expect, see ``deploy/README.md``)::

    ca.crt                         the federation CA certificate (public: SuperLink, proxy, every site)
    superlink.crt  superlink.key   SuperLink server certificate (SANs = addresses the sites dial), signed by the CA
    trusted-entities.yaml          the app publisher's public key, ``flower-supernode --trusted-entities`` (public: every site)
    ca-private/ca.key              the CA's private key (folder 0700): only to issue certificates; keep it offline,
                                   never where the SuperLink runs. Only ca.crt, superlink.crt and superlink.key are
                                   the SuperLink's (``SUPERLINK_FILES``)
    publisher/publisher.key        Ed25519 OpenSSH key (folder 0700) that signs each app the coordinator starts
    publisher/publisher.pub        its public key
    sites/<site>                   the site's EC P-384 private key, OpenSSH format (stays at the site)
    sites/<site>.pub               its public key, OpenSSH format (registered with ``flwr supernode register``)

A folder made by an older version, with ``ca.key`` next to ``superlink.key``, is migrated: the key is
moved into ``ca-private/``.

The CLI's ``--san`` names are added to ``127.0.0.1`` and ``localhost``: sites dial the public name,
while the coordinator's ``flwr`` CLI dials the SuperLink on loopback (its Control API must not be
reachable from elsewhere, see ``deploy/README.md``).

Private keys are written with mode 0600, atomically, in folders of mode 0700. Existing keys are
never replaced unless ``--force``: re-running adds missing site keys, reuses the CA and the
publisher key, re-issues the SuperLink certificate (same key) only when it no longer matches the
CA, the requested SANs, or its dates, and adds the publisher key to ``trusted-entities.yaml`` when
it is missing there (other entries stay).

Only the ``cryptography`` package is used (no ``openssl``/``ssh-keygen`` binaries), so the same code
runs on every site and in CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS: tuple[str, ...] = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
#: EC P-384 for CA, server and sites: Flower's node authentication only accepts NIST curves. (The
#: publisher key is Ed25519: Flower verifies app signatures with nothing else.)
CURVE = ec.SECP384R1()
#: a site name becomes a file name and a SuperNode name: keep it to a portable character set
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

CA_CERT = "ca.crt"
CA_PRIVATE_DIR = "ca-private"
CA_KEY = f"{CA_PRIVATE_DIR}/ca.key"
LEGACY_CA_KEY = "ca.key"  # where versions before the ca-private/ folder kept it
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
#: everything the SuperLink reads from OUT_DIR; deploy scripts and templates hand it nothing else
SUPERLINK_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY)
SITES_DIR = "sites"
PUBLISHER_DIR = "publisher"
PUBLISHER_KEY = f"{PUBLISHER_DIR}/publisher.key"
TRUSTED_ENTITIES = "trusted-entities.yaml"

#: callback ``report(action, path)`` with action "created", "kept" or "reissued"
Reporter = Callable[[str, Path], None]


class CredentialsError(RuntimeError):
    """The credentials folder is inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class Credentials:
    """Absolute paths of a federation's credentials (layout in the module docstring)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: tuple[str, ...]
    publisher_key: Path
    trusted_entities: Path

    def site_private_key(self, site: str) -> Path:
        """The site's OpenSSH private key (``flower-supernode --auth-supernode-private-key``)."""
        return _site_paths(self.directory, site)[0]

    def site_public_key(self, site: str) -> Path:
        """The site's OpenSSH public key (``flwr supernode register``)."""
        return _site_paths(self.directory, site)[1]


# ---- file helpers -------------------------------------------------------------------------------


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: a folder holding a private key must not be
    listable by others either."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``: a temporary file in the same folder is filled,
    chmod-ed and renamed, so a reader never sees a half-written key and a private key is never
    world-readable, not even for a moment (mkstemp creates files with mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as err:
        raise CredentialsError(f"{path} is not an unencrypted PEM private key ({err}); "
                               "replace it or re-create everything with --force") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{path} holds a {type(key).__name__}, expected an EC key; use --force to replace it")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CredentialsError(f"{path} is not a PEM certificate ({err}); use --force to re-create it") from err


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, got --days {days}")


# ---- names --------------------------------------------------------------------------------------


def check_site_name(site: str) -> str:
    """Return ``site`` if it is usable as a key file name and SuperNode name, else raise."""
    if not SITE_NAME.match(site):
        raise ValueError(
            f"site name {site!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. site-a)"
        )
    return site


def parse_san(value: str) -> x509.GeneralName:
    """An IP address becomes an ``IPAddress`` SAN, anything else a ``DNSName`` (validated)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if not value or not all(re.fullmatch(r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)", lb) for lb in labels):
        raise ValueError(f"--san {value!r} is neither an IP address nor a DNS name (e.g. fl.hospital.org, 10.0.0.5)")
    return x509.DNSName(value.rstrip(".").lower())


def _site_paths(out_dir: Path, site: str) -> tuple[Path, Path]:
    check_site_name(site)
    private = Path(out_dir).resolve() / SITES_DIR / site
    return private, private.with_name(f"{site}.pub")


# ---- creation -----------------------------------------------------------------------------------


def create_ca(out_dir: Path, days: int = DEFAULT_DAYS, *, force: bool = False) -> tuple[Path, Path]:
    """Create the federation CA: an EC P-384 key and a self-signed certificate valid ``days``.

    Returns ``(ca.crt, ca.key)``. Raises ``FileExistsError`` when ``ca.key`` exists and not ``force``
    (a new CA invalidates every certificate it signed)."""
    _check_days(days)
    out_dir = Path(out_dir).resolve()
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if key_path.exists() and not force:
        raise FileExistsError(f"{key_path} exists; pass force=True (--force) to replace the CA")
    _private_dir(key_path.parent)
    key = ec.generate_private_key(CURVE)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedglioma federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, "fedglioma federation CA"),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_atomic(key_path, _private_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def create_server_cert(
    out_dir: Path, sans: Sequence[str] = DEFAULT_SANS, days: int = DEFAULT_DAYS, *, force: bool = False
) -> tuple[Path, Path]:
    """Issue the SuperLink certificate for ``sans`` (IP addresses and DNS names the sites dial),
    signed by ``out_dir/ca-private/ca.key``. Returns ``(superlink.crt, superlink.key)``.

    The certificate is always (re-)issued; the key is generated only when missing or ``force``, so
    re-issuing for new SANs keeps the server key."""
    _check_days(days)
    if not sans:
        raise ValueError("the SuperLink certificate needs at least one SAN (e.g. --san fl.hospital.org)")
    out_dir = Path(out_dir).resolve()
    ca_cert, ca_key = _load_cert(out_dir / CA_CERT), _load_private_key(out_dir / CA_KEY)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    if key_path.exists() and not force:
        key = _load_private_key(key_path)
    else:
        key = ec.generate_private_key(CURVE)
        _write_atomic(key_path, _private_pem(key), 0o600)
    names = [parse_san(s) for s in dict.fromkeys(sans)]  # de-duplicated, order kept
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedglioma federation"),
            # the CN is informational (verifiers use SANs): prefer the public name over loopback
            x509.NameAttribute(NameOID.COMMON_NAME, next((s for s in sans if s not in DEFAULT_SANS), sans[0])),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # strict verifiers (Python >= 3.13 sets VERIFY_X509_STRICT) require the AKI on leaf certs
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _openssh_public(key: ec.EllipticCurvePublicKey, site: str) -> bytes:
    """``ecdsa-sha2-nistp384 AAAA... fedglioma-<site>``: the comment tells the coordinator whose
    key a .pub file is; OpenSSH parsers (Flower's included) ignore it."""
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw + f" fedglioma-{site}\n".encode()


def create_site_key(out_dir: Path, site: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create ``sites/<site>`` (EC P-384 private key, OpenSSH PEM, mode 0600) and
    ``sites/<site>.pub`` (OpenSSH public key). Returns ``(private, public)``.

    Raises ``FileExistsError`` when the private key exists and not ``force``: a new key means
    registering the site again."""
    private, public = _site_paths(out_dir, site)
    if private.exists() and not force:
        raise FileExistsError(f"{private} exists; pass force=True (--force) to replace site {site!r}'s key")
    key = ec.generate_private_key(CURVE)
    _write_atomic(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        0o600,
    )
    _write_atomic(public, _openssh_public(key.public_key(), site), 0o644)
    return private, public


# ---- app publisher key --------------------------------------------------------------------------


def publisher_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The key's id in ``trusted-entities.yaml`` and in a FAB's verification records: ``fpk_`` and
    the first 32 hex digits of the SHA-256 of the raw key, so the id follows from the key alone."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"fpk_{hashlib.sha256(raw).hexdigest()[:32]}"


def load_publisher_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 OpenSSH private key at ``path`` (Flower verifies app signatures with Ed25519 only)."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as err:
        raise CredentialsError(f"publisher key {path} is missing; `fedglioma certs CERTS_DIR` writes "
                               f"CERTS_DIR/{PUBLISHER_KEY}") from err
    except (ValueError, TypeError) as err:
        raise CredentialsError(f"{path} is not an unencrypted OpenSSH private key ({err}); "
                               "replace it with --force (every site then needs the new trusted-entities.yaml)") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CredentialsError(f"{path} is a {type(key).__name__}; Flower verifies app signatures with Ed25519 "
                               "keys only. Use --force to replace it")
    return key


def _ssh_public_line(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{raw} fedglioma-publisher"


def create_publisher_key(out_dir: Path, *, force: bool = False) -> Path:
    """Create ``publisher/publisher.key`` (Ed25519, OpenSSH, mode 0600) and ``publisher.pub``.
    Returns the private key's path. Raises ``FileExistsError`` when it exists and not ``force``
    (a new key must reach every site's trusted-entities.yaml before the next run)."""
    key_path = Path(out_dir).resolve() / PUBLISHER_KEY
    if key_path.exists() and not force:
        raise FileExistsError(f"{key_path} exists; pass force=True (--force) to replace the publisher key")
    _private_dir(key_path.parent)
    key = ed25519.Ed25519PrivateKey.generate()
    _write_atomic(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        0o600,
    )
    _write_atomic(key_path.with_suffix(".pub"), f"{_ssh_public_line(key.public_key())}\n".encode(), 0o644)
    return key_path


def read_trusted_entities(path: Path) -> dict[str, str]:
    """``{public key id: "ssh-ed25519 AAAA... comment"}`` from a ``--trusted-entities`` file."""
    try:
        entities = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise CredentialsError(f"{path} is not YAML ({err}); delete it and re-run `fedglioma certs`") from err
    if not isinstance(entities, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entities.items()):
        raise CredentialsError(f"{path} must map key ids to 'ssh-ed25519 ...' lines (what flower-supernode "
                               "--trusted-entities reads); delete it and re-run `fedglioma certs`")
    return entities


def write_trusted_entities(path: Path, entities: dict[str, str]) -> None:
    """Write ``entities`` as a ``flower-supernode --trusted-entities`` file (public, mode 0644)."""
    header = ("# flower-supernode --trusted-entities: publishers whose signed apps this site runs\n"
              "# (written by `fedglioma certs`; one 'key id: public key' line per publisher)\n")
    _write_atomic(Path(path), (header + yaml.safe_dump(entities, sort_keys=True, width=1000)).encode(), 0o644)


def ensure_publisher_key(out_dir: Path, *, force: bool = False, report: Reporter | None = None) -> tuple[Path, Path]:
    """Create the publisher key unless it exists (then check it and tighten its mode), and make sure
    ``trusted-entities.yaml`` lists it: missing -> written, entry missing -> added next to the
    entries already there; ``force`` replaces key and file. Returns ``(publisher.key, trusted-entities.yaml)``."""
    note: Reporter = report or (lambda action, path: None)
    out_dir = Path(out_dir).resolve()
    key_path, trusted = out_dir / PUBLISHER_KEY, out_dir / TRUSTED_ENTITIES
    if force or not key_path.exists():
        create_publisher_key(out_dir, force=True)
        note("created", key_path)
    else:
        if key_path.stat().st_mode & 0o077:
            os.chmod(key_path, 0o600)
        _private_dir(key_path.parent)
        note("kept", key_path)
    public = load_publisher_key(key_path).public_key()
    entities = {} if force or not trusted.exists() else read_trusted_entities(trusted)
    key_id = publisher_key_id(public)
    if entities.get(key_id, "").split()[:2] == _ssh_public_line(public).split()[:2]:
        note("kept", trusted)
    else:
        action = "updated" if entities else "created"
        entities[key_id] = _ssh_public_line(public)
        write_trusted_entities(trusted, entities)
        note(action, trusted)
    return key_path, trusted


# ---- idempotent set-up --------------------------------------------------------------------------


def _server_cert_problem(cert_path: Path, ca_cert: x509.Certificate, server_key: Path, sans: Sequence[str]) -> str | None:
    """Why the existing SuperLink certificate must be re-issued, or None when it is still good."""
    cert = _load_cert(cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the current CA"
    if cert.public_key() != _load_private_key(server_key).public_key():
        return "does not match superlink.key"
    if cert.not_valid_after_utc < _now() + dt.timedelta(days=1):
        return "expires within a day"
    try:
        present = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        present = set()
    missing = [s for s in sans if parse_san(s) not in present]
    return f"lacks SAN(s) {', '.join(missing)}" if missing else None


def ensure_credentials(
    out_dir: Path,
    sites: Iterable[str] = (),
    sans: Sequence[str] = DEFAULT_SANS,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    report: Reporter | None = None,
) -> Credentials:
    """Make sure ``out_dir`` holds a CA, a SuperLink certificate covering ``sans`` and a key pair
    for every site; create what is missing, keep what exists (replace everything asked for when
    ``force``). ``report(action, path)`` is called for each file ("created", "kept", "reissued")."""
    out_dir = Path(out_dir).expanduser().resolve()
    sites = tuple(dict.fromkeys(check_site_name(s) for s in sites))
    for s in sans:
        parse_san(s)  # fail before writing anything
    _check_days(days)
    note: Reporter = report or (lambda action, path: None)

    ca_cert, ca_key = out_dir / CA_CERT, out_dir / CA_KEY
    _move_legacy_ca_key(out_dir, note)
    if force or not (ca_cert.exists() or ca_key.exists()):
        create_ca(out_dir, days, force=True)
        note("created", ca_cert)
        note("created", ca_key)
        reissue_reason: str | None = "new CA"
    elif ca_cert.exists() != ca_key.exists():
        have, lack = (ca_cert, ca_key) if ca_cert.exists() else (ca_key, ca_cert)
        raise CredentialsError(
            f"{have} exists but {lack} does not; restore {lack.name} from your backup, or re-create the CA "
            "with --force (every site then needs the new ca.crt)"
        )
    else:
        if _load_cert(ca_cert).not_valid_after_utc < _now():
            raise CredentialsError(f"the CA certificate {ca_cert} has expired; re-create it with --force "
                                   "and send the new ca.crt to every site")
        _load_private_key(ca_key)
        _private_dir(ca_key.parent)
        if ca_key.stat().st_mode & 0o077:
            os.chmod(ca_key, 0o600)
        note("kept", ca_cert)
        note("kept", ca_key)
        reissue_reason = None

    server_cert, server_key = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    if force or not server_key.exists():
        create_server_cert(out_dir, sans, days, force=True)
        note("created", server_key)
        note("created", server_cert)
    else:
        note("kept", server_key)
        if not server_cert.exists():
            reissue_reason = "missing"
        elif reissue_reason is None:
            reissue_reason = _server_cert_problem(server_cert, _load_cert(ca_cert), server_key, sans)
        if reissue_reason is None:
            note("kept", server_cert)
        else:
            # keep SANs the existing certificate already had, so adding one never drops another
            old = _existing_sans(server_cert)
            create_server_cert(out_dir, [*sans, *old], days)
            note(f"reissued ({reissue_reason})", server_cert)

    publisher_key, trusted_entities = ensure_publisher_key(out_dir, force=force, report=note)
    for site in sites:
        ensure_site_key(out_dir, site, force=force, report=note)

    return Credentials(
        directory=out_dir, ca_cert=ca_cert, ca_key=ca_key, server_cert=server_cert,
        server_key=server_key, sites=sites, publisher_key=publisher_key, trusted_entities=trusted_entities,
    )


def _move_legacy_ca_key(out_dir: Path, note: Reporter) -> None:
    """Move ``ca.key`` from next to the SuperLink's files (older layout) into ``ca-private/``."""
    legacy, target = out_dir / LEGACY_CA_KEY, out_dir / CA_KEY
    if not legacy.exists():
        return
    if target.exists():
        raise CredentialsError(
            f"both {legacy} and {target} exist; keep the one that signed ca.crt in {target} and delete {legacy}"
        )
    _private_dir(target.parent)
    os.chmod(legacy, 0o600)
    os.replace(legacy, target)
    note(f"moved from {LEGACY_CA_KEY}", target)


def ensure_site_key(out_dir: Path, site: str, *, force: bool = False, report: Reporter | None = None) -> tuple[Path, Path]:
    """Create the key pair of ``site`` unless its private key exists (then check it, tighten its
    mode to 0600 and re-derive a missing or stale ``.pub``). Returns ``(private, public)``."""
    note: Reporter = report or (lambda action, path: None)
    private, public = _site_paths(out_dir, site)
    if force or not private.exists():
        create_site_key(out_dir, site, force=True)
        note("created", private)
        note("created", public)
        return private, public
    if private.stat().st_mode & 0o077:
        os.chmod(private, 0o600)  # a copied key may have lost its mode; it must not stay readable
    note("kept", private)
    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CredentialsError(f"{private} is not an unencrypted OpenSSH private key ({err}); "
                               "replace it with --force (the site must then be registered again)") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{private} is a {type(key).__name__}; Flower needs an EC key. Use --force")
    expected = _openssh_public(key.public_key(), site)
    if not public.exists() or public.read_bytes().split()[:2] != expected.split()[:2]:
        # the public key is derived from the private one, so re-writing it is always safe
        _write_atomic(public, expected, 0o644)
        note("created", public)
    else:
        note("kept", public)
    return private, public


def _existing_sans(cert_path: Path) -> list[str]:
    if not cert_path.exists():
        return []
    try:
        ext = _load_cert(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, CredentialsError):
        return []
    return [str(v) for v in ext.get_values_for_type(x509.IPAddress)] + list(ext.get_values_for_type(x509.DNSName))


# ---- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="credentials folder (created if missing)")
    parser.add_argument("--sites", nargs="*", default=[], metavar="SITE",
                        help="one EC P-384 key pair per site (sites/<site>, sites/<site>.pub)")
    parser.add_argument("--san", action="append", metavar="HOST",
                        help="DNS name or IP the sites dial to reach the SuperLink; repeatable. Added to "
                             f"{' '.join(DEFAULT_SANS)}, which the coordinator's `flwr` CLI on the SuperLink host dials")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"certificate lifetime (default: {DEFAULT_DAYS})")
    parser.add_argument("--force", action="store_true",
                        help="replace the CA, the SuperLink key/certificate, the publisher key (and trusted-entities.yaml) "
                             "and the listed sites' keys")
    parser.add_argument("--site-keys-only", action="store_true",
                        help="only the --sites key pairs, no CA or SuperLink certificate: what a site runs "
                             "on its own host before sending sites/<site>.pub to the coordinator")


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir).expanduser().resolve()

    def report(action: str, path: Path) -> None:
        print(f"{action:<10} {path.relative_to(out_dir)}")

    if args.site_keys_only:
        if not args.sites:
            print("fedglioma certs: --site-keys-only needs --sites SITE", file=sys.stderr)
            return 2
        try:
            for site in args.sites:
                check_site_name(site)
            for site in args.sites:
                ensure_site_key(out_dir, site, force=args.force, report=report)
        except (ValueError, CredentialsError) as err:
            print(f"fedglioma certs: {err}", file=sys.stderr)
            return 2
        for site in args.sites:
            print(f"\nkeep {out_dir / SITES_DIR / site} here (mode 600); send only {SITES_DIR}/{site}.pub to the coordinator")
        return 0
    try:
        creds = ensure_credentials(
            out_dir, args.sites, (*DEFAULT_SANS, *(args.san or [])), days=args.days, force=args.force, report=report
        )
    except (ValueError, CredentialsError) as err:
        print(f"fedglioma certs: {err}", file=sys.stderr)
        return 2
    print(f"\ncredentials in {creds.directory}")
    print(f"  SuperLink (and proxy): {' '.join(SUPERLINK_FILES)}, nothing else")
    print(f"  coordinator only:      {CA_KEY} (keep offline), {PUBLISHER_KEY} (signs the apps it runs)")
    print(f"  every site:            {CA_CERT} {TRUSTED_ENTITIES}")
    for site in creds.sites:
        print(f"  site {site}: sites/{site} (private, never leaves the site); "
              f"register sites/{site}.pub on the coordinator")
    return 0
