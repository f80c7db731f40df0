# Authentication relayed end to end through pgwarden (trust, password, md5, SCRAM-SHA-256):
# the server's own challenge reaches the client, wrong passwords fail with 28P01, and
# SCRAM-SHA-256-PLUS is never offered through a TLS-terminating pgwarden.
import concurrent.futures

import pytest

import harness
import pgwire

ACCOUNTS = {
    "scram": (harness.SCRAM_USER, harness.SCRAM_PASSWORD, [10, 11, 12, 0]),  # SASL, continue, final, ok
    "md5": (harness.MD5_USER, harness.MD5_PASSWORD, [5, 0]),
    "password": (harness.CLEARTEXT_USER, harness.CLEARTEXT_PASSWORD, [3, 0]),
    "trust": ("postgres", None, [0]),
}


@pytest.mark.parametrize("method", list(ACCOUNTS))
def test_login_with_the_right_password(proxy, method):
    user, password, expected_requests = ACCOUNTS[method]
    with proxy.connect(user=user, password=password or "") as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        result = raw.startup(user, password=password)
        assert result.error is None, result.error
        # The server's challenge sequence, relayed as is (pgwarden never needs the password).
        assert result.auth_methods == expected_requests
        assert result.parameters["session_authorization"] == user


@pytest.mark.parametrize("method", ["scram", "md5", "password"])
def test_wrong_password_gets_28P01_and_the_proxy_stays_healthy(proxy, pg_server, method):
    user, _, _ = ACCOUNTS[method]
    baseline = pg_server.client_backends()
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        result = raw.startup(user, password="not-the-password")
        assert result.error is not None
        assert (result.error["S"], result.error["C"]) == ("FATAL", "28P01")
        assert raw.at_eof()
    assert "password authentication failed" in proxy.connect_error(user=user, password="still-wrong")
    proxy.connect_error(user=user, password="")  # libpq gives up without sending a password
    user, password, _ = ACCOUNTS[method]
    with proxy.connect(user=user, password=password) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    harness.wait_until(lambda: pg_server.client_backends() <= baseline, 5, "failed logins' backends to exit")


def test_concurrent_scram_logins(proxy):
    def login(i: int) -> str:
        with proxy.connect(user=harness.SCRAM_USER, password=harness.SCRAM_PASSWORD,
                           application_name=f"pgw_scram_{i}") as conn:
            return conn.execute("select current_setting('application_name')").fetchone()[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        names = list(pool.map(login, range(40), timeout=60))
    assert names == [f"pgw_scram_{i}" for i in range(40)]


def test_direct_tls_server_offers_channel_binding(pg_server):
    """Sanity check for the next test: over TLS, the server itself offers SCRAM-SHA-256-PLUS."""
    with pgwire.RawConnection(pg_server.host, pg_server.port) as raw:
        raw.start_tls()
        result = raw.startup(harness.SCRAM_USER, password=harness.SCRAM_PASSWORD)
    assert result.error is None
    assert "SCRAM-SHA-256-PLUS" in result.sasl_mechanisms


@pytest.mark.proxy_only
@pytest.mark.parametrize("upstream_tls", ["disable", "require"])
def test_channel_binding_is_not_offered_through_the_proxy(pgwarden_factory, tls_files, upstream_tls):
    proxy = pgwarden_factory(f"""
[tls]
mode = "allow"
cert = "{tls_files.proxy_cert}"
key = "{tls_files.proxy_key}"

[upstream_tls]
mode = "{upstream_tls}"
""")
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        raw.start_tls()
        result = raw.startup(harness.SCRAM_USER, password=harness.SCRAM_PASSWORD)
    assert result.error is None, result.error
    assert result.sasl_mechanisms == ["SCRAM-SHA-256"]
    # libpq's default (channel_binding=prefer) works while the server side is plain; over
    # TLS to the server it must opt out (see test_tls.py::test_tls_on_both_sides).
    extra = {"channel_binding": "disable"} if upstream_tls == "require" else {}
    with proxy.connect(user=harness.SCRAM_USER, password=harness.SCRAM_PASSWORD, sslmode="require", **extra) as conn:
        assert conn.pgconn.ssl_in_use
        in_use = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]
        assert in_use is (upstream_tls == "require")
