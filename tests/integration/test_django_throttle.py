# Per-user write throttling for a Django app (Debian's python3-django 3.2, in-process) whose
# only change is a connection.execute_wrapper hook adding a sqlcommenter tag: a real URLconf,
# a view that writes in a loop, django.test.Client, and pgwarden's [[throttle]] doing the rest.
from __future__ import annotations

import sys
import time
import types
import urllib.parse

import pytest

import harness
from throttle_util import (REJECT_MESSAGE, REJECT_SQLSTATE, bucket_levels, metric, metric_label_values,
                           throttle_rule)

pytestmark = pytest.mark.proxy_only

TABLE = "thr_django_note"
APP_MODULE = "pgwarden_throttle_app"  # the URLconf and middleware, as Django imports them
RATE, BURST = 2, 5


def sqlcommenter_tag(client: str):
    """An execute_wrapper that appends /*client='...'*/ as sqlcommenter does (percent-encoded
    value, at the end). psycopg2 formats the SQL when there are parameters, so '%' doubles then."""
    comment = f" /*client='{urllib.parse.quote(client, safe='')}'*/"

    def wrapper(execute, sql, params, many, context):
        return execute(sql + (comment if params is None else comment.replace("%", "%%")), params, many, context)
    return wrapper


def tag_queries_with_user(get_response):
    """Middleware: every query a request runs carries its user's tag."""
    from django.db import connection

    def middleware(request):
        user = request.headers.get("X-User")
        if not user:
            return get_response(request)
        with connection.execute_wrapper(sqlcommenter_tag(f"user:{user}")):
            return get_response(request)
    return middleware


def write_notes(request):
    """Writes `count` notes one by one; stops at the first database error and says which."""
    from django.db import DatabaseError
    from django.http import JsonResponse
    note = _app.note_model
    written = 0
    try:
        for seq in range(int(request.GET["count"])):
            note.objects.create(author=request.headers["X-User"], seq=seq)
            written += 1
    except DatabaseError as e:
        cause = e.__cause__
        return JsonResponse({"written": written, "sqlstate": cause.pgcode,
                             "message": cause.diag.message_primary, "hint": cause.diag.message_hint}, status=429)
    return JsonResponse({"written": written})


def count_notes(request):
    from django.http import JsonResponse
    return JsonResponse({"count": _app.note_model.objects.filter(author=request.headers["X-User"]).count()})


class _App:
    note_model = None


_app = _App()


@pytest.fixture
def django_app(pg_server):
    """Django in this process, this app's URLconf and middleware, the default database pointed
    at each test's pgwarden. Another test file (test_orm_nesting.py) configures Django with its
    own settings only when nobody has yet: so settings configured here are unconfigured again
    afterwards, and settings found configured are overridden for the test and then restored."""
    import django
    from django.conf import settings
    from django.db import connections
    from django.test import Client
    from django.test.utils import override_settings
    from django.urls import clear_url_caches
    from django.utils.functional import empty

    if APP_MODULE not in sys.modules:
        from django.urls import path
        module = types.ModuleType(APP_MODULE)
        module.urlpatterns = [path("notes/", write_notes), path("notes/count/", count_notes)]
        module.tag_queries_with_user = tag_queries_with_user
        sys.modules[APP_MODULE] = module
    configured_here = not settings.configured
    if configured_here:
        settings.configure(
            DEBUG=False, ALLOWED_HOSTS=["testserver"], ROOT_URLCONF=APP_MODULE, INSTALLED_APPS=[],
            MIDDLEWARE=[f"{APP_MODULE}.tag_queries_with_user"], USE_TZ=True, LOGGING_CONFIG=None,
            DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "postgres",
                                   "USER": "postgres", "HOST": "127.0.0.1", "PORT": "1"}})
        django.setup()
    if _app.note_model is None:
        from django.db import models

        class Note(models.Model):
            author = models.TextField()
            seq = models.IntegerField()

            class Meta:
                app_label = "pgwarden_throttle"
                db_table = TABLE
        _app.note_model = Note

    database = connections["default"]
    saved = dict(database.settings_dict)
    overrides = override_settings(ROOT_URLCONF=APP_MODULE, MIDDLEWARE=[f"{APP_MODULE}.tag_queries_with_user"])
    overrides.enable()

    def client_for(proxy: harness.Pgwarden) -> Client:
        database.close()
        database.settings_dict.update(HOST=proxy.host, PORT=str(proxy.port), ATOMIC_REQUESTS=False,
                                      AUTOCOMMIT=True, CONN_MAX_AGE=0,
                                      OPTIONS={"application_name": "django-app"})
        with pg_server.connect() as conn:
            conn.execute(f"drop table if exists {TABLE}")
        with database.schema_editor() as editor:  # through pgwarden, untagged: no rule takes it
            editor.create_model(_app.note_model)
        database.close()
        return Client(raise_request_exception=True)

    yield client_for
    database.close()
    overrides.disable()
    database.settings_dict.clear()
    database.settings_dict.update(saved)
    if configured_here:
        # Django has no "unconfigure": drop the settings and the connections made from them.
        del connections["default"]
        connections.__dict__.pop("settings", None)
        connections._settings = None
        settings._wrapped = empty
        clear_url_caches()


