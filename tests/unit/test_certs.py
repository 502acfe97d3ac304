"""Certificates, site keys and the app publisher key from ``deploy.certs``: valid chains, the
formats Flower parses, file modes, the CA key kept apart from the SuperLink's files, and the
keep-unless-forced rules."""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy import certs
from deploy.certs import (
    CredentialsError,
    create_ca,
    create_server_cert,
    create_site_key,
    ensure_credentials,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(path: Path) -> x509.SubjectAlternativeName:
    return _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    certs.add_arguments(parser)
    return certs.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> certs.Credentials:
    return ensure_credentials(tmp_path_factory.mktemp("certs"), ["site-a", "site-b"], sans=("127.0.0.1", "localhost", "fl.example.org"))


def test_layout_and_private_key_modes(creds: certs.Credentials) -> None:
    d = creds.directory
    assert {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} == {
        "ca.crt", "superlink.crt", "superlink.key", "trusted-entities.yaml",
        "ca-private/ca.key", "publisher/publisher.key", "publisher/publisher.pub",
        "sites/site-a", "sites/site-a.pub", "sites/site-b", "sites/site-b.pub",
    }
    private_keys = (creds.ca_key, creds.server_key, creds.publisher_key,
                    creds.site_private_key("site-a"), creds.site_private_key("site-b"))
    for private in private_keys:
        assert _mode(private) == 0o600, private
    assert _mode(d / "ca-private") == 0o700 and _mode(d / "publisher") == 0o700
    assert _mode(creds.ca_cert) == 0o644 and _mode(creds.trusted_entities) == 0o644
    assert creds.site_public_key("site-a") == d / "sites" / "site-a.pub"


def test_the_superlink_files_hold_no_other_private_key(creds: certs.Credentials) -> None:
    """What deploy/ hands the SuperLink (compose mounts, start-superlink.sh) is these three files;
    the CA key, which can sign a certificate for any name, is not among them nor beside them."""
    d = creds.directory
    assert {d / name for name in certs.SUPERLINK_FILES} == {creds.ca_cert, creds.server_cert, creds.server_key}
    assert creds.ca_key == d / "ca-private" / "ca.key"
    assert creds.ca_key.parent != creds.server_key.parent and not (d / "ca.key").exists()
    superlink_key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)
    assert _cert(creds.ca_cert).public_key() == ca_key.public_key() != superlink_key.public_key()


def test_legacy_ca_key_next_to_the_superlink_key_is_moved_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = ensure_credentials(tmp_path, [])
    ca_key = first.ca_key.read_bytes()
    os.replace(first.ca_key, tmp_path / "ca.key")  # the layout of earlier versions
    (tmp_path / "ca.key").chmod(0o644)
    assert _cli([str(tmp_path)]) == 0
    assert "moved from ca.key ca-private/ca.key" in capsys.readouterr().out
    assert not (tmp_path / "ca.key").exists()
    assert first.ca_key.read_bytes() == ca_key and _mode(first.ca_key) == 0o600
    _cert(first.server_cert).verify_directly_issued_by(_cert(first.ca_cert))  # still the same CA
    # a copy in both places is ambiguous: say which to keep
    (tmp_path / "ca.key").write_bytes(ca_key)
    with pytest.raises(CredentialsError, match="both .*ca.key and .*ca-private/ca.key exist"):
        ensure_credentials(tmp_path, [])


def test_trusted_entities_list_the_publisher_key_as_flower_reads_them(creds: certs.Credentials) -> None:
    """``flower-supernode --trusted-entities`` reads YAML ``{key id: "ssh-ed25519 ..."}`` and accepts
    Ed25519 keys only; the id is what a FAB's verification record names."""
    entities = yaml.safe_load(creds.trusted_entities.read_text())
    private = serialization.load_ssh_private_key(creds.publisher_key.read_bytes(), password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    ((key_id, line),) = entities.items()
    assert key_id == certs.publisher_key_id(private.public_key()) and key_id.startswith("fpk_")
    assert serialization.load_ssh_public_key(line.encode()) == private.public_key()
    assert line.startswith("ssh-ed25519 ")
    assert (creds.publisher_key.with_suffix(".pub")).read_text().split()[:2] == line.split()[:2]


def test_rerun_keeps_the_publisher_key_and_other_trusted_entities(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path, [])
    key = first.publisher_key.read_bytes()
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    entities = certs.read_trusted_entities(first.trusted_entities)
    entities["fpk_second_publisher"] = other.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    certs.write_trusted_entities(first.trusted_entities, entities)
    ensure_credentials(tmp_path, [])
    assert first.publisher_key.read_bytes() == key
    assert certs.read_trusted_entities(first.trusted_entities) == entities
    # a lost file is re-derived from the key
    first.trusted_entities.unlink()
    ensure_credentials(tmp_path, [])
    assert set(certs.read_trusted_entities(first.trusted_entities)) == {next(iter(entities))}


def test_a_non_ed25519_publisher_key_is_refused(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path, [])
    ec_key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    creds.publisher_key.write_bytes(ec_key)
    with pytest.raises(CredentialsError, match="Ed25519"):
        ensure_credentials(tmp_path, [])


def test_server_certificate_chains_to_the_ca_with_sans(creds: certs.Credentials) -> None:
    ca, server = _cert(creds.ca_cert), _cert(creds.server_cert)
    server.verify_directly_issued_by(ca)  # raises InvalidSignature when the chain is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    sans = _sans(creds.server_cert)
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    server_key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    assert server.public_key() == server_key.public_key()


def test_server_certificate_passes_a_strict_tls_verifier(creds: certs.Credentials) -> None:
    """What a TLS client does: cryptography's X.509 policy verifier (RFC 5280 strict) for 127.0.0.1."""
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([_cert(creds.ca_cert)])).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    chain = verifier.verify(_cert(creds.server_cert), [])
    assert chain[-1] == _cert(creds.ca_cert)


