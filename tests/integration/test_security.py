# Security checks beyond test_tls.py / test_auth.py / test_admin_ops.py:
#   - TLS toward clients: 1.2 and 1.3 only, no NULL/anonymous/export/RC4/DES/non-AEAD suites;
#   - upstream verify-full against certificates with the wrong names, dates or purpose
#     (served by a fake upstream, so each certificate can be exactly what the case needs),
#     and that no startup packet reaches an upstream that failed verification;
#   - SCRAM-SHA-256 through client-side TLS (channel binding: docs/semantics.md);
#   - admin API token edge cases (query string, other schemes, overlong headers, path tricks);
#   - hostile identity values (sqlcommenter tags, SET pgwarden.client, application_name) never
#     leave their place: the server runs only the client's statements and pgwarden's fixed
#     ones (checked in PostgreSQL's own log_statement=all output), metrics labels stay valid
#     (promtool), log lines stay one per event, the admin API stays valid JSON.
from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

import harness
import pgwire

pytestmark = pytest.mark.proxy_only

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def client_tls_config(tls_files: harness.TlsFiles, mode: str = "allow") -> str:
    return f'[tls]\nmode = "{mode}"\ncert = "{tls_files.proxy_cert}"\nkey = "{tls_files.proxy_key}"\n'


def admin_get(instance: harness.Pgwarden, path: str, token: str | None = None) -> bytes:
    request = urllib.request.Request(f"http://{instance.host}:{instance.admin_port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def json_events(instance: harness.Pgwarden) -> list[dict[str, Any]]:
    """Every line of a JSON-format log, each of which must be one whole JSON object."""
    events = []
    for number, line in enumerate(instance.log_text().splitlines(), 1):
        if any(marker in line for marker in harness.SANITIZER_MARKERS):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not one JSON event: {line[:300]!r}") from None
        assert isinstance(event, dict) and "event" in event and "level" in event, line[:300]
        events.append(event)
    return events


# =============================================================================================
# TLS toward clients: protocol versions and cipher suites


class LocalTlsServer:
    """A permissive TLS server (any version, any suite OpenSSL has) that handshakes and hangs up:
    the control showing that this machine's client side can offer what pgwarden must refuse."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        self.context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server((harness.HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.listener.close()


def client_context(version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def handshake(port: int, context: ssl.SSLContext, pg: bool) -> ssl.SSLSocket:
    """TLS handshake with pgwarden (after SSLRequest) or with the control server; raises on refusal."""
    sock = socket.create_connection((harness.HOST, port), timeout=5)
    try:
        if pg:
            sock.sendall(struct.pack("!II", 8, pgwire.SSL_REQUEST_CODE))
            assert sock.recv(1) == b"S"
        return context.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


@pytest.fixture
def tls_proxy(pgwarden_factory, tls_files):
    return pgwarden_factory(client_tls_config(tls_files))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_client_tls_accepts_1_2_and_1_3(tls_proxy, version):
    with pgwire.RawConnection(tls_proxy.host, tls_proxy.port) as raw:
        assert raw.request_ssl() == b"S"
        raw.sock = client_context(version).wrap_socket(raw.sock)
        assert raw.sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert raw.startup("postgres", application_name="sec-tls-version").error is None
        raw.query("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
        rows = [pgwire.data_row_values(body) for kind, body in raw.read_until("Z") if kind == "D"]
    assert rows == [[b"f", None]]  # TLS ends at pgwarden; the upstream here is plain


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"], ids=["tls1.0", "tls1.1"])
def test_client_tls_refuses_1_0_and_1_1(tls_proxy, tls_files, version):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = getattr(ssl.TLSVersion, version)
        context = client_context(old, "ALL:@SECLEVEL=0")
    control = LocalTlsServer(tls_files.proxy_cert, tls_files.proxy_key)
    try:
        try:
            handshake(control.port, context, pg=False).close()
        except ssl.SSLError as e:
            pytest.skip(f"this machine's OpenSSL cannot offer {version} at all ({e}): nothing to refuse")
    finally:
        control.close()
    with pytest.raises(ssl.SSLError) as refused:
        handshake(tls_proxy.port, context, pg=True).close()
    assert "PROTOCOL_VERSION" in str(refused.value).upper() or "VERSION" in str(refused.value).upper()
    assert tls_proxy.alive()
    with tls_proxy.connect(sslmode="require") as conn:
        assert conn.execute("select 1").fetchone() == (1,)


WEAK = re.compile(r"NULL|EXP|RC4|DES|MD5|ADH|AECDH|anon|PSK|SRP|CAMELLIA|SEED|IDEA|ARIA")
STRONG = re.compile(r"^(ECDHE|DHE)-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")


def test_no_weak_cipher_suite_is_negotiable(tls_proxy, tls_files):
    """Every TLS <= 1.2 suite this machine's OpenSSL can offer, one at a time: pgwarden may only
    agree to forward-secret AEAD suites. (OpenSSL 3 cannot offer EXPORT or RC4 suites at all, so
    those are refused by construction.)"""
    probe = client_context(ciphers="ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    suites = sorted({c["name"] for c in probe.get_ciphers() if c["protocol"] != "TLSv1.3"})
    assert suites, "no TLS 1.2 suites to try"
    control = LocalTlsServer(tls_files.proxy_cert, tls_files.proxy_key)
    accepted, offerable_weak = {}, []
    try:
        for name in suites:
            context = client_context(ciphers=f"{name}:@SECLEVEL=0")
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            if WEAK.search(name):
                try:
                    handshake(control.port, context, pg=False).close()
                    offerable_weak.append(name)
                except (ssl.SSLError, OSError):
                    pass
            try:
                tls = handshake(tls_proxy.port, context, pg=True)
            except (ssl.SSLError, OSError):
                continue
            accepted[name] = tls.cipher()[0]
            tls.close()
    finally:
        control.close()
    # The control proves the refusals mean something: NULL and anonymous suites were on offer.
    assert any("NULL" in n for n in offerable_weak), f"no NULL suite offerable here: {offerable_weak}"
    assert any(n.startswith(("ADH", "AECDH")) for n in offerable_weak), offerable_weak
    assert accepted, "pgwarden accepted no TLS 1.2 suite at all"
    assert all(STRONG.match(negotiated) for negotiated in accepted.values()), accepted
    assert tls_proxy.alive()


# =============================================================================================
# Upstream verify-full against a fake upstream with made-to-measure certificates

FAKE_SQLSTATE, FAKE_MESSAGE = "P0001", "fake upstream reached"


class CertificateAuthority:
    """A throwaway CA (openssl ca), so that leaves can have any names, dates and purposes."""

    EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = directory / "ca.crt", directory / "ca.key"
        harness.run_checked(["openssl", "req", "-x509", *self.EC, "-keyout", str(self.key), "-out", str(self.cert),
                             "-days", "3", "-subj", "/CN=pgwarden security test CA"])
        (directory / "newcerts").mkdir()
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        self.config = directory / "ca.cnf"
        self.config.write_text(f"""[ca]
default_ca = test_ca
[test_ca]
database = {directory}/index.txt
new_certs_dir = {directory}/newcerts
certificate = {self.cert}
private_key = {self.key}
serial = {directory}/serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
""")

    def leaf(self, name: str, cn: str, san: str | None, eku: str = "serverAuth",
             dates: tuple[str, str] | None = None, signer: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
        """Returns (chain file, key): the leaf, then its signer when that is not the CA."""
        key, csr, crt = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.crt"
        harness.run_checked(["openssl", "req", "-new", *self.EC, "-keyout", str(key), "-out", str(csr),
                             "-subj", f"/CN={cn}"])
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment", f"extendedKeyUsage={eku}"]
        if san:
            lines.append(f"subjectAltName={san}")
        ext.write_text("\n".join(lines) + "\n")
        if signer is None:
            cmd = ["openssl", "ca", "-batch", "-notext", "-config", str(self.config), "-in", str(csr),
                   "-out", str(crt), "-extfile", str(ext)]
            cmd += ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "3"]
            harness.run_checked(cmd)
            return crt, key
        harness.run_checked(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(signer[0]), "-CAkey",
                             str(signer[1]), "-CAcreateserial", "-out", str(crt), "-days", "3", "-extfile", str(ext)])
        chain = self.dir / f"{name}.chain.crt"
        chain.write_text(crt.read_text() + signer[0].read_text())
        return chain, key


class FakeUpstream:
    """Answers SSLRequest with 'S', handshakes with the given certificate, and answers a startup
    packet with a distinctive FATAL error. Counts handshakes and startup packets received."""

    def __init__(self, chain: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(chain, key)
        self.listener = socket.create_server((harness.HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.startups = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            conn.settimeout(5)
            try:
                self._session(conn)
            except (OSError, ssl.SSLError, struct.error):
                pass
            finally:
                conn.close()

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _session(self, conn: socket.socket) -> None:
        request = self._recv_exact(conn, 8)  # the readiness probe connects and leaves: fine
        if struct.unpack("!II", request)[1] != pgwire.SSL_REQUEST_CODE:
            return
        conn.sendall(b"S")
        with self.context.wrap_socket(conn, server_side=True) as tls:
            self.handshakes += 1
            length = struct.unpack("!I", self._recv_exact(tls, 4))[0]
            self._recv_exact(tls, length - 4)
            self.startups += 1
            body = b"SFATAL\0C" + FAKE_SQLSTATE.encode() + b"\0M" + FAKE_MESSAGE.encode() + b"\0\0"
            tls.sendall(b"E" + struct.pack("!I", len(body) + 4) + body)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.listener.close()


@dataclass(frozen=True)
class CertCase:
    id: str
    san: str | None
    server_name: str | None   # [upstream_tls] server_name; None: the upstream host (127.0.0.1)
    accepted: bool
    cn: str = "db.pgwarden.test"
    eku: str = "serverAuth"
    dates: tuple[str, str] | None = None
    signed_by_leaf: bool = False


CERT_CASES = [
    CertCase("san_dns_matches", "DNS:db.pgwarden.test", "db.pgwarden.test", True),
    CertCase("cn_matches_but_san_does_not", "DNS:other.pgwarden.test", "db.pgwarden.test", False),
    CertCase("wildcard_covers_one_label", "DNS:*.pgwarden.test", "db.pgwarden.test", True),
    CertCase("wildcard_does_not_cover_two_labels", "DNS:*.pgwarden.test", "a.db.pgwarden.test", False),
    CertCase("name_as_a_prefix_of_another_domain", "DNS:db.pgwarden.test.evil.example", "db.pgwarden.test", False),
    CertCase("name_with_a_different_first_label", "DNS:evil-db.pgwarden.test", "db.pgwarden.test", False),
    CertCase("ip_san_matches_upstream_address", "IP:127.0.0.1", None, True),
    CertCase("ip_san_of_another_address", "IP:127.0.0.2", None, False),
    CertCase("dns_san_only_for_an_ip_upstream", "DNS:db.pgwarden.test", None, False),
    CertCase("expired", "DNS:db.pgwarden.test", "db.pgwarden.test", False,
             dates=("20200101000000Z", "20200201000000Z")),
    CertCase("not_yet_valid", "DNS:db.pgwarden.test", "db.pgwarden.test", False,
             dates=("20900101000000Z", "20900201000000Z")),
    CertCase("client_auth_purpose_only", "DNS:db.pgwarden.test", "db.pgwarden.test", False, eku="clientAuth"),
    CertCase("signed_by_a_non_ca_leaf", "DNS:db.pgwarden.test", "db.pgwarden.test", False, signed_by_leaf=True),
]


@pytest.fixture(scope="module")
def upstream_ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("sec-upstream-ca"))


@pytest.mark.parametrize("case", CERT_CASES, ids=[c.id for c in CERT_CASES])
def test_upstream_verify_full_checks_the_certificate(pgwarden_factory, upstream_ca, case):
    signer = upstream_ca.leaf(f"{case.id}-signer", "signer.pgwarden.test", "DNS:signer.pgwarden.test") \
        if case.signed_by_leaf else None
    chain, key = upstream_ca.leaf(case.id, case.cn, case.san, eku=case.eku, dates=case.dates, signer=signer)
    fake = FakeUpstream(chain, key)
    try:
        config = f'[upstream_tls]\nmode = "verify-full"\nca = "{upstream_ca.cert}"\n'
        if case.server_name:
            config += f'server_name = "{case.server_name}"\n'
        proxy = pgwarden_factory(config, upstream=f"{harness.HOST}:{fake.port}", wait="tcp")
        with pgwire.RawConnection(proxy.host, proxy.port) as raw:
            result = raw.startup("postgres", password="never-sent-to-an-impostor")
        assert result.error is not None
        if case.accepted:
            assert (result.error["C"], result.error["M"]) == (FAKE_SQLSTATE, FAKE_MESSAGE), result.error
            assert fake.startups == 1
        else:
            assert result.error["S"] == "FATAL"
            assert result.error["C"] == "08006", result.error
            assert result.error["M"].startswith("pgwarden: cannot connect to upstream"), result.error
            # The impostor never saw a byte of the session.
            assert fake.startups == 0, "pgwarden sent the startup packet to a server that failed verification"
        assert proxy.alive()
    finally:
        fake.close()


# =============================================================================================
# SCRAM-SHA-256 through client-side TLS


def test_scram_through_client_tls(tls_proxy, tls_files, pg_server):
    user, password = harness.SCRAM_USER, harness.SCRAM_PASSWORD
    # libpq's default channel_binding=prefer: binding is not offered (the upstream is plain), so
    # plain SCRAM is used, with the client checking pgwarden's certificate.
    with tls_proxy.connect(user=user, password=password, sslmode="verify-full",
                           sslrootcert=str(tls_files.ca_cert)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == (user,)
    # channel_binding=require cannot be met through a TLS-terminating proxy: libpq refuses.
    message = tls_proxy.connect_error(user=user, password=password, sslmode="require", channel_binding="require")
    assert "channel binding" in message
    # A wrong password over TLS is the server's 28P01, relayed.
    with pgwire.RawConnection(tls_proxy.host, tls_proxy.port) as raw:
        raw.start_tls()
        result = raw.startup(user, password="wrong-" + password)
    assert result.error is not None and (result.error["S"], result.error["C"]) == ("FATAL", "28P01")
    # A client that insists on SCRAM-SHA-256-PLUS (not offered) is refused by the server.
    with pgwire.RawConnection(tls_proxy.host, tls_proxy.port) as raw:
        raw.start_tls()
        raw.send_startup(user)
        kind, body = raw.read_message()
        assert kind == "R" and b"SCRAM-SHA-256-PLUS" not in body
        first = b"p=tls-server-end-point,,n=,r=abcdefghijklmnop"
        raw.send(b"p", b"SCRAM-SHA-256-PLUS\0" + struct.pack("!i", len(first)) + first)
        kind, body = raw.read_message()
        assert kind == "E" and pgwire.error_fields(body)["S"] == "FATAL"
        assert raw.at_eof()
    assert tls_proxy.alive()
    with tls_proxy.connect(user=user, password=password, sslmode="require") as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# =============================================================================================
# Admin API token: what test_admin_ops.py does not cover

TOKEN = "s3cret-T0ken"
GUARDED_APP = "sec-guarded-app"


def http_raw(instance: harness.Pgwarden, request: bytes, timeout: float = 5) -> tuple[int, bytes]:
    """Sends `request` as is; returns the status and the rest of what came back, read to EOF."""
    with socket.create_connection((instance.host, instance.admin_port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    assert match, f"no HTTP answer: {data[:200]!r}"
    return int(match.group(1)), data


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BASIC = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
TOKEN_CASES = [
    # (id, request, expected status)
    ("right_token", get("/api/clients", f"Authorization: Bearer {TOKEN}"), 200),
    ("scheme_in_lower_case", get("/api/clients", f"Authorization: bearer {TOKEN}"), 200),
    ("token_in_query_string", get(f"/api/clients?token={TOKEN}"), 401),
    ("access_token_in_query_string", get(f"/api/clients?access_token={TOKEN}"), 401),
    ("basic_scheme", get("/api/clients", f"Authorization: Basic {BASIC}"), 401),
    ("token_scheme", get("/api/clients", f"Authorization: Token {TOKEN}"), 401),
    ("bare_token", get("/api/clients", f"Authorization: {TOKEN}"), 401),
    ("bearer_without_space", get("/api/clients", f"Authorization: Bearer{TOKEN}"), 401),
    ("bearer_without_token", get("/api/clients", "Authorization: Bearer "), 401),
    ("token_prefix", get("/api/clients", f"Authorization: Bearer {TOKEN[:-1]}"), 401),
    ("token_with_suffix", get("/api/clients", f"Authorization: Bearer {TOKEN}x"), 401),
    ("token_case_changed", get("/api/clients", f"Authorization: Bearer {TOKEN.upper()}"), 401),
    ("token_twice", get("/api/clients", f"Authorization: Bearer {TOKEN} {TOKEN}"), 401),
    ("token_in_cookie", get("/api/clients", f"Cookie: token={TOKEN}"), 401),
    ("token_in_other_header", get("/api/clients", f"X-Auth-Token: {TOKEN}"), 401),
    ("wrong_token_then_right_one", get("/api/clients", "Authorization: Bearer wrong",
                                       f"Authorization: Bearer {TOKEN}"), 401),
    ("overlong_authorization_header", get("/api/clients", "Authorization: Bearer " + "A" * 20000), 431),
    ("many_headers", get("/api/clients", *[f"X-Filler-{i}: {'y' * 40}" for i in range(400)]), 431),
    ("throttles_with_basic", get("/api/throttles", f"Authorization: Basic {BASIC}"), 401),
    ("reload_with_token_in_query", f"POST /api/reload?token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
                                   "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(), 401),
    ("http_1_0_without_host", b"GET /api/clients HTTP/1.0\r\n\r\n", 401),
]

# Paths that must not hand out /api data without the token, whatever they route to.
PATH_TRICKS = ["/api/clients/", "//api/clients", "/API/clients", "/api/./clients", "/api/%63lients",
               "/metrics/../api/clients", "/api/clients%00", "/api/clients;x", "/api//clients",
               "http://127.0.0.1/api/clients", "/healthz/../api/clients", "/api/clients?/healthz"]


@pytest.fixture
def guarded_proxy(pgwarden_factory):
    proxy = pgwarden_factory(f'[admin]\ntoken = "{TOKEN}"\n')
    conn = proxy.connect(application_name=GUARDED_APP)
    yield proxy, conn
    conn.close()


def test_admin_token_edge_cases(guarded_proxy):
    proxy, _ = guarded_proxy
    failures = []
    for case_id, request, expected in TOKEN_CASES:
        status, answer = http_raw(proxy, request)
        if status != expected:
            failures.append(f"{case_id}: {status}, expected {expected}: {answer[:200]!r}")
        if status != 200 and GUARDED_APP.encode() in answer:
            failures.append(f"{case_id}: client data in a refused answer")
    for path in PATH_TRICKS:
        status, answer = http_raw(proxy, get(path))
        if status == 200 or GUARDED_APP.encode() in answer:
            failures.append(f"path {path!r} without token: {status} {answer[:200]!r}")
    assert not failures, "\n".join(failures)
    assert proxy.alive()
    assert json.loads(admin_get(proxy, "/api/clients", TOKEN))[0]["application_name"] == GUARDED_APP


def test_admin_doom_and_reload_refused_without_token(guarded_proxy, pg_server):
    proxy, conn = guarded_proxy
    pg_server.query_one("create table if not exists sec_doom_t (id int)")
    [client] = [c for c in json.loads(admin_get(proxy, "/api/clients", TOKEN)) if c["application_name"] == GUARDED_APP]
    conn.execute("begin")
    for auth in ([], ["Authorization: Bearer wrong"], [f"Authorization: Basic {BASIC}"]):
        lines = [f"POST /api/clients/{client['id']}/doom HTTP/1.1", "Host: x", "Content-Length: 0",
                 "Connection: close", *auth]
        status, _ = http_raw(proxy, ("\r\n".join(lines) + "\r\n\r\n").encode())
        assert status == 401
    conn.execute("insert into sec_doom_t values (1)")  # not doomed: writes still work
    conn.execute("rollback")
    status, _ = http_raw(proxy, b"POST /api/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                b"Authorization: Bearer wrong\r\nConnection: close\r\n\r\n")
    assert status == 401
    page = admin_get(proxy, "/metrics").decode()
    for result in ("success", "failure"):
        assert f'pgwarden_config_reloads_total{{result="{result}"}} 0\n' in page, "a refused reload ran"


# =============================================================================================
# Hostile identity values

IDENTITY_CONFIG = """
[identity]
sources = ["comment:client", "setting:pgwarden.client", "application_name", "user"]

[transactions]
nesting = "savepoint"

[[throttle]]
name = "per-client"
rate = 1000000
burst = 1000000
bucket = "client"
action = "delay"

[[rule]]
name = "log-writes"
match = { statements = ["insert"] }
action = "log"
"""

# Each one is built to break out of SQL quoting, comments, log lines, JSON, HTTP or the
# Prometheus text format if it were pasted into any of them unescaped.
HOSTILE_VALUES = {
    "quote": "x'; CREATE TABLE pwned_quote (); --",
    "double_quote": 'x"; CREATE TABLE "pwned_dq" (); --',
    "dollar_quote": "$$; CREATE TABLE pwned_dollar (); $$",
    "tagged_dollar_quote": "$q$; CREATE TABLE pwned_dtag (); $q$",
    "backslashes": "x\\'; CREATE TABLE pwned_bs (); --\\",
    "comment_close": "*/ CREATE TABLE pwned_cc (); /*",
    "line_comment_newline": "--\nCREATE TABLE pwned_lc ();",
    "semicolons": "; ; CREATE TABLE pwned_semi (); ;",
    "newlines_and_log_fields": "a\nb\r\nc\tevent=forged level=error",
    "json_breakout": '","event":"forged","level":"error","x":"',
    "prometheus_breakout": 'x",kind="ddl"} 1e9\npgwarden_forged{a="',
    "http_header_breakout": "x\r\nX-Injected: yes\r\n\r\n",
    "nul_byte": "before\0after; CREATE TABLE pwned_nul ();",
    "unicode": "tenant-ünïcødé-テナント-🚀-\u202eevil\u200b",
    "percent_signs": "%27%3B CREATE TABLE pwned_pct ()%3B--%",
    "huge_100kb": "H" * 100_000,
}


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def comment_tag(value: str) -> str:
    """sqlcommenter style: the value percent-encoded (pgwarden decodes it) in a quoted tag."""
    return f"/* client='{urllib.parse.quote(value, safe='')}' */"


def raw_comment_tag(value: str) -> str | None:
    """The value as is, quote and backslash escaped; None where a comment cannot hold it."""
    if "*/" in value or "/*" in value or "\0" in value:
        return None
    return "/* client='" + value.replace("\\", "\\\\").replace("'", "\\'") + "' */"


@dataclass
class Session:
    """One client's statements and what the server must see for each (None: as sent)."""
    sent: list[str]
    server_sees: list[str]


def identity_session(value: str, n: int) -> Session:
    sent, sees = [], []

    def step(sql: str, server: str | None = None) -> None:
        sent.append(sql)
        sees.append(sql if server is None else server)

    step(f"{comment_tag(value)} INSERT INTO sec_canary VALUES ({n}, 'comment')")
    raw_tag = raw_comment_tag(value)
    if raw_tag:
        step(f"{raw_tag} INSERT INTO sec_canary VALUES ({n}, 'raw comment')")
    if "\0" not in value:  # PostgreSQL text cannot hold NUL
        step(f"SET pgwarden.client = {sql_literal(value)}")
        step(f"INSERT INTO sec_canary VALUES ({n}, 'setting')")
        step("RESET pgwarden.client")
        step(f"SET application_name = {sql_literal(value)}")
        step(f"INSERT INTO sec_canary VALUES ({n}, 'application_name')")
    step("BEGIN")
    step("BEGIN", "SAVEPOINT pgwarden_nested_1")
    step(f"{comment_tag(value)} SELECT 1")
    step("COMMIT", "RELEASE SAVEPOINT pgwarden_nested_1")
    step("COMMIT")
    return Session(sent, sees)


LOG_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(\d+)\] (\w+):  (.*)$")