def notes_of(pg_server, author: str) -> list[int]:
    return pg_server.query_one(f"select coalesce(array_agg(seq order by seq), '{{}}') from {TABLE} where author = %s",
                               (author,))


@pytest.mark.parametrize("action", ["delay", "reject"])
def test_django_user_over_its_rate_is_throttled_and_the_other_is_not(pgwarden_factory, pg_server, django_app, action):
    proxy = pgwarden_factory(throttle_rule("django-users", match={"client": "user:*"}, rate=RATE, burst=BURST,
                                           action=action, max_delay="5s"))
    client = django_app(proxy)
    over = 2 * BURST

    start = time.monotonic()
    alice = client.get("/notes/", {"count": over}, HTTP_X_USER="alice")
    alice_seconds = time.monotonic() - start
    if action == "delay":
        assert (alice.status_code, alice.json()) == (200, {"written": over})
        # Past the burst each write waits for its 1/RATE slot.
        assert (over - BURST) / RATE <= alice_seconds < (over - BURST) / RATE + 1.5, alice_seconds
        assert notes_of(pg_server, "alice") == list(range(over))
    else:
        body = alice.json()
        assert (alice.status_code, body["written"], body["sqlstate"], body["message"]) == (
            429, BURST, REJECT_SQLSTATE, REJECT_MESSAGE)
        assert body["hint"].startswith("retry after ") and body["hint"].endswith(" ms")
        assert notes_of(pg_server, "alice") == list(range(BURST))

    start = time.monotonic()
    bob = client.get("/notes/", {"count": BURST}, HTTP_X_USER="bob")
    bob_seconds = time.monotonic() - start
    assert (bob.status_code, bob.json()) == (200, {"written": BURST})
    # A bucket shared with alice would hold bob back for BURST / RATE = 2.5 s or refuse him.
    assert bob_seconds < 1.5, bob_seconds
    assert notes_of(pg_server, "bob") == list(range(BURST))

    # alice's bucket is empty, but reads do not need it: a throttled read would be refused
    # (reject) or counted as delayed (the exact count is checked below).
    counted = client.get("/notes/count/", HTTP_X_USER="alice")
    assert (counted.status_code, counted.json()) == (200, {"count": over if action == "delay" else BURST})

    assert set(bucket_levels(proxy, "django-users")) == {"user:alice", "user:bob"}
    counter = "pgwarden_throttle_delayed_total" if action == "delay" else "pgwarden_throttle_rejected_total"
    assert metric_label_values(proxy, counter, "client") == {"user:alice"}
    assert metric(proxy, counter, rule="django-users", client="user:alice") == (over - BURST if action == "delay"
                                                                                 else 1)
