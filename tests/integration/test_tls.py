# TLS on both sides of pgwarden: clients to pgwarden ([tls]) and pgwarden to the server
# ([upstream_tls]), including refusals that must fail cleanly and leave pgwarden serving.
import pytest

import harness
import pgwire


def client_tls_config(tls_files: harness.TlsFiles, mode: str) -> str:
    return f"""
[tls]
mode = "{mode}"
cert = "{tls_files.proxy_cert}"
key = "{tls_files.proxy_key}"
"""


def upstream_tls_config(mode: str, ca_file=None, server_name=None) -> str:
    text = f'[upstream_tls]\nmode = "{mode}"\n'
    if ca_file is not None:
        text += f'ca = "{ca_file}"\n'
    if server_name is not None:
        text += f'server_name = "{server_name}"\n'
    return text


def upstream_ssl_in_use(target) -> bool:
    with target.connect(sslmode="disable") as conn:
        return conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]


def test_client_tls_allowed(pgwarden_factory, tls_files):
    proxy = pgwarden_factory(client_tls_config(tls_files, "allow"), direct_equivalent=True)
    # verify-full checks the certificate pgwarden presents against our CA and 127.0.0.1.
    with proxy.connect(sslmode="verify-full", sslrootcert=str(tls_files.ca_cert)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with proxy.connect(sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        big = conn.execute("select repeat('z', 4000000)").fetchone()[0]
        assert len(big) == 4000000  # many TLS records in one result
    with proxy.connect(sslmode="disable") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    out = harness.psql(proxy, sql="copy (select g from generate_series(1, 100000) g) to stdout",
                       env={"PGSSLMODE": "require"}).stdout
    assert out == b"".join(b"%d\n" % g for g in range(1, 100001))


@pytest.mark.proxy_only
def test_client_tls_disabled_refuses_sslmode_require(proxy):
    assert "does not support SSL" in proxy.connect_error(sslmode="require")
    with proxy.connect(sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.proxy_only
def test_client_tls_required_refuses_plain_clients(pgwarden_factory, tls_files):
    proxy = pgwarden_factory(client_tls_config(tls_files, "require"))
    proxy.connect_error(sslmode="disable")
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        raw.send_startup("postgres")
        kind, body = raw.read_message()
        assert kind == "E", "a plain client must get an ErrorResponse, not just a closed socket"
        assert pgwire.error_fields(body)["S"] == "FATAL"
        assert raw.at_eof()
    with proxy.connect(sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_upstream_tls_off_by_default(proxy):
    assert upstream_ssl_in_use(proxy) is False


@pytest.mark.proxy_only
def test_upstream_tls_required(pgwarden_factory):
    proxy = pgwarden_factory(upstream_tls_config("require"))
    assert upstream_ssl_in_use(proxy) is True
    with proxy.connect() as conn:
        assert len(conn.execute("select repeat('q', 3000000)").fetchone()[0]) == 3000000


@pytest.mark.proxy_only
@pytest.mark.parametrize("server_name", ["localhost", None], ids=["server_name_localhost", "upstream_host_ip"])
def test_upstream_tls_verify_full(pgwarden_factory, tls_files, server_name):
    proxy = pgwarden_factory(upstream_tls_config("verify-full", tls_files.ca_cert, server_name))
    assert upstream_ssl_in_use(proxy) is True


@pytest.mark.proxy_only
@pytest.mark.parametrize("case", ["wrong_name", "unknown_ca"])
def test_upstream_tls_verify_full_rejects_a_bad_certificate(pgwarden_factory, tls_files, case):
    config = (upstream_tls_config("verify-full", tls_files.ca_cert, "db.example.invalid") if case == "wrong_name"
              else upstream_tls_config("verify-full"))  # system CAs do not know our test CA
    proxy = pgwarden_factory(config, wait="tcp")
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        result = raw.startup("postgres")
    assert result.error is not None, "pgwarden connected to an upstream whose certificate fails verification"
    assert result.error["S"] == "FATAL"
    assert result.error["C"].startswith("08"), result.error
    assert proxy.alive()


@pytest.mark.proxy_only
def test_tls_on_both_sides(pgwarden_factory, tls_files):
    proxy = pgwarden_factory(client_tls_config(tls_files, "require")
                             + upstream_tls_config("verify-full", tls_files.ca_cert, "localhost"))
    # SCRAM through TLS on both sides needs channel_binding=disable: libpq over TLS sends
    # the "client supports binding" flag, which a TLS server rightly treats as a downgrade.
    for user, password, extra in [("postgres", "", {}),
                                  (harness.SCRAM_USER, harness.SCRAM_PASSWORD, {"channel_binding": "disable"}),
                                  (harness.MD5_USER, harness.MD5_PASSWORD, {})]:
        with proxy.connect(sslmode="require", user=user, password=password, **extra) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)