def server_log_entries(pg_server: harness.PostgresServer, start: int, pid: int) -> list[tuple[str, str]]:
    """(level, message) of each entry the backend `pid` logged after byte `start` of the server
    log; continuation lines (tab-prefixed) are joined back with newlines."""
    with open(pg_server.log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    entries: list[tuple[str, str, str]] = []
    for line in text.split("\n"):
        match = LOG_ENTRY.match(line)
        if match:
            entries.append((match.group(1), match.group(2), match.group(3)))
        elif line.startswith("\t") and entries:
            p, level, message = entries[-1]
            entries[-1] = (p, level, message + "\n" + line[1:])
    return [(level, message) for p, level, message in entries if p == str(pid)]


def executed_statements(pg_server: harness.PostgresServer, start: int, pid: int) -> list[str]:
    return [message[len("statement: "):] for level, message in server_log_entries(pg_server, start, pid)
            if level == "LOG" and message.startswith("statement: ")]


def run_session(proxy: harness.Pgwarden, session: Session, application_name: str) -> int:
    """Runs the statements one Query each over the simple protocol; returns the backend pid."""
    with pgwire.RawConnection(proxy.host, proxy.port, timeout=20) as raw:
        result = raw.startup("postgres", application_name=application_name, options="-c log_statement=all")
        assert result.error is None, result.error
        for sql in session.sent:
            raw.query(sql)
            messages = raw.read_until("Z")
            errors = [pgwire.error_fields(body) for kind, body in messages if kind == "E"]
            assert not errors, f"{sql[:200]!r} failed: {errors}"
        raw.terminate()
        return result.backend_pid


LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"(?:,|$)')


def series_labels(metrics_text: str, family: str) -> list[dict[str, str]]:
    """The label sets of `family`'s samples; fails on anything that does not parse exactly."""
    out = []
    for line in metrics_text.split("\n"):
        if not line.startswith(family + "{"):
            continue
        inner, _, value = line[len(family) + 1:].rpartition("} ")
        float(value)
        labels, pos = {}, 0
        while pos < len(inner):
            match = LABEL.match(inner, pos)
            assert match, f"unparsable labels at {pos}: {line[:300]!r}"
            name = match.group(1)
            assert name not in labels, f"label {name} twice: {line[:300]!r}"
            labels[name] = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), match.group(2))
            pos = match.end()
        out.append(labels)
    return out


