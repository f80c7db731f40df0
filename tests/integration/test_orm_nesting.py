# Nested transaction scopes as real applications make them: a Django view under
# ATOMIC_REQUESTS that calls a legacy helper running its own BEGIN ... COMMIT through
# Django's cursor, and SQLAlchemy Core/ORM code handing its connection, already in a
# transaction, to a "library" that does the same. In warn mode the helper's COMMIT commits
# the outer work early and a later failure cannot undo it; flatten and savepoint keep
# everything in the outer transaction. Django's own nested atomic() blocks (savepoints)
# are not nesting and are left alone.
from __future__ import annotations

import sys
import types

import pytest

import harness
from nesting_util import committed_notes, config, create_table, log_events, metric, wait_for_events

# Warn mode is PostgreSQL's own behaviour: with PGWARDEN_DIRECT=1 those cases run against
# the server itself, which proves what they expect of the ORMs.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:django.*")

T = "orm_t"
MODES = ["warn", "flatten", "savepoint"]
ALL_NOTES = ["legacy", "outer-after", "outer-before"]


@pytest.fixture
def table(pg_server):
    return create_table(pg_server, T)


# ---- Django ------------------------------------------------------------------------------

# What the view saw from a direct connection to PostgreSQL right after the legacy helper.
django_observed: dict[str, list[str]] = {}
_django_pg_server = None


def legacy_record(note: str, fail: bool = False) -> None:
    """Code from before the application used transactions: it brackets its own work."""
    from django.db import connection
    with connection.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(f"INSERT INTO {T} VALUES (2, %s)", [note])
        if fail:
            cur.execute("ROLLBACK")
            return
        cur.execute("COMMIT")


def order_view(request):
    from django.db import connection
    from django.http import HttpResponse
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {T} VALUES (1, 'outer-before')")
    legacy_record("legacy", fail=request.GET.get("legacy_fails") == "1")
    django_observed["after_legacy"] = committed_notes(_django_pg_server, T)
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {T} VALUES (3, 'outer-after')")
    if request.GET.get("fail") == "1":
        raise RuntimeError("the order failed after the legacy helper returned")
    return HttpResponse("ok")


def modern_view(request):
    """Nested atomic() blocks: Django makes savepoints, no BEGIN."""
    from django.db import transaction
    from django.db import connection
    from django.http import HttpResponse
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"INSERT INTO {T} VALUES (1, 'outer')")
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute(f"INSERT INTO {T} VALUES (2, 'inner-kept')")
        try:
            with transaction.atomic():
                with connection.cursor() as cur:
                    cur.execute(f"INSERT INTO {T} VALUES (3, 'inner-undone')")
                raise ValueError("inner block fails")
        except ValueError:
            pass
        django_observed["inside"] = committed_notes(_django_pg_server, T)
    return HttpResponse("ok")


@pytest.fixture
def django_client(pg_server):
    """Django configured in-process, its default database pointed at each test's pgwarden."""
    import django
    from django.conf import settings
    global _django_pg_server
    _django_pg_server = pg_server
    if "pgwarden_orm_urls" not in sys.modules:
        from django.urls import path
        urls = types.ModuleType("pgwarden_orm_urls")
        urls.urlpatterns = [path("order/", order_view), path("modern/", modern_view)]
        sys.modules["pgwarden_orm_urls"] = urls
    if not settings.configured:
        settings.configure(
            DEBUG=False, ALLOWED_HOSTS=["testserver"], ROOT_URLCONF="pgwarden_orm_urls", INSTALLED_APPS=[],
            MIDDLEWARE=[], USE_TZ=True, LOGGING_CONFIG=None,
            DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "postgres",
                                   "USER": "postgres", "HOST": "127.0.0.1", "PORT": "1",
                                   "ATOMIC_REQUESTS": True, "CONN_MAX_AGE": 0,
                                   "OPTIONS": {"application_name": "django-app"}}})
        django.setup()
    from django.db import connections
    from django.test import Client

    def client_for(proxy):
        connections["default"].close()
        connections["default"].settings_dict.update(HOST=proxy.host, PORT=str(proxy.port))
        django_observed.clear()
        return Client(raise_request_exception=False)

    yield client_for
    connections["default"].close()


@pytest.mark.parametrize("fail", [False, True], ids=["view-succeeds", "view-fails"])
@pytest.mark.parametrize("mode", MODES)
def test_django_legacy_helper_commit(pgwarden_factory, pg_server, table, django_client, mode, fail):
    proxy = pgwarden_factory(config(mode), direct_equivalent=mode == "warn")
    response = django_client(proxy).get("/order/", {"fail": "1" if fail else "0"})
    assert response.status_code == (500 if fail else 200)
    if mode == "warn":
        # The helper's COMMIT committed the view's earlier work, and what the view did
        # afterwards ran outside any transaction: the failure undid nothing.
        assert django_observed["after_legacy"] == ["legacy", "outer-before"]
        assert committed_notes(pg_server, T) == ALL_NOTES
        if harness.direct_mode():
            return
        assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit", client="django-app") == 1
        (event,) = wait_for_events(proxy, "early_commit", 1)
        assert event["client"] == "django-app"
    else:
        assert django_observed["after_legacy"] == []
        assert committed_notes(pg_server, T) == ([] if fail else ALL_NOTES)
        assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit") == 0
    assert metric(proxy, "pgwarden_nested_begin_total", client="django-app", mode=mode) == 1
    wait_for_events(proxy, "nested_begin", 1)