def test_keys_are_ec_p384_and_site_keys_are_openssh(creds: certs.Credentials) -> None:
    for site in creds.sites:
        private_text = creds.site_private_key(site).read_bytes()
        assert private_text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(private_text, password=None)
        public = serialization.load_ssh_public_key(creds.site_public_key(site).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert creds.site_public_key(site).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert public == private.public_key()
    assert _cert(creds.ca_cert).public_key().curve.name == "secp384r1"
    assert _cert(creds.server_cert).public_key().curve.name == "secp384r1"
    a = serialization.load_ssh_public_key(creds.site_public_key("site-a").read_bytes())
    b = serialization.load_ssh_public_key(creds.site_public_key("site-b").read_bytes())
    assert a != b


def test_rerun_keeps_keys_and_adds_missing_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli([str(tmp_path), "--sites", "site-a"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert _cli([str(tmp_path), "--sites", "site-a", "site-b"]) == 0
    out = capsys.readouterr().out
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(after[p] == data for p, data in before.items()), "an existing file was rewritten"
    assert set(after) - set(before) == {tmp_path / "sites" / "site-b", tmp_path / "sites" / "site-b.pub"}
    assert "kept       sites/site-a\n" in out and "created    sites/site-b\n" in out
    assert "kept       ca-private/ca.key" in out
    assert "kept       publisher/publisher.key" in out


def test_new_san_reissues_certificate_but_keeps_keys(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path, ["site-a"])
    keys = {p: p.read_bytes() for p in (first.ca_key, first.server_key, first.ca_cert, first.site_private_key("site-a"))}
    actions: list[tuple[str, str]] = []
    ensure_credentials(tmp_path, ["site-a"], sans=("10.1.2.3",), report=lambda a, p: actions.append((a, p.name)))
    assert all(p.read_bytes() == data for p, data in keys.items())
    assert ("reissued (lacks SAN(s) 10.1.2.3)", "superlink.crt") in actions
    ips = _sans(first.server_cert).get_values_for_type(x509.IPAddress)
    assert set(ips) == {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}  # old SANs stay
    _cert(first.server_cert).verify_directly_issued_by(_cert(first.ca_cert))


def test_force_replaces_everything(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path, ["site-a"])
    old = {p: p.read_bytes() for p in (creds.ca_key, creds.server_key, creds.server_cert, creds.publisher_key,
                                       creds.trusted_entities, creds.site_private_key("site-a"))}
    assert _cli([str(tmp_path), "--sites", "site-a", "--force"]) == 0
    for path, data in old.items():
        assert path.read_bytes() != data, path
        if path.name not in ("superlink.crt", "trusted-entities.yaml"):
            assert _mode(path) == 0o600
    _cert(creds.server_cert).verify_directly_issued_by(_cert(creds.ca_cert))


def test_lost_public_key_is_rederived_from_the_private_key(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path, ["site-a"])
    public = creds.site_public_key("site-a")
    original = public.read_bytes()
    public.unlink()
    ensure_credentials(tmp_path, ["site-a"])
    assert public.read_bytes() == original


def test_create_functions_refuse_to_overwrite_keys(tmp_path: Path) -> None:
    create_ca(tmp_path, 30)
    create_server_cert(tmp_path, ["127.0.0.1"], 30)
    create_site_key(tmp_path, "site-a")
    with pytest.raises(FileExistsError, match="ca.key"):
        create_ca(tmp_path, 30)
    with pytest.raises(FileExistsError, match="site-a"):
        create_site_key(tmp_path, "site-a")
    assert (tmp_path / "ca-private" / "ca.key").exists() and not (tmp_path / "ca.key").exists()
    server_key = (tmp_path / "superlink.key").read_bytes()
    create_server_cert(tmp_path, ["localhost"], 30)  # re-issuing the certificate keeps the key
    assert (tmp_path / "superlink.key").read_bytes() == server_key


def test_half_a_ca_is_an_error_naming_the_file(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path, [])
    creds.ca_key.unlink()
    with pytest.raises(CredentialsError, match="ca.key"):
        ensure_credentials(tmp_path, [])


@pytest.mark.parametrize("bad", ["../evil", "", "a b", "-leading-dash", "x" * 65])
def test_bad_site_names_are_rejected_before_writing(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="site name"):
        ensure_credentials(tmp_path / "out", [bad])
    assert not (tmp_path / "out").exists()


def test_cli_san_adds_to_loopback(tmp_path: Path) -> None:
    assert _cli([str(tmp_path), "--san", "fl.hospital.org", "--san", "10.0.0.5"]) == 0
    sans = _sans(tmp_path / "superlink.crt")
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.hospital.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")}
    cn = _cert(tmp_path / "superlink.crt").subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "fl.hospital.org"


def test_site_keys_only_makes_no_ca(tmp_path: Path) -> None:
    """What a hospital runs on its own host: a key pair, nothing else."""
    assert _cli([str(tmp_path), "--sites", "site-a", "--site-keys-only"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "sites/site-a", "sites/site-a.pub"
    ]
    key = (tmp_path / "sites" / "site-a").read_bytes()
    assert _cli([str(tmp_path), "--sites", "site-a", "--site-keys-only"]) == 0
    assert (tmp_path / "sites" / "site-a").read_bytes() == key
    assert _cli([str(tmp_path), "--site-keys-only"]) == 2


def test_bad_san_is_a_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli([str(tmp_path / "out"), "--san", "not a host!"]) == 2
    assert "--san" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
