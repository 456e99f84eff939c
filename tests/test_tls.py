"""HTTPS and WSS with a certificate made for 127.0.0.1/localhost, verified by the client."""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import shutil
import socket
import tempfile
import time
import unittest as pyunit
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest
from twisted.web.client import ResponseNeverReceived

from wsserver.config import ConfigError
from wsserver.tap import tls_options

from .support import (
    LiveServer,
    connect_ws,
    serve_args,
    spawn_twistd_sync,
    wait_listening,
    within,
)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificate(directory: Path, names=("localhost",)) -> tuple[Path, Path]:
    """A private CA and a server certificate it signed, for ``names`` and 127.0.0.1.

    Writes cert.pem (server certificate, then the CA: a chain), key.pem and ca.pem;
    returns (cert, key) paths.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("wsserver test CA"))
        .issuer_name(_name("wsserver test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _Raw(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(self.data)


class TLSTests(unittest.TestCase):
    def setUp(self):
        cert, key = make_certificate(Path(self.mktemp()))
        self.server = LiveServer(self, {"TLS_CERT": str(cert), "TLS_KEY": str(key)})
        self.ca = Certificate.loadPEM(cert.with_name("ca.pem").read_bytes())
        trust = self.ca
        self.client_tls = optionsForClientTLS("localhost", trustRoot=trust)
        self.server.base = f"https://localhost:{self.server.port}"
        self.server.tls_options = self.client_tls

    @defer.inlineCallbacks
    def test_https_and_wss_with_verification(self):
        """Register, log in over HTTPS and exchange messages over WSS, the client
        verifying the certificate and the host name."""
        _, alice_token = yield self.server.user("alice")
        _, bob_token = yield self.server.user("bob")
        url = f"wss://localhost:{self.server.port}/ws"
        alice = yield connect_ws(url, alice_token, tls_options=self.client_tls, testcase=self)
        bob = yield connect_ws(url, bob_token, tls_options=self.client_tls, testcase=self)
        alice.send_json({"to": "bob", "content": "over tls"})
        got = yield bob.next_of("message")
        self.assertEqual(got["content"], "over tls")

    @defer.inlineCallbacks
    def test_shutdown_closes_wss_with_1001(self):
        """Stopping the server closes WSS connections with 1001 too."""
        _, token = yield self.server.user("alice")
        url = f"wss://localhost:{self.server.port}/ws"
        alice = yield connect_ws(url, token, tls_options=self.client_tls)
        alice.send_json({"to": "alice", "content": "x"})
        yield alice.next_of("ack")
        yield self.server.stop()
        code = yield alice.wait_closed()
        self.assertEqual(code, 1001)

    @defer.inlineCallbacks
    def test_wrong_host_name_is_rejected_by_the_client(self):
        """A client expecting another host name refuses the certificate."""
        other = optionsForClientTLS("example.org", trustRoot=self.ca)
        with self.assertRaises(ResponseNeverReceived):
            yield within(self.server.http(other).get(self.server.base + "/health"))

    @defer.inlineCallbacks
    def test_plain_text_client_gets_no_http_answer(self):
        """A plain HTTP request to the TLS port gets no HTTP response; the connection
        is closed."""
        from twisted.internet.endpoints import TCP4ClientEndpoint

        raw = _Raw()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port)
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: raw))
        data = yield within(raw.lost)
        self.assertNotIn(b"HTTP/1.1", data)
        self.assertNotIn(b"status", data)


class TLSConfigTests(unittest.TestCase):
    def test_unreadable_and_mismatched_files(self):
        """Missing files, garbage and a key of another certificate are ConfigErrors."""
        cert, key = make_certificate(Path(self.mktemp()))
        _, other_key = make_certificate(Path(self.mktemp()))
        garbage = Path(self.mktemp())
        garbage.write_text("not a pem")
        for c, k, name in [
            ("/nonexistent", key, "TLS_CERT"),
            (cert, "/nonexistent", "TLS_KEY"),
            (garbage, key, "TLS_CERT"),
            (cert, garbage, "TLS_KEY"),
            (cert, other_key, "TLS_KEY"),
        ]:
            with self.assertRaises(ConfigError) as ctx:
                tls_options(str(c), str(k))
            self.assertTrue(str(ctx.exception).startswith(name), str(ctx.exception))

    def test_minimum_is_tls_1_2(self):
        """The server context refuses anything older than TLS 1.2."""
        from OpenSSL import SSL

        cert, key = make_certificate(Path(self.mktemp()))
        ctx = tls_options(str(cert), str(key)).getContext()
        options = ctx.set_options(0)
        for flag in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
            self.assertTrue(options & flag)


class KeyExchangeTests(pyunit.TestCase):
    """The TLS key exchange a client gets from ``twistd wsserver``, by default and
    with examples/openssl-classical-kex.cnf (OPENSSL_CONF)."""

    def negotiated_group(self, env: dict | None) -> str:
        work = Path(tempfile.mkdtemp(prefix="wsserver-kex-"))
        self.addCleanup(shutil.rmtree, work, True)
        cert, key = make_certificate(work)
        args = serve_args(
            0, str(work / "db.sqlite"), "--tls-cert", str(cert), "--tls-key", str(key)
        )
        spawn_twistd_sync(self, args, env, work / "server.log")
        port = wait_listening(0, work / "server.log")
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(str(cert.with_name("ca.pem")))
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            conn = SSL.Connection(context, sock)
            conn.set_tlsext_host_name(b"localhost")
            conn.set_connect_state()
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn.do_handshake()
                    return conn.get_group_name()
                except SSL.WantReadError:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([sock], [], [], left)[0]:
                        self.fail("no TLS handshake within 30 s")

    def test_default_prefers_hybrid_post_quantum(self):
        """With OpenSSL's defaults (3.5 and newer) the hybrid X25519MLKEM768 is chosen."""
        version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).split()[1]
        if tuple(int(part) for part in version.split(b".")[:2]) < (3, 5):
            self.skipTest(f"OpenSSL {version.decode()} has no ML-KEM")
        env = {"OPENSSL_CONF": os.devnull}  # OpenSSL's built-in defaults, whatever the host has
        self.assertEqual(self.negotiated_group(env), "X25519MLKEM768")

    def test_classical_configuration(self):
        """OPENSSL_CONF=examples/openssl-classical-kex.cnf gives X25519."""
        conf = Path(__file__).resolve().parent.parent / "examples" / "openssl-classical-kex.cnf"
        self.assertEqual(self.negotiated_group({"OPENSSL_CONF": str(conf)}), "x25519")