def promtool_check(metrics_text: bytes) -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip("promtool is not installed")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=metrics_text, capture_output=True, timeout=60)
    assert result.returncode == 0, f"promtool check metrics: {result.stdout.decode()}{result.stderr.decode()}"


@pytest.fixture
def canary(pg_server):
    pg_server.query_one("drop table if exists sec_canary")
    pg_server.query_one("create table sec_canary (n int, via text)")
    yield
    pg_server.query_one("drop table if exists sec_canary")


def pwned_tables(pg_server) -> list[str]:
    with pg_server.connect() as conn:
        return [r[0] for r in conn.execute("select relname from pg_class where relname like 'pwned%'")]


def test_hostile_identity_values_stay_in_their_place(pgwarden_factory, pg_server, canary):
    proxy = pgwarden_factory(IDENTITY_CONFIG)
    expected_rows = []
    for n, (name, value) in enumerate(HOSTILE_VALUES.items()):
        session = identity_session(value, n)
        start = pg_server.log_path.stat().st_size
        # The startup packet carries the value too (truncated: the packet limit is 10000 bytes).
        app = value.replace("\0", "")[:2000]
        pid = run_session(proxy, session, app)
        # PostgreSQL's own record of what it ran: the client's statements and pgwarden's fixed
        # ones, each exactly as expected, nothing else.
        expected_count = len(session.server_sees)
        executed = harness.wait_until(
            lambda: (got := executed_statements(pg_server, start, pid)) and len(got) >= expected_count and got,
            10, f"the server log of {name}")
        assert executed == session.server_sees, f"{name}: the server ran {executed!r}"
        errors = [m for level, m in server_log_entries(pg_server, start, pid) if level in ("ERROR", "FATAL")]
        assert errors == [], f"{name}: {errors}"
        expected_rows += [(n, "comment")] + ([(n, "raw comment")] if raw_comment_tag(value) else [])
        if "\0" not in value:
            expected_rows += [(n, "setting"), (n, "application_name")]

    assert pwned_tables(pg_server) == []
    with pg_server.connect() as conn:
        assert sorted(conn.execute("select n, via from sec_canary").fetchall()) == sorted(expected_rows)

    # pgwarden did use the values as client names (so the above proves something) ...
    events = json_events(proxy)  # ... and every log line is one whole JSON event
    logged_clients = {e.get("client") for e in events if e["event"] == "rule_matched"}
    for name, value in HOSTILE_VALUES.items():
        assert value in logged_clients, f"{name}: never logged as a client"
    assert [e for e in events if e["event"] == "forged" or "x" in e] == []

    # Metrics: valid text format, every hostile name one exact label value.
    page = admin_get(proxy, "/metrics")
    promtool_check(page)
    statement_series = series_labels(page.decode(), "pgwarden_statements_total")
    assert all(set(labels) == {"kind", "client"} for labels in statement_series)
    assert not any(line.startswith("pgwarden_forged") for line in page.decode().split("\n"))
    clients = {labels["client"] for labels in statement_series}
    for name, value in HOSTILE_VALUES.items():
        assert value in clients, f"{name}: no exact client label"

    # The admin API stays valid JSON with the names in it.
    throttles = json.loads(admin_get(proxy, "/api/throttles"))
    keys = {bucket["key"] for rule in throttles for bucket in rule["buckets"]}
    assert HOSTILE_VALUES["json_breakout"] in keys and HOSTILE_VALUES["unicode"] in keys
    assert proxy.alive()


