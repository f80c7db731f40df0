# Malformed and hostile input replayed against a running pgwarden over real sockets.
#
# CASES is the catalogue: one row per input, with what pgwarden must answer (SPEC.md
# "Errors": a malformed message is FATAL 08P01 "pgwarden: protocol violation" and the
# connection is closed; where the protocol gives no way to answer, a clean close; where the
# message is well framed and only the server can judge it, the server's own error, relayed).
# After every row: pgwarden is alive, a well-behaved client connected before the row still
# works, and nothing of the hostile connection is left on the server. At the end of the
# module pgwarden's descriptors are back at their baseline.
from __future__ import annotations

import json
import selectors
import socket
import ssl
import struct
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

import psycopg
import pytest

import harness
import pgwire

pytestmark = pytest.mark.proxy_only

AUTH_TIMEOUT = 2.0 if harness.sanitized() else 1.0
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_STATEMENT_BYTES = 64 * 1024
CONFIG = f"""
[proxy]
auth_timeout = "{int(AUTH_TIMEOUT * 1000)}ms"
max_message_bytes = "{MAX_MESSAGE_BYTES}"
max_statement_bytes = "{MAX_STATEMENT_BYTES}"
"""
READ_TIMEOUT = 10.0  # every socket read is bounded by this

# ---------------------------------------------------------------------------------------------
# Byte builders


def i16(n: int) -> bytes:
    return struct.pack("!h", n)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def i32(n: int) -> bytes:
    return struct.pack("!i", n)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def msg(kind: bytes, body: bytes = b"") -> bytes:
    """A typed message: type byte, length (counting itself), body."""
    return kind + u32(len(body) + 4) + body


def packet(body: bytes) -> bytes:
    """An untyped startup-phase packet: length (counting itself), body."""
    return u32(len(body) + 4) + body


V3 = u32(pgwire.PROTOCOL_3_0)
SSL_REQUEST = packet(u32(pgwire.SSL_REQUEST_CODE))
GSSENC_REQUEST = packet(u32(pgwire.GSSENC_REQUEST_CODE))


def startup_body(app: bytes, *extra: tuple[bytes, bytes], user: bytes = b"postgres", protocol: bytes = V3) -> bytes:
    body = protocol + b"user\0" + user + b"\0database\0postgres\0application_name\0" + app + b"\0"
    for key, value in extra:
        body += key + b"\0" + value + b"\0"
    return body + b"\0"


def startup(app: bytes, *extra: tuple[bytes, bytes], user: bytes = b"postgres", protocol: bytes = V3) -> bytes:
    return packet(startup_body(app, *extra, user=user, protocol=protocol))


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


def parse(sql: bytes, types: list[int] | tuple[int, ...] = (), name: bytes = b"") -> bytes:
    return msg(b"P", name + b"\0" + sql + b"\0" + u16(len(types)) + b"".join(u32(t) for t in types))


def bind(values: list[bytes], portal: bytes = b"", statement: bytes = b"") -> bytes:
    body = portal + b"\0" + statement + b"\0" + u16(0) + u16(len(values))
    body += b"".join(i32(len(v)) + v for v in values)
    return msg(b"B", body + u16(0))


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return msg(b"E", portal + b"\0" + u32(max_rows))


SYNC, FLUSH, TERMINATE = msg(b"S"), msg(b"H"), msg(b"X")
COPY_IN = query(b"create temp table hostile_copy (a text); copy hostile_copy from stdin")


def cancel_request(pid: int, secret: int) -> bytes:
    return packet(u32(pgwire.CANCEL_REQUEST_CODE) + u32(pid) + i32(secret))


# ---------------------------------------------------------------------------------------------
# What pgwarden must do with each input


@dataclass(frozen=True)
class Expect:
    """kind:
    violation  FATAL 08P01 "pgwarden: protocol violation" (detail starts with `detail`), then EOF
    fatal      FATAL `code` whose message starts with `message` (pgwarden's or the server's), then EOF
    error      the server's ERROR `code` relayed up to ReadyForQuery; the session goes on
    answers    exactly the message types `types` (DataRow values `values`); the session goes on
    login      the connection reaches ReadyForQuery (after sending `then`, if given)
    closed     EOF with nothing (more) said
    dropped    EOF with nothing (more) said, once auth_timeout has passed
    open       nothing said, connection kept open (a partial message: the peer waits for the rest)
    hangup     the client closes right after sending; nothing to observe but the aftermath
    ended      whatever the session had produced (no error), then EOF
    """
    kind: str
    code: str = ""
    message: str = ""
    detail: str = ""
    types: str = ""
    values: tuple = ()
    prefix: bytes = b""   # raw bytes before any message (the answer to SSLRequest/GSSENCRequest)
    then: bytes = b""     # for login: sent after the prefix was read


