#!/usr/bin/env python3
"""Writes the seed corpora for the fuzz targets into tests/fuzz/corpus/<target>/.

The wire encoding is done here independently of wire/builder.cpp, from the protocol
documentation, so the seeds also check the C++ codec against a second implementation
(the fuzz targets abort if an accepted message does not re-encode to the same bytes).
The other targets get what their parsers see in use: SQL as ORMs and people write it,
sqlcommenter comment bodies, config files (the shipped example and broken ones) and
admin HTTP requests for every route.
Run from anywhere: python3 tests/fuzz/make_corpus.py
"""
import pathlib
import re
import struct

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
REPO = pathlib.Path(__file__).resolve().parents[2]

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


CLASSIFIER = {
    "select_join": "SELECT u.id, o.total FROM public.users u JOIN orders o ON o.user_id = u.id "
                   "WHERE u.email = $1 ORDER BY o.created_at DESC LIMIT 10",
    "insert_returning": "INSERT INTO app.events (kind, payload) VALUES ('login', '{\"a\":1}'::jsonb) "
                        "RETURNING id",
    "update_tagged": "/* client='tenant%3A42',route='%2Fapi%2Forders',action='update' */ "
                     "UPDATE orders SET status = 'paid' WHERE id = 42",
    "delete_trailing_tag": "DELETE FROM sessions WHERE expires_at < now() "
                           "/*client='janitor',traceparent='00-4bf92f3577b34da6-00f067aa0ba902b7-01'*/",
    "line_comment_tag": "-- client='cron',job='nightly'\nTRUNCATE audit.staging",
    "multi_statement": "BEGIN; SELECT 1; /* client='b' */ UPDATE t SET x = x + 1; COMMIT",
    "writable_cte": "WITH moved AS (DELETE FROM queue WHERE id IN (SELECT id FROM queue LIMIT 5) "
                    "RETURNING *) INSERT INTO done SELECT * FROM moved",
    "select_for_update": "SELECT * FROM jobs WHERE state = 'ready' FOR UPDATE SKIP LOCKED LIMIT 1",
    "select_nextval": "SELECT nextval('orders_id_seq'), pg_catalog.setval('s', 1)",
    "select_into": "SELECT * INTO TEMP snapshot FROM accounts",
    "dollar_quoted_do": "DO $body$ BEGIN PERFORM 1; RAISE NOTICE 'it''s /* not */ a comment'; "
                        "END $body$",
    "create_function": "CREATE OR REPLACE FUNCTION f(x int) RETURNS int LANGUAGE sql AS $$ "
                       "SELECT x + 1 $$",
    "copy_in": "COPY public.items (id, name) FROM STDIN WITH (FORMAT csv)",
    "copy_out_query": "COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT",
    "explain_analyze": "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1",
    "explain_plain": "EXPLAIN SELECT * FROM big WHERE id > 10",
    "set_local": "SET LOCAL statement_timeout = '5s'; SET search_path TO app, public; "
                 "SET TIME ZONE INTERVAL '-08:00' HOUR TO MINUTE; RESET ALL",
    "set_negative": "SET extra_float_digits = -3",
    "transactions": "START TRANSACTION ISOLATION LEVEL SERIALIZABLE; SAVEPOINT s1; "
                    "ROLLBACK TO SAVEPOINT s1; RELEASE s1; END; ABORT AND CHAIN",
    "two_phase": "PREPARE TRANSACTION 'gid-1'; COMMIT PREPARED 'gid-1'; ROLLBACK PREPARED 'x'",
    "prepare_execute": "PREPARE ins(int) AS INSERT INTO t VALUES ($1); EXECUTE ins(1); "
                       "DEALLOCATE ins; DEALLOCATE ALL",
    "declare_cursor": "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t; FETCH 10 FROM c; CLOSE c",
    "ddl_mix": "CREATE TABLE s.t (id bigserial PRIMARY KEY); ALTER TABLE s.t ADD c text; "
               "DROP TABLE IF EXISTS s.t, u CASCADE; CREATE INDEX ON t (a)",
    "merge": "MERGE INTO stock s USING delivery d ON s.item = d.item WHEN MATCHED THEN UPDATE "
             "SET qty = s.qty + d.qty WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty)",
    "maintenance": "VACUUM (ANALYZE) t; CLUSTER t; REINDEX TABLE t; CHECKPOINT",
    "listen_notify_lock": "LISTEN jobs; NOTIFY jobs, 'x'; UNLISTEN *; LOCK TABLE t IN "
                          "ACCESS EXCLUSIVE MODE",
    "call_show_discard": "CALL refresh_all(); SHOW work_mem; DISCARD ALL",
    "quoted_identifiers": 'SELECT * FROM "a>b", "q""uote", "t\u00e4"."x" WHERE e\'\\n\' <> U&\'d\\0061t\\+000061\'',
    "nested_comment": "/* outer /* inner */ client='x' */ SELECT 1",
    "syntax_error_tagged": "/* client='broken' */ SELEKT 1 FROM",
    "empty_statements": " ; ;/* only a comment */; -- and this\n",
    "django_style": "SELECT \"auth_user\".\"id\", \"auth_user\".\"password\" FROM \"auth_user\" "
                    "WHERE \"auth_user\".\"username\" = 'admin' LIMIT 21 "
                    "/*controller='index',db_driver='django.db.backends.postgresql',"
                    "framework='django%3A4.2',route='%5Eadmin%2F'*/",
}