class TextLogPgwarden(harness.Pgwarden):
    """A pgwarden writing its log as text (the harness's instances write JSON)."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--log-format") + 1] = "text"
        return cmd


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z (debug|info|warning|error|critical) [a-z_]+( |$)")


def test_hostile_identity_values_keep_text_log_lines_whole(pg_server, tmp_path, request, canary):
    proxy = TextLogPgwarden(tmp_path / "pgw-text", pg_server.port, IDENTITY_CONFIG)
    request.node.pgwarden_instances = [proxy]
    proxy.start()
    try:
        for n, value in enumerate(HOSTILE_VALUES.values()):
            session = Session([f"{comment_tag(value)} INSERT INTO sec_canary VALUES ({n}, 'text')"], [])
            run_session(proxy, session, "sec-text-log")
        lines = proxy.log_text().split("\n")
        assert lines[-1] == ""
        bad = [line[:200] for line in lines[:-1] if not TEXT_LINE.match(line)]
        assert bad == [], "log lines that are not whole events:\n" + "\n".join(map(repr, bad))
        matched = [line for line in lines if " rule_matched " in line]
        assert len(matched) == len(HOSTILE_VALUES)
        assert any('client="a\\nb\\r\\nc\\tevent=forged level=error"' in line for line in matched)
    finally:
        proxy.stop()


# =============================================================================================
# Found by adversarial review; fixed, kept as regressions


@pytest.mark.parametrize("vector", ["comment_tag_percent_ff", "latin1_setting", "startup_application_name"])
def test_non_utf8_client_names_keep_metrics_valid(pgwarden_factory, vector):
    proxy = pgwarden_factory(IDENTITY_CONFIG)
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        if vector == "startup_application_name":
            body = struct.pack("!I", pgwire.PROTOCOL_3_0) + b"user\0postgres\0application_name\0app\xff\xfe\0\0"
            raw.send_untyped(body)
            assert raw.read_until("ZE")[-1][0] == "Z"
            raw.query("select 1")
        elif vector == "latin1_setting":
            assert raw.startup("postgres", client_encoding="LATIN1").error is None
            raw.send(b"Q", b"set pgwarden.client = 'caf\xe9'; select 1\0")  # 'café' in LATIN1
        else:
            assert raw.startup("postgres").error is None
            raw.query("/* client='bad%FFname' */ select 1")
        assert [k for k, _ in raw.read_until("Z") if k == "E"] == []
    promtool_check(admin_get(proxy, "/metrics"))


def test_doomed_rollback_to_with_a_trailing_line_comment(pgwarden_factory, pg_server):
    proxy = pgwarden_factory()
    pg_server.query_one("create table if not exists sec_rbto (id int)")
    with proxy.connect(application_name="sec-rbto") as conn:
        conn.execute("begin")
        conn.execute("savepoint s")
        conn.execute("insert into sec_rbto values (1)")
        [client] = [c for c in json.loads(admin_get(proxy, "/api/clients")) if c["application_name"] == "sec-rbto"]
        request = urllib.request.Request(f"http://{proxy.host}:{proxy.admin_port}/api/clients/{client['id']}/doom",
                                         method="POST", data=b"")
        urllib.request.urlopen(request, timeout=5).close()
        try:
            conn.execute("rollback to savepoint s -- back to before the insert")
        except psycopg.Error as e:
            raise AssertionError(f"ROLLBACK TO failed: {e.sqlstate} {e}") from None
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("rollback")