@pytest.mark.proxy_only
@pytest.mark.parametrize("mode,status,expected", [
    # The helper's ROLLBACK dooms the request's transaction: the view's next write fails.
    ("flatten", 500, []),
    # Only the helper's own work is undone.
    ("savepoint", 200, ["outer-after", "outer-before"]),
])
def test_django_legacy_helper_rollback(pgwarden_factory, pg_server, table, django_client, mode, status, expected):
    proxy = pgwarden_factory(config(mode))
    response = django_client(proxy).get("/order/", {"legacy_fails": "1"})
    assert response.status_code == status
    assert django_observed["after_legacy"] == []
    assert committed_notes(pg_server, T) == expected
    if mode == "flatten":
        assert metric(proxy, "pgwarden_doomed_transactions_total", reason="inner_rollback") == 1
        assert metric(proxy, "pgwarden_doomed_writes_rejected_total") == 1


@pytest.mark.parametrize("mode", MODES)
def test_django_nested_atomic_is_left_alone(pgwarden_factory, pg_server, table, django_client, mode):
    proxy = pgwarden_factory(config(mode), direct_equivalent=mode == "warn")
    response = django_client(proxy).get("/modern/")
    assert response.status_code == 200
    assert django_observed["inside"] == []
    assert committed_notes(pg_server, T) == ["inner-kept", "outer"]
    if harness.direct_mode():
        return
    assert metric(proxy, "pgwarden_nested_begin_total") == 0
    assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit") == 0
    # The savepoints did go through pgwarden (three atomic() blocks inside the request's).
    assert metric(proxy, "pgwarden_statements_total", kind="savepoint", client="django-app") >= 3
    assert log_events(proxy, "nested_begin") == []
    assert log_events(proxy, "early_commit") == []


# ---- SQLAlchemy --------------------------------------------------------------------------


def sqlalchemy_engine(proxy):
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool
    return create_engine(f"postgresql+psycopg2://postgres@{proxy.host}:{proxy.port}/postgres", future=True,
                         poolclass=NullPool, connect_args={"application_name": "sqlalchemy-app"})


def audit_library(conn, note: str) -> None:
    """A library that assumes it owns the connection's transaction."""
    conn.exec_driver_sql("BEGIN")
    conn.exec_driver_sql(f"INSERT INTO {T} VALUES (2, %(note)s)", {"note": note})
    conn.exec_driver_sql("COMMIT")


def expect_early_commit_or_not(proxy, pg_server, mode: str, fail: bool, after_library: list[str]) -> None:
    if mode == "warn":
        assert after_library == ["legacy", "outer-before"]
        assert committed_notes(pg_server, T) == ALL_NOTES
        if harness.direct_mode():
            return
        assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit", client="sqlalchemy-app") == 1
    else:
        assert after_library == []
        assert committed_notes(pg_server, T) == ([] if fail else ALL_NOTES)
        assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit") == 0
    assert metric(proxy, "pgwarden_nested_begin_total", client="sqlalchemy-app", mode=mode) == 1


@pytest.mark.parametrize("fail", [False, True], ids=["outer-succeeds", "outer-fails"])
@pytest.mark.parametrize("mode", MODES)
def test_sqlalchemy_core_library_commit(pgwarden_factory, pg_server, table, mode, fail):
    from sqlalchemy import text
    proxy = pgwarden_factory(config(mode), direct_equivalent=mode == "warn")
    engine = sqlalchemy_engine(proxy)
    after_library = None
    try:
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {T} VALUES (1, 'outer-before')"))
            audit_library(conn, "legacy")
            after_library = committed_notes(pg_server, T)
            conn.execute(text(f"INSERT INTO {T} VALUES (3, 'outer-after')"))
            if fail:
                raise RuntimeError("outer scope fails")
    except RuntimeError:
        assert fail
    finally:
        engine.dispose()
    expect_early_commit_or_not(proxy, pg_server, mode, fail, after_library)


@pytest.mark.parametrize("mode", MODES)
def test_sqlalchemy_orm_library_commit(pgwarden_factory, pg_server, table, mode):
    from sqlalchemy import Column, Integer, Text
    from sqlalchemy.orm import Session, declarative_base
    Base = declarative_base()

    class Row(Base):
        __tablename__ = T
        id = Column(Integer, primary_key=True)
        note = Column(Text)

    proxy = pgwarden_factory(config(mode), direct_equivalent=mode == "warn")
    engine = sqlalchemy_engine(proxy)
    after_library = None
    try:
        with Session(engine) as session:
            with session.begin():
                session.add(Row(id=1, note="outer-before"))
                session.flush()
                audit_library(session.connection(), "legacy")
                after_library = committed_notes(pg_server, T)
                session.add(Row(id=3, note="outer-after"))
                session.flush()
                raise RuntimeError("the unit of work fails")
    except RuntimeError:
        pass
    finally:
        engine.dispose()
    expect_early_commit_or_not(proxy, pg_server, mode, True, after_library)