SQLCOMMENTER = {
    "single": "client='tenant:42'",
    "encoded": "client='tenant%3A42',route='%2Fhome%3Fq%3D1',framework='spring%2D5'",
    "spaces": "  a = 'x' ,  b='y'  ",
    "escaped_quote": "msg='it\\'s',path='C:\\\\dir'",
    "traceparent": "traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',"
                   "tracestate='congo%3Dt61rcWkgMzE'",
    "bad_percent": "a='%zz%4',b='%',c='100%25'",
    "unterminated": "k='v',broken='unterminated",
    "junk_between": "see ticket=123, a='1' trailing, b='2'x, c='3'",
    "empty_key": "='x', d='e', ='', f=''",
    "unicode": "client='t\u00e4nant',emoji='%F0%9F%90%98',raw='\u00e9'",
    "no_tags": "this is just a remark about the query",
    "nested_markers": "a='/* x */',b='-- y'",
}


def uncommented_examples(text):
    """The shipped config with its example throttles and rules switched on."""
    head, marker, tail = text.partition("# Write throttles.")
    tail = re.sub(r"(?m)^# (\[\[|[a-z_]+ = )", r"\1", tail)
    return head + marker + tail


EXAMPLE_CONFIG = (REPO / "configs" / "pgwarden.toml").read_text()

CONFIG = {
    "example": EXAMPLE_CONFIG,
    "example_enabled": uncommented_examples(EXAMPLE_CONFIG),
    "empty": "",
    "minimal": '[proxy]\nlisten = "0.0.0.0:6432"\nupstream = "db.internal:5432"\n',
    "ipv6_sizes_durations": (
        '[proxy]\nlisten = "[::1]:6432"\nupstream = "[fd00::5]:5432"\nthreads = 4\n'
        'auth_timeout = 1.5\nconnect_timeout = "250ms"\nshutdown_timeout = "2min"\n'
        'max_message_bytes = "1.5MB"\nmax_statement_bytes = 65536\n'
        '[admin]\nlisten = "localhost:9187"\ntoken = "s3cr3t-t0ken"\n'
        '[transactions]\nnesting = "savepoint"\nidle_timeout = "1d"\n'),
    "tls_relative_files": '[tls]\nmode = "require"\ncert = "server.crt"\nkey = "."\n'
                          '[upstream_tls]\nmode = "verify-full"\nca = "missing-ca.pem"\n'
                          'server_name = "db.example.com."\n',
    "identity_classify": (
        '[identity]\nsources = ["comment:tenant.id", "setting:App.Client", "address"]\n'
        '[classify]\nwrite_functions = ["audit.log_event", "nextval"]\ncache_entries = 0\n'
        '[metrics]\nmax_clients = 0\n[log]\nformat = "json"\nlevel = "debug"\n'),
    "rules_and_throttles": (
        '[[throttle]]\nname = "w"\nmatch = { user = ["app", "app-*"], address = "10.0.0.0/8" }\n'
        'statements = ["write", "select"]\nrate = 0.5\ncost = "row"\nbucket = "rule"\n'
        'action = "reject"\npenalty = "30s"\n\n'
        '[[rule]]\nname = "r1"\nmatch = { statements = ["ddl"], tables = ["audit.*"], '
        'client = "web" }\naction = "notice"\nsqlstate = "01000"\nmessage = "careful"\n\n'
        '[[rule]]\nname = "r2"\nmatch = { database = "*" }\naction = "doom"\n'
        'nesting = "flatten"\n'),
    "bad_syntax": '[proxy\nlisten = "x"\n',
    "bad_unterminated_string": '[admin]\ntoken = "abc\n',
    "bad_typos": '[proxi]\nlisten = "127.0.0.1:1"\n[proxy]\nlistne = "127.0.0.1:2"\n'
                 '[[rules]]\nname = "x"\nthreads = 3\n',
    "bad_types": '[proxy]\nlisten = 6432\nthreads = "four"\nauth_timeout = true\n'
                 'max_message_bytes = [1]\n[admin]\nenabled = "yes"\n',
    "bad_values": '[proxy]\nlisten = "host:0"\nupstream = "::1:5432"\nthreads = 2000\n'
                  'auth_timeout = "5 parsecs"\nconnect_timeout = "0"\nmax_message_bytes = "2GB"\n'
                  'max_statement_bytes = "1.0000001kB"\nshutdown_timeout = -1\n',
    "bad_same_listen": '[proxy]\nlisten = "127.0.0.1:9187"\n[admin]\ntoken = "has space"\n',
    "bad_rules": (
        '[[rule]]\nname = "a"\naction = "reject"\nsqlstate = "01000"\n'
        'match = { statements = ["selec"], address = "10.1.2.3/8" }\n'
        '[[rule]]\nname = "a"\nstatements = ["ddl"]\n[[rule]]\naction = "drop"\n'
        'message = ""\nsqlstate = "4250"\n'),
    "bad_throttles": (
        '[[throttle]]\nname = "t"\nstatements = ["commit"]\nburst = 0.5\n'
        '[[throttle]]\nname = "u"\nrate = inf\nmatch = { tables = ["x"] }\n'
        '[[throttle]]\nname = "v"\nrate = -1\nmax_delay = 1e300\nmatch = "everyone"\n'),
    "bad_structure": 'rule = "x"\nlisten = "a:1"\n[[proxy]]\n[identity]\nsources = []\n'
                     '[classify]\nwrite_functions = ["f()", ""]\ncache_entries = -5\n',
    "bad_control_chars": '[[rule]]\nname = "bell\\u0007"\naction = "log"\n'
                         'match = { user = ["tab\\there"] }\n',
    "bad_dates_and_arrays": 'when = 1979-05-27T07:32:00Z\n[proxy]\nlisten = [["a"], 1]\n'
                            'threads = 0x10\n[metrics]\nmax_clients = 9223372036854775807\n',
}