def violation(detail: str = "", prefix: bytes = b"") -> Expect:
    return Expect("violation", code="08P01", message="pgwarden: protocol violation", detail=detail, prefix=prefix)


def fatal(code: str, message: str, prefix: bytes = b"") -> Expect:
    return Expect("fatal", code=code, message=message, prefix=prefix)


def error(code: str, message: str) -> Expect:
    return Expect("error", code=code, message=message)


def answers(types: str, *values: bytes) -> Expect:
    return Expect("answers", types=types, values=values)


def login(prefix: bytes = b"", then: bytes = b"", types: str = "") -> Expect:
    return Expect("login", prefix=prefix, then=then, types=types)


CLOSED, DROPPED, OPEN, HANGUP, ENDED = (Expect(k) for k in ("closed", "dropped", "open", "hangup", "ended"))


Payload = bytes | Callable[["Ctx"], bytes]


@dataclass(frozen=True)
class Case:
    id: str
    phase: str  # pre | auth | post (plain pgwarden); tls-pre | tls-inside | tls-post (TLS pgwarden)
    send: Payload
    expect: Expect
    # Sent in pieces (with a short pause between them) rather than in one write.
    pieces: int = 1


@dataclass
class Ctx:
    app: bytes  # application_name of the hostile connection, to find its server backend
    bystander_pid: int


def with_app(build: Callable[[bytes], bytes]) -> Callable[[Ctx], bytes]:
    return lambda ctx: build(ctx.app)


