#!/usr/bin/env python3
"""Writes the seed corpora for the wire fuzz targets into tests/fuzz/corpus/<target>/.

The encoding is done here independently of wire/builder.cpp, from the protocol
documentation, so the seeds also check the C++ codec against a second implementation
(the fuzz targets abort if an accepted message does not re-encode to the same bytes).
Run from anywhere: python3 tests/fuzz/make_corpus.py
"""
import pathlib
import struct

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def i16(value):
    return struct.pack("!h", value)


def u16(value):
    return struct.pack("!H", value)


def i32(value):
    return struct.pack("!i", value)


def u32(value):
    return struct.pack("!I", value)


def cstr(text):
    return text.encode() + b"\0"


def message(type_byte, body=b""):
    return type_byte.encode() + u32(len(body) + 4) + body


def packet(body):
    return u32(len(body) + 4) + body


def value(text):
    """A Bind/FunctionCall/DataRow value: length-prefixed, None for NULL."""
    if text is None:
        return i32(-1)
    data = text.encode()
    return i32(len(data)) + data


def bind(portal, statement, params, formats=(), result_formats=()):
    body = cstr(portal) + cstr(statement)
    body += u16(len(formats)) + b"".join(i16(f) for f in formats)
    body += u16(len(params)) + b"".join(value(p) for p in params)
    body += u16(len(result_formats)) + b"".join(i16(f) for f in result_formats)
    return message("B", body)


def error_fields(type_byte, fields):
    body = b"".join(code.encode() + cstr(text) for code, text in fields) + b"\0"
    return message(type_byte, body)


def row_description(columns):
    body = i16(len(columns))
    for name, type_oid in columns:
        body += cstr(name) + u32(16384) + i16(1) + u32(type_oid) + i16(4) + i32(-1) + i16(0)
    return message("T", body)


def startup(params, protocol=3 << 16):
    body = u32(protocol)
    for name, val in params:
        body += cstr(name) + cstr(val)
    return packet(body + b"\0")


FRONTEND = {
    "simple_query": message("Q", cstr("SELECT 1; INSERT INTO t VALUES (1)")),
    "extended_batch": (
        message("P", cstr("s1") + cstr("SELECT $1::int, $2") + u16(2) + u32(23) + u32(25))
        + bind("p1", "s1", ["42", "text"])
        + message("D", b"P" + cstr("p1"))
        + message("E", cstr("p1") + i32(0))
        + message("S")
    ),
    "bind_nulls_and_formats": bind("", "s2", [None, "", "\x00\x01"], formats=(1,),
                                   result_formats=(0, 1)),
    "function_call": message(
        "F", u32(1299) + u16(1) + i16(0) + u16(2) + value("abc") + value(None) + i16(1)),
    "copy_in": (
        message("Q", cstr("COPY t FROM STDIN"))
        + message("d", b"1\tone\n2\ttwo\n")
        + message("c")
        + message("f", cstr("client aborted"))
    ),
    "close_flush_terminate": (
        message("C", b"S" + cstr("s1")) + message("C", b"P" + cstr(""))
        + message("H") + message("X")
    ),
    "password_and_sasl": (
        message("p", cstr("md5" + "0" * 32))
        + message("p", cstr("SCRAM-SHA-256") + i32(23) + b"n,,n=,r=rOprNGfwEbeRWgbN")
    ),
}

BACKEND = {
    "login_ok": (
        message("R", i32(0))
        + message("S", cstr("server_version") + cstr("15.5"))
        + message("S", cstr("TimeZone") + cstr("UTC"))
        + message("K", i32(4242) + i32(-559038737))
        + message("Z", b"I")
    ),
    "auth_sasl": (
        message("R", i32(10) + cstr("SCRAM-SHA-256-PLUS") + cstr("SCRAM-SHA-256") + b"\0")
        + message("R", i32(11) + b"r=abc,s=c2FsdA==,i=4096")
        + message("R", i32(12) + b"v=c2lnbmF0dXJl")
    ),
    "auth_md5": message("R", i32(5) + b"\x01\x02\x03\x04") + message("R", i32(3)),
    "query_result": (
        row_description([("id", 23), ("name", 25)])
        + message("D", i16(2) + value("1") + value(None))
        + message("C", cstr("SELECT 1"))
        + message("C", cstr("INSERT 0 5"))
        + message("Z", b"T")
    ),
    "errors_and_notices": (
        error_fields("E", [("S", "ERROR"), ("V", "ERROR"), ("C", "42501"),
                           ("M", "permission denied"), ("D", "detail"), ("H", "hint")])
        + error_fields("N", [("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "hi")])
        + message("Z", b"E")
    ),
    "extended_result": (
        message("1") + message("2") + message("t", i16(1) + u32(23)) + message("n")
        + message("s") + message("3") + message("I") + message("C", cstr("UPDATE 3"))
    ),
    "copy_and_notify": (
        message("H", b"\0" + i16(2) + i16(0) + i16(0))
        + message("d", b"1\tone\n") + message("c")
        + message("G", b"\x01" + i16(1) + i16(1))
        + message("W", b"\0" + i16(0))
        + message("C", cstr("COPY 1"))
        + message("A", i32(77) + cstr("jobs") + cstr('{"id":1}'))
        + message("V", value("42"))
        + message("v", u32(3 << 16) + i32(1) + cstr("_pq_.option"))
    ),
}

STARTUP = {
    "startup_v3": startup([("user", "alice"), ("database", "app"),
                           ("application_name", "psql"), ("options", "-c search_path=x")]),
    "startup_v3_minor": startup([("user", "bob"), ("_pq_.extension", "on")], (3 << 16) | 2),
    "startup_no_params": startup([]),
    "ssl_request": packet(u32(SSL_REQUEST_CODE)),
    "gssenc_request": packet(u32(GSSENC_REQUEST_CODE)),
    "cancel_request": packet(u32(CANCEL_REQUEST_CODE) + i32(31337) + i32(-123456789)),
    "unsupported_v2": packet(u32(2 << 16) + b"user\0alice\0\0"),
}


def main():
    for target, seeds in (("fuzz_wire_frontend", FRONTEND), ("fuzz_wire_backend", BACKEND),
                          ("fuzz_startup", STARTUP)):
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (directory / name).write_bytes(data)
        print(f"{directory}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
