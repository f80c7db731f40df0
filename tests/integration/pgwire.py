# A minimal PostgreSQL v3 protocol client for tests that must see exact messages
# (SQLSTATEs of startup failures, SASL mechanism lists, PortalSuspended, Flush, FunctionCall).
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {'S': 'ERROR', 'C': '42601', 'M': ...}."""
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


class ProtocolError(Exception):
    pass


@dataclass
class StartupResult:
    error: dict[str, str] | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    backend_pid: int | None = None
    backend_secret: int | None = None
    sasl_mechanisms: list[str] = field(default_factory=list)
    auth_methods: list[int] = field(default_factory=list)  # Authentication request codes seen


class RawConnection:
    def __init__(self, host: str, port: int, timeout: float = 10) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._held: bytearray | None = None  # messages held by one_write()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- framing -----------------------------------------------------------------------------

    def send_untyped(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack("!I", len(payload) + 4) + payload)

    def send(self, msg_type: bytes, payload: bytes = b"") -> None:
        message = msg_type + struct.pack("!I", len(payload) + 4) + payload
        if self._held is not None:
            self._held += message
        else:
            self.sock.sendall(message)

    @contextlib.contextmanager
    def one_write(self) -> Iterator[None]:
        """Messages sent inside the block go out in one write when it ends, so that the
        receiver (pgwarden) sees them all before any answer to the first can arrive."""
        self._held = bytearray()
        try:
            yield
            held = bytes(self._held)
        finally:
            self._held = None
        self.sock.sendall(held)

    def _recv_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed ({len(self._buffer)} of {n} bytes read)")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read_byte(self) -> bytes:
        return self._recv_exact(1)

    def read_message(self) -> tuple[str, bytes]:
        header = self._recv_exact(5)
        length = struct.unpack("!I", header[1:])[0]
        if length < 4:
            raise ProtocolError(f"bad length {length}")
        return chr(header[0]), self._recv_exact(length - 4)

    def read_until(self, stop_types: str = "Z") -> list[tuple[str, bytes]]:
        messages = []
        while True:
            message = self.read_message()
            messages.append(message)
            if message[0] in stop_types:
                return messages

    def at_eof(self, timeout: float = 5) -> bool:
        """True when the peer has closed the connection (nothing more to read)."""
        if self._buffer:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- session setup -------------------------------------------------------------------------

    def request_ssl(self) -> bytes:
        self.send_untyped(struct.pack("!I", SSL_REQUEST_CODE))
        return self.read_byte()

    def start_tls(self) -> None:
        answer = self.request_ssl()
        if answer != b"S":
            raise ProtocolError(f"server refused SSL: {answer!r}")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)

    def request_gssenc(self) -> bytes:
        self.send_untyped(struct.pack("!I", GSSENC_REQUEST_CODE))
        return self.read_byte()

    def send_startup(self, user: str, database: str = "postgres", **options: str) -> None:
        body = struct.pack("!I", PROTOCOL_3_0) + cstring("user") + cstring(user)
        body += cstring("database") + cstring(database)
        for key, value in options.items():
            body += cstring(key) + cstring(value)
        self.send_untyped(body + b"\0")

    def startup(self, user: str, database: str = "postgres", password: str | None = None,
                **options: str) -> StartupResult:
        """Startup and authentication (trust, cleartext, md5, SCRAM-SHA-256) up to ReadyForQuery
        or the first ErrorResponse."""
        self.send_startup(user, database, **options)
        result = StartupResult()
        scram: _Scram | None = None
        while True:
            kind, body = self.read_message()
            if kind == "E":
                result.error = error_fields(body)
                return result
            if kind == "R":
                code = struct.unpack("!I", body[:4])[0]
                result.auth_methods.append(code)
                if code == 0:
                    continue
                if password is None:
                    raise ProtocolError(f"server asks for a password (auth code {code}) but none given")
                if code == 3:
                    self.send(b"p", cstring(password))
                elif code == 5:
                    salt = body[4:8]
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    self.send(b"p", cstring("md5" + hashlib.md5(inner + salt).hexdigest()))
                elif code == 10:
                    result.sasl_mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
                    if "SCRAM-SHA-256" not in result.sasl_mechanisms:
                        raise ProtocolError(f"no SCRAM-SHA-256 in {result.sasl_mechanisms}")
                    scram = _Scram(password)
                    first = scram.client_first()
                    self.send(b"p", cstring("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first)
                elif code == 11:
                    assert scram is not None
                    self.send(b"p", scram.client_final(body[4:]))
                elif code == 12:
                    assert scram is not None
                    scram.verify_server_final(body[4:])
                else:
                    raise ProtocolError(f"unsupported authentication request {code}")
            elif kind == "S":
                name, value = body.split(b"\0")[:2]
                result.parameters[name.decode()] = value.decode()
            elif kind == "K":
                result.backend_pid, result.backend_secret = struct.unpack("!Ii", body)
            elif kind == "Z":
                return result
            elif kind == "N":
                continue
            else:
                raise ProtocolError(f"unexpected message {kind!r} during startup")

    # -- messages -----------------------------------------------------------------------------

    def query(self, sql: str) -> None:
        self.send(b"Q", cstring(sql))

    def parse(self, statement: str, sql: str, param_types: tuple[int, ...] = ()) -> None:
        body = cstring(statement) + cstring(sql) + struct.pack("!H", len(param_types))
        body += b"".join(struct.pack("!I", oid) for oid in param_types)
        self.send(b"P", body)

    def bind(self, portal: str, statement: str, params: tuple[bytes | None, ...] = ()) -> None:
        body = cstring(portal) + cstring(statement) + struct.pack("!H", 0) + struct.pack("!H", len(params))
        for value in params:
            body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
        body += struct.pack("!H", 0)  # all results in text
        self.send(b"B", body)

    def describe(self, what: str, name: str) -> None:
        self.send(b"D", what.encode() + cstring(name))

    def execute(self, portal: str = "", max_rows: int = 0) -> None:
        self.send(b"E", cstring(portal) + struct.pack("!I", max_rows))

    def close_object(self, what: str, name: str) -> None:
        self.send(b"C", what.encode() + cstring(name))

    def flush(self) -> None:
        self.send(b"H")

    def sync(self) -> None:
        self.send(b"S")

    def terminate(self) -> None:
        self.send(b"X")

    def function_call(self, function_oid: int, args: tuple[bytes, ...], binary_args: bool = True,
                      binary_result: bool = True) -> None:
        body = struct.pack("!I", function_oid)
        body += struct.pack("!HH", 1, 1 if binary_args else 0)
        body += struct.pack("!H", len(args))
        for arg in args:
            body += struct.pack("!i", len(arg)) + arg
        body += struct.pack("!H", 1 if binary_result else 0)
        self.send(b"F", body)


def send_cancel(host: str, port: int, pid: int, secret: int, timeout: float = 5) -> None:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack("!IIIi", 16, CANCEL_REQUEST_CODE, pid, secret))
        sock.settimeout(timeout)
        sock.recv(1)  # the server closes without answering


def data_row_values(body: bytes) -> list[bytes | None]:
    count = struct.unpack("!H", body[:2])[0]
    values: list[bytes | None] = []
    offset = 2
    for _ in range(count):
        length = struct.unpack("!i", body[offset:offset + 4])[0]
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[offset:offset + length])
            offset += length
    return values


class _Scram:
    """Client side of SCRAM-SHA-256 without channel binding (RFC 5802/7677)."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.client_first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def client_first(self) -> bytes:
        return f"n,,{self.client_first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
        if not attrs["r"].startswith(self.nonce):
            raise ProtocolError("server nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.client_first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        text = server_final.decode()
        if not text.startswith("v=") or base64.b64decode(text[2:]) != self.server_signature:
            raise ProtocolError(f"bad SCRAM server signature: {text}")