def many_startup_parameters(app: bytes, count: int) -> bytes:
    # Two-byte names keep 2001 of them under the 10000-byte packet limit.
    names = [bytes([0x21 + i // 90, 0x21 + i % 90]) for i in range(count)]
    return startup(app, *[(n, b"") for n in names])


def oversized_startup(app: bytes) -> bytes:
    return startup(app, (b"options", b"-c search_path=" + b"x" * 20000))


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: pgwarden\r\n\r\n"

CASES: list[Case] = [
    # -- before startup: lengths ------------------------------------------------------------------------
    Case("startup_length_negative", "pre", i32(-1) + V3, violation("invalid length of startup packet")),
    Case("startup_length_zero", "pre", u32(0) + V3, violation("invalid length of startup packet")),
    Case("startup_length_3", "pre", u32(3) + V3, violation("invalid length of startup packet")),
    Case("startup_length_7", "pre", u32(7) + V3, violation("invalid length of startup packet")),
    Case("startup_length_2gb", "pre", u32(2**31 - 1) + V3, violation("invalid length of startup packet")),
    Case("startup_length_10001", "pre", u32(10001) + V3 + b"\0" * 64, violation("invalid length of startup packet")),
    Case("startup_oversized_20kb", "pre", with_app(oversized_startup), violation("invalid length of startup packet")),
    # -- before startup: messages that belong later, or to the other side --------------------------------
    Case("query_before_startup", "pre", query(b"select 1"), violation("invalid length of startup packet")),
    Case("terminate_before_startup", "pre", TERMINATE, violation("invalid length of startup packet")),
    Case("ready_for_query_before_startup", "pre", msg(b"Z", b"I"), violation("invalid length of startup packet")),
    Case("http_request_before_startup", "pre", HTTP_REQUEST, violation("invalid length of startup packet")),
    # -- startup packet contents ---------------------------------------------------------------------------
    Case("startup_protocol_4_0", "pre", with_app(lambda a: startup(a, protocol=u32(4 << 16))),
         fatal("0A000", "pgwarden: unsupported frontend protocol 4.0")),
    Case("startup_protocol_2_0", "pre", with_app(lambda a: startup(a, protocol=u32(2 << 16))),
         fatal("0A000", "pgwarden: unsupported frontend protocol 2.0")),
    Case("startup_protocol_1234_5681", "pre", packet(u32(1234 << 16 | 5681) + b"\0" * 8),
         fatal("0A000", "pgwarden: unsupported frontend protocol")),
    # A newer 3.x minor is the server's to negotiate (NegotiateProtocolVersion), as PostgreSQL does.
    Case("startup_protocol_3_99", "pre", with_app(lambda a: startup(a, protocol=u32(3 << 16 | 99))),
         login(types="v")),
    Case("startup_value_without_nul", "pre", with_app(lambda a: packet(V3 + b"user\0postgres\0application_name\0" + a)),
         violation("malformed startup packet")),
    Case("startup_without_terminator", "pre", with_app(lambda a: packet(startup_body(a)[:-1])),
         violation("malformed startup packet")),
    Case("startup_key_without_value", "pre", packet(V3 + b"user\0postgres\0application_name\0"),
         violation("malformed startup packet")),
    Case("startup_junk_after_terminator", "pre", with_app(lambda a: packet(startup_body(a) + b"junk\0")),
         violation("malformed startup packet")),
    # Stricter than PostgreSQL (which takes the last): pgwarden and the server must never
    # disagree about who the client is.
    Case("startup_duplicate_user", "pre", with_app(lambda a: startup(a, (b"user", b"someone_else"))),
         violation("malformed startup packet")),
    Case("startup_duplicate_application_name", "pre", with_app(lambda a: startup(a, (b"application_name", b"x"))),
         violation("malformed startup packet")),
    Case("startup_2001_parameters", "pre", with_app(lambda a: many_startup_parameters(a, 2001)),
         violation("malformed startup packet")),
    Case("startup_without_user", "pre", with_app(lambda a: packet(V3 + b"application_name\0" + a + b"\0\0")),
         fatal("28000", "no PostgreSQL user name specified")),
    Case("startup_unknown_setting", "pre", with_app(lambda a: startup(a, (b"hostile_no_such_guc", b"1"))),
         fatal("42704", 'unrecognized configuration parameter "hostile_no_such_guc"')),
    Case("startup_byte_by_byte", "pre", with_app(startup), login(), pieces=40),
    # -- SSLRequest / GSSENCRequest (no TLS configured) ------------------------------------------------------
    Case("sslrequest_refused_then_plain_startup", "pre", SSL_REQUEST,
         login(prefix=b"N", then=startup(b"hostile-sslrequest_refused_then_plain_startup"))),
    Case("sslrequest_then_garbage", "pre", SSL_REQUEST + HTTP_REQUEST,
         violation("invalid length of startup packet", prefix=b"N")),
    Case("sslrequest_with_trailing_bytes", "pre", packet(u32(pgwire.SSL_REQUEST_CODE) + b"xxxx"),
         violation("malformed startup packet")),
    Case("sslrequest_twice", "pre", SSL_REQUEST * 2, violation("duplicate SSLRequest", prefix=b"N")),
    Case("gssencrequest_then_startup", "pre", GSSENC_REQUEST,
         login(prefix=b"N", then=startup(b"hostile-gssencrequest_then_startup"))),
    Case("gssencrequest_twice", "pre", GSSENC_REQUEST * 2, violation("duplicate GSSENCRequest", prefix=b"N")),
    Case("gssencrequest_then_silence", "pre", GSSENC_REQUEST, Expect("dropped", prefix=b"N")),
    # -- CancelRequest ------------------------------------------------------------------------------------
    Case("cancel_length_12", "pre", packet(u32(pgwire.CANCEL_REQUEST_CODE) + u32(1)), violation("malformed startup")),
    Case("cancel_length_20", "pre", packet(u32(pgwire.CANCEL_REQUEST_CODE) + u32(1) + u32(2) + u32(3)),
         violation("malformed startup packet")),
    Case("cancel_random_key", "pre", cancel_request(123456, 0x1234567), CLOSED),
    Case("cancel_bystander_pid_wrong_key", "pre", lambda ctx: cancel_request(ctx.bystander_pid, 0x7EADBEEF), CLOSED),
    # -- slow and vanishing clients before login ---------------------------------------------------------
    Case("nothing_then_silence", "pre", b"", DROPPED),
    Case("half_length_word_then_silence", "pre", b"\0\0", DROPPED),
    Case("half_startup_then_silence", "pre", with_app(lambda a: startup(a)[:20]), DROPPED),
    Case("half_startup_then_close", "pre", with_app(lambda a: startup(a)[:20]), HANGUP),
    Case("startup_then_close_at_once", "pre", with_app(startup), HANGUP),
    # -- during authentication (SCRAM: the server waits for the client's SASL message) ---------------------
    Case("auth_query_instead_of_password", "auth", query(b"select 1"),
         violation("expected an authentication response message")),
    Case("auth_password_message_70kb", "auth", msg(b"p", b"x" * 70000),
         violation("expected an authentication response message")),
    Case("auth_password_negative_length", "auth", b"p" + i32(-1), violation("expected an authentication response")),
    Case("auth_sasl_garbage", "auth", msg(b"p", b"garbage\0"),
         fatal("08P01", "client selected an invalid SASL authentication mechanism")),
    Case("auth_sasl_plus_without_tls", "auth", msg(b"p", b"SCRAM-SHA-256-PLUS\0" + i32(5) + b"p=x,,"),
         fatal("08P01", "client selected an invalid SASL authentication mechanism")),
    Case("auth_then_silence", "auth", b"", DROPPED),
    Case("auth_then_close", "auth", b"", HANGUP),
    # -- after login: bad lengths ---------------------------------------------------------------------------
    Case("length_negative", "post", b"Q" + i32(-1), violation("The client sent a malformed")),
    Case("length_zero", "post", b"Q" + u32(0), violation()),
    Case("length_3", "post", b"Q" + u32(3), violation()),
    Case("length_2gb", "post", b"Q" + u32(2**31 - 1) + b"select", violation()),
    Case("length_over_max_message_bytes", "post", b"Q" + u32(MAX_MESSAGE_BYTES + 5) + b"select 1", violation()),
    # -- after login: types a client may not send ---------------------------------------------------------
    Case("unknown_type_z", "post", msg(b"z", b"abc"), violation()),
    Case("unknown_type_nul", "post", msg(b"\0", b""), violation()),
    Case("backend_type_row_description", "post", msg(b"T", u16(0)), violation()),
    Case("backend_type_ready_for_query", "post", msg(b"Z", b"I"), violation()),
    Case("backend_type_authentication", "post", msg(b"R", u32(0)), violation()),
    Case("backend_type_backend_key_data", "post", msg(b"K", u32(1) + u32(2)), violation()),
    Case("backend_type_notification", "post", msg(b"A", u32(1) + b"chan\0payload\0"), violation()),
    # 'p' is a frontend type, for authentication only: the server itself refuses it later.
    Case("password_message_after_login", "post", msg(b"p", b"secret\0"),
         fatal("08P01", "invalid frontend message type 112")),
    # -- after login: strings without terminators, and other malformed bodies --------------------------------
    Case("query_without_nul", "post", msg(b"Q", b"select 1"), error("08P01", "invalid string in message")),
    Case("query_embedded_nul", "post", msg(b"Q", b"select 1\0create table hostile_after_nul ()\0"),
         error("08P01", "invalid message format")),
    Case("parse_without_nul", "post", msg(b"P", b"\0select 1") + SYNC, error("08P01", "invalid string in message")),
    Case("bind_without_nul", "post", msg(b"B", b"portal") + SYNC, error("08P01", "invalid string in message")),
    Case("bind_negative_value_length", "post",
         parse(b"select $1::text") + msg(b"B", b"\0\0" + u16(0) + u16(1) + i32(-5) + u16(0)) + SYNC,
         error("08P01", "")),
    Case("describe_bad_subtype", "post", msg(b"D", b"Xname\0") + SYNC,
         error("08P01", "invalid DESCRIBE message subtype")),
    Case("close_bad_subtype", "post", msg(b"C", b"Xname\0") + SYNC, error("08P01", "invalid CLOSE message subtype")),
    Case("execute_truncated_body", "post", msg(b"E", b"\0\0") + SYNC, error("08P01", "insufficient data left")),
    Case("function_call_unknown_oid", "post", msg(b"F", u32(1) + i16(0) + i16(0) + i16(0)),
         error("42883", "function with OID 1 does not exist")),
    Case("function_call_65535_arguments", "post", msg(b"F", u32(1598) + i16(0) + u16(65535) + i16(0)),
         error("08P01", "function call message contains 65535 arguments")),
    # -- after login: big but legal ---------------------------------------------------------------------
    Case("bind_10000_params_for_none", "post", parse(b"select 1") + bind([b"1"] * 10000) + execute() + SYNC,
         error("08P01", "bind message supplies 10000 parameters")),
    Case("bind_10000_params", "post",
         parse(b"select $10000::int", [23] * 10000) + bind([b"7"] * 10000) + execute() + SYNC,
         answers("12DCZ", b"7")),
    Case("parse_65535_param_types", "post",
         parse(b"select $65535::int", [23] * 65535) + bind([b"9"] * 65535) + execute() + SYNC,
         answers("12DCZ", b"9")),
    Case("query_over_max_statement_bytes", "post",
         query(b"select '" + b"x" * MAX_STATEMENT_BYTES + b"'"), error("54000", "pgwarden: statement too large")),
    Case("parse_over_max_statement_bytes", "post",
         parse(b"select '" + b"x" * MAX_STATEMENT_BYTES + b"'") + bind([]) + execute() + SYNC,
         error("54000", "pgwarden: statement too large")),
    Case("empty_query", "post", query(b""), answers("IZ")),
    Case("sync_storm", "post", SYNC * 5000, answers("Z" * 5000)),
    Case("flush_storm", "post", FLUSH * 5000, answers("")),
    Case("flush_and_sync_storm_mid_batch", "post", parse(b"select 5") + FLUSH * 2000 + bind([]) + execute() + SYNC,
         answers("12DCZ", b"5")),
    Case("byte_by_byte_batch", "post", parse(b"select 6") + bind([]) + execute() + SYNC,
         answers("12DCZ", b"6"), pieces=30),
    # -- after login: COPY messages out of place -------------------------------------------------------------
    # PostgreSQL ignores CopyData/CopyDone/CopyFail outside COPY (protocol docs, "COPY Operations").
    Case("copy_data_outside_copy", "post", msg(b"d", b"hello\n"), answers("")),
    Case("copy_done_outside_copy", "post", msg(b"c"), answers("")),
    Case("copy_fail_outside_copy", "post", msg(b"f", b"why\0"), answers("")),
    Case("copy_in_with_sync_and_flush", "post",
         COPY_IN + msg(b"d", b"a\n") + SYNC + FLUSH + msg(b"d", b"b\n") + msg(b"c"), answers("CGCZ")),
    Case("copy_in_data_length_2gb", "post", COPY_IN + b"d" + u32(2**31 - 1) + b"abc", violation()),
    Case("copy_in_unknown_type", "post", COPY_IN + msg(b"z", b"abc"), violation()),
    Case("copy_in_query_instead_of_data", "post", COPY_IN + query(b"select 1"),
         fatal("08P01", "terminating connection because protocol synchronization was lost")),
    # -- after login: ending and vanishing -------------------------------------------------------------
    Case("terminate_mid_batch", "post", parse(b"select pg_sleep(0.2)") + bind([]) + execute() + TERMINATE + SYNC,
         ENDED),
    Case("terminate_with_body", "post", msg(b"X", b"junk"), ENDED),
    Case("truncated_header_then_close", "post", b"Q\0\0", HANGUP),
    Case("truncated_body_then_close", "post", query(b"select 1")[:8], HANGUP),
    Case("truncated_body_then_silence", "post", query(b"select 1")[:8], OPEN),
    Case("pipeline_without_reading_then_close", "post", query(b"select repeat('x', 100000)") * 300, HANGUP),
    # -- TLS configured -----------------------------------------------------------------------------------
    Case("tls_sslrequest_then_garbage", "tls-pre", SSL_REQUEST + HTTP_REQUEST, Expect("closed", prefix=b"S")),
    # Plain bytes sent behind SSLRequest must not be read as the startup (CVE-2021-23222).
    Case("tls_sslrequest_then_plain_startup", "tls-pre", with_app(lambda a: SSL_REQUEST + startup(a)),
         Expect("closed", prefix=b"S")),
    Case("tls_sslrequest_then_silence", "tls-pre", SSL_REQUEST, Expect("dropped", prefix=b"S")),
    Case("tls_direct_client_hello", "tls-pre", bytes.fromhex("160301020001") + b"\0" * 64,
         violation("invalid length of startup packet")),
    Case("tls_sslrequest_twice_inside_tls", "tls-inside", SSL_REQUEST, violation("duplicate SSLRequest")),
    Case("tls_handshake_then_silence", "tls-inside", b"", DROPPED),
    Case("tls_startup_length_negative_inside_tls", "tls-inside", i32(-1) + V3,
         violation("invalid length of startup packet")),
    Case("tls_length_negative_after_login", "tls-post", b"Q" + i32(-1), violation()),
    Case("tls_query_without_nul_after_login", "tls-post", msg(b"Q", b"select 1"),
         error("08P01", "invalid string in message")),
    Case("tls_truncated_then_close", "tls-post", query(b"select 1")[:7], HANGUP),
]


# ---------------------------------------------------------------------------------------------
# Rigs: one pgwarden per module (plain, and with client TLS), each with a bystander client


def tls_config(tls_files: harness.TlsFiles) -> str:
    return CONFIG + f'\n[tls]\nmode = "allow"\ncert = "{tls_files.proxy_cert}"\nkey = "{tls_files.proxy_key}"\n'


@dataclass
class Rig:
    warden: harness.Pgwarden
    bystander: psycopg.Connection
    fd_baseline: int
    cases_run: list[str] = field(default_factory=list)


def start_rig(name: str, config: str, pg_server, tmp_path_factory) -> Rig:
    warden = harness.Pgwarden(tmp_path_factory.mktemp(f"pgw-hostile-{name}"), pg_server.port, config)
    warden.start()
    bystander = warden.connect(application_name=f"hostile-bystander-{name}", sslmode="disable")
    assert bystander.execute("select 1").fetchone() == (1,)
    # The readiness probe's connection and the start-up query come and go: settle first.
    harness.wait_until(lambda: metric(warden, "pgwarden_client_connections") == 1, 10, "one client connection")
    return Rig(warden, bystander, warden.fd_count())


def stop_rig(rig: Rig) -> None:
    rig.bystander.close()
    rig.warden.stop()


@pytest.fixture(scope="module")
def plain_rig(pg_server, tmp_path_factory):
    rig = start_rig("plain", CONFIG, pg_server, tmp_path_factory)
    yield rig
    stop_rig(rig)


@pytest.fixture(scope="module")
def tls_rig(pg_server, tls_files, tmp_path_factory):
    rig = start_rig("tls", tls_config(tls_files), pg_server, tmp_path_factory)
    yield rig
    stop_rig(rig)


def metric(warden: harness.Pgwarden, name: str) -> float:
    with urllib.request.urlopen(f"http://{warden.host}:{warden.admin_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def started_sessions(warden: harness.Pgwarden, app: str) -> list[dict]:
    events = []
    for line in warden.log_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "session_started" and event.get("application_name") == app:
            events.append(event)
    return events


# ---------------------------------------------------------------------------------------------
# Running one case


class Peer(pgwire.RawConnection):
    """A raw connection that reads with a bound and reports EOF as data, not as an exception."""

    def read_raw(self, n: int) -> bytes:
        return self._recv_exact(n)

    def read_to_eof(self, timeout: float = READ_TIMEOUT) -> bytes:
        data, self._buffer = self._buffer, b""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"still open after {timeout}s (read so far: {data[:200]!r})")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
                return data
            except socket.timeout:
                continue
            if not chunk:
                return data
            data += chunk

    def silent_for(self, seconds: float) -> bool:
        """True when nothing arrives (and the peer does not close) for `seconds`."""
        if self._buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(1)
        except socket.timeout:
            return True
        except ssl.SSLError as e:
            if "timed out" in str(e):
                return True
            raise
        self._buffer += chunk
        return False


def split(data: bytes, pieces: int) -> list[bytes]:
    if pieces <= 1 or len(data) <= 1:
        return [data]
    size = max(1, -(-len(data) // pieces))
    return [data[i:i + size] for i in range(0, len(data), size)]


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def decode_messages(data: bytes) -> list[tuple[str, bytes]]:
    messages = []
    while data:
        assert len(data) >= 5, f"trailing bytes {data!r}"
        length = struct.unpack("!I", data[1:5])[0]
        assert len(data) >= length + 1, f"truncated message {data[:40]!r}"
        messages.append((chr(data[0]), data[5:length + 1]))
        data = data[length + 1:]
    return messages


def assert_usable(peer: Peer) -> None:
    peer.query("select 42")
    messages = peer.read_until("Z")
    rows = [pgwire.data_row_values(body) for kind, body in messages if kind == "D"]
    assert rows == [[b"42"]], f"session not usable after the case: {messages}"


def assert_final_error(peer: Peer, expect: Expect) -> None:
    """Reads to EOF: the last thing said must be the FATAL error expected."""
    data = peer.read_to_eof()
    messages = decode_messages(data)
    errors = [pgwire.error_fields(body) for kind, body in messages if kind == "E"]
    assert errors, f"closed without an ErrorResponse; got {messages}"
    fields = errors[-1]
    assert (fields.get("S"), fields.get("C")) == ("FATAL", expect.code), fields
    assert fields.get("M", "").startswith(expect.message), fields
    if expect.detail:
        assert fields.get("D", "").startswith(expect.detail), fields
    assert messages[-1][0] == "E", f"messages after the FATAL error: {messages}"


def observe(peer: Peer, expect: Expect, started: float) -> None:
    if expect.prefix:
        got = peer.read_raw(len(expect.prefix))
        assert got == expect.prefix, f"expected {expect.prefix!r} first, got {got!r}"
    kind = expect.kind
    if kind in ("violation", "fatal"):
        assert_final_error(peer, expect)
    elif kind == "error":
        messages = peer.read_until("Z")
        errors = [pgwire.error_fields(body) for k, body in messages if k == "E"]
        assert len(errors) == 1, messages
        assert (errors[0]["S"], errors[0]["C"]) == ("ERROR", expect.code), errors[0]
        assert errors[0]["M"].startswith(expect.message), errors[0]
        assert_usable(peer)
    elif kind == "answers":
        messages = [peer.read_message() for _ in expect.types]
        assert "".join(k for k, _ in messages) == expect.types, messages[:20]
        rows = [pgwire.data_row_values(body)[0] for k, body in messages if k == "D"]
        assert tuple(rows) == expect.values
        assert peer.silent_for(0.2), "more answers than expected"
        assert_usable(peer)
    elif kind == "login":
        if expect.then:
            peer.sock.sendall(expect.then)
        messages = peer.read_until("ZE")
        assert messages[-1][0] == "Z", messages
        assert "".join(k for k, _ in messages).startswith(expect.types), messages
        assert_usable(peer)
    elif kind in ("closed", "dropped"):
        rest = peer.read_to_eof(timeout=AUTH_TIMEOUT + READ_TIMEOUT)
        if kind == "dropped":
            waited = time.monotonic() - started
            assert waited >= AUTH_TIMEOUT * 0.5, f"dropped after {waited:.2f}s, before auth_timeout"
            assert waited <= AUTH_TIMEOUT + 5, f"dropped only after {waited:.2f}s"
            assert rest == b"", f"said {rest!r} before dropping"
        elif expect.prefix != b"S":  # after 'S' a TLS alert may follow
            assert rest == b"", f"said {rest!r} before closing"
    elif kind == "open":
        assert peer.silent_for(1.0), "answered or closed a connection with a partial message"
    elif kind == "ended":
        messages = decode_messages(peer.read_to_eof())
        assert all(k != "E" for k, _ in messages), messages
    elif kind == "hangup":
        pass
    else:
        raise AssertionError(f"unknown expectation {kind}")


def connect_peer(rig: Rig, case: Case, ctx: Ctx) -> Peer:
    peer = Peer(rig.warden.host, rig.warden.port, timeout=READ_TIMEOUT)
    app = ctx.app.decode()
    if case.phase in ("tls-inside", "tls-post"):
        peer.start_tls()
    if case.phase in ("post", "tls-post"):
        result = peer.startup("postgres", application_name=app)
        assert result.error is None, result.error
    elif case.phase == "auth":
        peer.send_startup(harness.SCRAM_USER, application_name=app)
        kind, body = peer.read_message()
        assert (kind, struct.unpack("!I", body[:4])[0]) == ("R", 10), "expected a SASL request"
    return peer


# pgwarden bug: these violations are answered correctly (FATAL 08P01, closed) but neither
# counted in pgwarden_protocol_errors_total nor logged as protocol_violation
# (proxy/client_session.cpp: startup() for the duplicate requests, authenticate() for a bad
# authentication response). test_violations_not_counted_yet holds them until fixed.
def run_case(rig: Rig, pg_server, case: Case, check_counter: bool = True) -> None:
    ctx = Ctx(app=f"hostile-{case.id}".encode(), bystander_pid=rig.bystander.info.backend_pid)
    protocol_errors = metric(rig.warden, "pgwarden_protocol_errors_total")
    peer = connect_peer(rig, case, ctx)
    try:
        data = case.send(ctx) if callable(case.send) else case.send
        started = time.monotonic()
        for i, piece in enumerate(split(data, case.pieces)):
            if i:
                time.sleep(0.005)
            peer.sock.sendall(piece)
        if case.expect.kind == "hangup":
            peer.close()
        else:
            observe(peer, case.expect, started)
    finally:
        peer.close()
    rig.cases_run.append(case.id)

    # The aftermath: pgwarden alive, the bystander unaffected, nothing left on the server.
    assert rig.warden.alive(), f"pgwarden died:\n{rig.warden.log_tail()}"
    assert rig.bystander.execute("select 'still here'").fetchone() == ("still here",)
    app = ctx.app.decode()
    harness.wait_until(lambda: pg_server.backend_pids(app) == [], 10, f"server backends of {app} to end")
    if case.expect.kind == "violation" and check_counter:
        # "connections closed for breaking the protocol or a limit (08P01)", docs/operations.md
        assert metric(rig.warden, "pgwarden_protocol_errors_total") == protocol_errors + 1
    if case.phase in ("pre", "tls-pre") and case.expect.kind not in ("login",):
        assert started_sessions(rig.warden, app) == [], "a refused connection got a session"


PLAIN_CASES = [c for c in CASES if not c.phase.startswith("tls")]
TLS_CASES = [c for c in CASES if c.phase.startswith("tls")]


def test_catalogue_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


@pytest.mark.parametrize("case", PLAIN_CASES, ids=[c.id for c in PLAIN_CASES])
def test_hostile_input(plain_rig, pg_server, case, request):
    request.node.pgwarden_instances = [plain_rig.warden]
    run_case(plain_rig, pg_server, case)


@pytest.mark.parametrize("case", TLS_CASES, ids=[c.id for c in TLS_CASES])
def test_hostile_input_with_tls(tls_rig, pg_server, case, request):
    request.node.pgwarden_instances = [tls_rig.warden]
    run_case(tls_rig, pg_server, case)


def test_no_sql_ran_from_a_malformed_query(pg_server, plain_rig):
    """query_embedded_nul carried a second statement after the NUL: it must not have run."""
    if "query_embedded_nul" not in plain_rig.cases_run:
        pytest.skip("query_embedded_nul did not run")
    assert pg_server.query_one("select to_regclass('public.hostile_after_nul') is null") is True


# ---------------------------------------------------------------------------------------------
# Slow clients


def still_open(sock: socket.socket) -> bool:
    """For a non-blocking socket: the peer has neither closed it nor sent anything."""
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def test_slow_clients_are_dropped_after_auth_timeout_while_others_get_in(plain_rig, pg_server, request):
    request.node.pgwarden_instances = [plain_rig.warden]
    warden = plain_rig.warden
    count = harness.scaled(200, 60)
    half_startup = startup(b"hostile-slow")[:17]
    slow: list[socket.socket] = []
    opened: list[float] = []
    try:
        for i in range(count):
            sock = socket.create_connection((warden.host, warden.port), timeout=READ_TIMEOUT)
            if i % 2:
                sock.sendall(half_startup)
            sock.setblocking(False)
            slow.append(sock)
            opened.append(time.monotonic())
        first_opened = opened[0]

        # A normal client gets in and runs a query while every slow one is still pending.
        with warden.connect(application_name="hostile-slow-normal", sslmode="disable", connect_timeout=5) as conn:
            assert conn.execute("select 'in'").fetchone() == ("in",)
        elapsed = time.monotonic() - first_opened
        pending = [s for s in slow if still_open(s)]
        assert len(pending) == count, (
            f"only {len(pending)} of {count} slow connections still pending {elapsed:.2f}s after the first opened")
        assert elapsed < AUTH_TIMEOUT, "the normal client took longer than auth_timeout: test proves nothing"

        # Then every slow one is dropped, with nothing said, once auth_timeout has passed.
        closed_at: dict[int, float] = {}
        deadline = time.monotonic() + AUTH_TIMEOUT + 15
        waiting = selectors.DefaultSelector()
        for i, sock in enumerate(slow):
            waiting.register(sock, selectors.EVENT_READ, i)
        while waiting.get_map() and time.monotonic() < deadline:
            for key, _ in waiting.select(timeout=0.5):
                i = key.data
                waiting.unregister(key.fileobj)
                try:
                    data = slow[i].recv(4096)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"slow connection {i} was sent {data!r}"
                closed_at[i] = time.monotonic()
        assert not waiting.get_map(), f"{len(waiting.get_map())} slow connections still open {AUTH_TIMEOUT + 15}s later"
        early = [closed_at[i] - opened[i] for i in closed_at if closed_at[i] - opened[i] < AUTH_TIMEOUT * 0.9]
        assert not early, f"slow connections dropped before auth_timeout: {sorted(early)[:5]}"
    finally:
        for sock in slow:
            sock.close()
    assert warden.alive()
    assert plain_rig.bystander.execute("select 1").fetchone() == (1,)


# ---------------------------------------------------------------------------------------------
# The end of the module: nothing leaked


@pytest.mark.parametrize("rig_name", ["plain_rig", "tls_rig"])
def test_zz_nothing_leaked(rig_name, pg_server, request):
    rig: Rig = request.getfixturevalue(rig_name)
    request.node.pgwarden_instances = [rig.warden]
    warden = rig.warden
    assert warden.alive()
    try:
        harness.wait_until(lambda: warden.fd_count() <= rig.fd_baseline, 15,
                           f"pgwarden fds back to the baseline {rig.fd_baseline}")
    except AssertionError as e:
        raise AssertionError(f"{e}\nopen fds:\n" + "\n".join(warden.fd_listing())) from None
    harness.wait_until(lambda: metric(warden, "pgwarden_client_connections") == 1, 10, "only the bystander left")
    assert metric(warden, "pgwarden_server_connections") == 1
    with pg_server.connect() as conn:
        leftover = conn.execute("select application_name, state from pg_stat_activity"
                                " where application_name like 'hostile-%%'"
                                " and application_name not like 'hostile-bystander-%%'").fetchall()
    assert leftover == []
    assert rig.bystander.execute("select 'bystander fine'").fetchone() == ("bystander fine",)
