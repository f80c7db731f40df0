# pytest fixtures for pgwarden's integration tests: one PostgreSQL per pytest process,
# a fresh pgwarden per test, and pgwarden's log tail attached to every failing test's report.
#
#   pg_server        session  PostgresServer (harness.py); direct admin connections via .connect()
#   tls_files        session  CA + server/proxy certificates (harness.TlsFiles)
#   pgwarden_factory function pgwarden_factory(config_text="", upstream=None, extra_args=(), wait="query",
#                                              direct_equivalent=False) -> started Pgwarden
#   proxy            function a pgwarden with the default (empty) config
#
# PGWARDEN_DIRECT=1 makes `proxy` (and the factory, for an empty config) the server itself,
# to prove the tests; tests marked `proxy_only` are skipped then.
from __future__ import annotations

import os
import re

import pytest

import harness


def pytest_configure(config: pytest.Config) -> None:
    # A developer's PGHOST/PGSSLMODE/PGOPTIONS/... would silently change what libpq does.
    for name in [n for n in os.environ if n.startswith("PG") and not n.startswith("PGWARDEN_")]:
        del os.environ[name]
    config.addinivalue_line("markers", "proxy_only: needs a real pgwarden (skipped with PGWARDEN_DIRECT=1)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if harness.direct_mode() and item.get_closest_marker("proxy_only"):
        pytest.skip("needs pgwarden (PGWARDEN_DIRECT=1)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, instance in enumerate(getattr(item, "pgwarden_instances", [])):
            report.sections.append((f"pgwarden #{index} log tail ({instance.log_path})", instance.log_tail()))


@pytest.fixture(scope="session")
def pg_server():
    server = harness.PostgresServer()
    try:
        server.start()
    except BaseException:
        print(harness.tail(server.log_path))
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_files(pg_server: harness.PostgresServer) -> harness.TlsFiles:
    assert pg_server.tls is not None
    return pg_server.tls


@pytest.fixture
def pgwarden_factory(request: pytest.FixtureRequest, pg_server: harness.PostgresServer, tmp_path_factory):
    started: list = []
    request.node.pgwarden_instances = started

    def start(config_text: str = "", upstream: str | None = None, extra_args: tuple[str, ...] = (),
              wait: str | None = "query", direct_equivalent: bool = False):
        """direct_equivalent: the server itself behaves like this configuration as far as the
        test can see (say, client TLS), so PGWARDEN_DIRECT=1 may substitute it."""
        if harness.direct_mode():
            if (config_text.strip() or upstream or extra_args) and not direct_equivalent:
                pytest.skip("custom pgwarden configuration (PGWARDEN_DIRECT=1)")
            return harness.DirectTarget(pg_server)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
        instance = harness.Pgwarden(tmp_path_factory.mktemp(f"pgw-{name}"), pg_server.port, config_text,
                                    upstream=upstream, extra_args=extra_args)
        started.append(instance)
        instance.start(wait=wait)
        return instance

    yield start
    problems = []
    for instance in started:
        try:
            instance.stop()
        except AssertionError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def proxy(pgwarden_factory):
    return pgwarden_factory()