def http_request(method, target, headers=(), body=b"", version="1.1"):
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not any(name.lower() in ("content-length", "transfer-encoding")
                        for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


HOST = ("Host", "127.0.0.1:9187")
TOKEN = ("Authorization", "Bearer fuzz-token-0123456789")
CLOSE = ("Connection", "close")

ADMIN_HTTP = {
    "metrics": http_request("GET", "/metrics", [HOST, ("Accept", "text/plain")]),
    "healthz": http_request("GET", "/healthz", [HOST, CLOSE]),
    "readyz_http10": http_request("GET", "/readyz", [HOST], version="1.0"),
    "metrics_post": http_request("POST", "/metrics", [HOST], b"x=1"),
    "clients_token": http_request("GET", "/api/clients", [HOST, TOKEN]),
    "clients_no_token": http_request("GET", "/api/clients?verbose=1", [HOST]),
    "throttles_token": http_request("GET", "/api/throttles", [HOST, TOKEN, CLOSE]),
    "reload_token": http_request("POST", "/api/reload", [HOST, TOKEN]),
    "reload_wrong_method": http_request("GET", "/api/reload", [HOST, TOKEN]),
    "reload_wrong_token": http_request("POST", "/api/reload",
                                       [HOST, ("Authorization", "Bearer nope")]),
    "reload_basic_auth": http_request("POST", "/api/reload",
                                      [HOST, ("Authorization", "Basic dXNlcjpwYXNz")]),
    "doom_default_reason": http_request("POST", "/api/clients/7/doom", [HOST, TOKEN]),
    "doom_reason": http_request("POST", "/api/clients/7/doom",
                                [HOST, TOKEN, ("Content-Type", "application/json")],
                                b'{"reason": "runaway \\u00e9 query"}'),
    "doom_unknown_client": http_request("POST", "/api/clients/18446744073709551615/doom",
                                        [HOST, ("authorization", "bearer\tfuzz-token-0123456789 ")],
                                        b'{"reason": ""}'),
    "doom_bad_id": http_request("POST", "/api/clients/-1/doom", [HOST, TOKEN]),
    "doom_bad_body": http_request("POST", "/api/clients/7/doom", [HOST, TOKEN], b'["reason"]'),
    "doom_reason_not_string": http_request("POST", "/api/clients/7/doom", [HOST, TOKEN],
                                           b'{"reason": 5}'),
    "doom_invalid_json": http_request("POST", "/api/clients/7/doom", [HOST, TOKEN], b'{"re'),
    "doom_chunked": http_request("POST", "/api/clients/7/doom",
                                 [HOST, TOKEN, ("Transfer-Encoding", "chunked")],
                                 b'5\r\n{"rea\r\n0e\r\nson": "chunk"}\r\n0\r\n\r\n'),
    "doom_get": http_request("GET", "/api/clients/7/doom", [HOST]),
    "api_root_and_unknown": http_request("GET", "/api", [HOST, TOKEN])
                            + http_request("DELETE", "/api/clients/7", [HOST, TOKEN])
                            + http_request("GET", "/nope", [HOST, CLOSE]),
    "pipelined_keep_alive": http_request("GET", "/healthz", [HOST])
                            + http_request("GET", "/metrics", [HOST])
                            + http_request("POST", "/api/reload", [HOST, TOKEN, CLOSE]),
    "body_too_large": http_request("POST", "/api/reload", [HOST, ("Content-Length", "1048576")]),
    "malformed_request_line": b"GET /metrics HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "bad_header": b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
    "partial_message": b"POST /api/reload HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
}


def main():
    for target, seeds in (("fuzz_wire_frontend", FRONTEND), ("fuzz_wire_backend", BACKEND),
                          ("fuzz_startup", STARTUP), ("fuzz_classifier", CLASSIFIER),
                          ("fuzz_sqlcommenter", SQLCOMMENTER), ("fuzz_config", CONFIG),
                          ("fuzz_admin_http", ADMIN_HTTP)):
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (directory / name).write_bytes(data.encode() if isinstance(data, str) else data)
        print(f"{directory}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
