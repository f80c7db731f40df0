/* A libpq pipeline-mode client for the interception tests: sends extended-protocol
 * commands given on the command line as one pipeline, then prints one line per result,
 * so a test can compare libpq's view of a batch with what PostgreSQL would answer.
 *
 *   libpq_pipeline CONNINFO STEP...
 *     q:SQL          PQsendQueryParams (Parse/Bind/Describe/Execute of the unnamed statement)
 *     p:NAME:SQL     PQsendPrepare (Parse of a named statement)
 *     x:NAME         PQsendQueryPrepared (Bind/Describe/Execute of a named statement)
 *     sync           PQpipelineSync
 *     final          leave pipeline mode and PQexec("select 1")
 *   Output lines: "ok TAG ROWS", "error SQLSTATE MESSAGE", "aborted", "sync idle|intrans|inerror",
 *   "notice SQLSTATE MESSAGE", "final VALUE". The steps up to and including each "sync" are
 *   sent before any of their results is read. Exit status 0 unless the connection fails. */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fail(PGconn *conn, const char *what) {
    printf("fatal %s: %s\n", what, PQerrorMessage(conn));
    PQfinish(conn);
    exit(2);
}

static void print_notice(void *arg, const PGresult *res) {
    (void)arg;
    const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    printf("notice %s %s\n", sqlstate ? sqlstate : "-", message ? message : "");
}

static const char *transaction_status(PGconn *conn) {
    switch (PQtransactionStatus(conn)) {
        case PQTRANS_IDLE: return "idle";
        case PQTRANS_INTRANS: return "intrans";
        case PQTRANS_INERROR: return "inerror";
        case PQTRANS_ACTIVE: return "active";
        default: return "unknown";
    }
}

static void print_result(const PGresult *res) {
    switch (PQresultStatus(res)) {
        case PGRES_COMMAND_OK:
        case PGRES_TUPLES_OK:
        case PGRES_EMPTY_QUERY:
            printf("ok %s %d\n", PQcmdStatus((PGresult *)res), PQntuples(res));
            break;
        case PGRES_FATAL_ERROR: {
            const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
            printf("error %s %s\n", sqlstate ? sqlstate : "-", message ? message : "");
            break;
        }
        case PGRES_PIPELINE_ABORTED:
            printf("aborted\n");
            break;
        default:
            printf("unexpected %s\n", PQresStatus(PQresultStatus(res)));
            break;
    }
}

/* Reads the answers to steps [first, last): one result set per command, one sync result
 * per sync. */
static void read_results(PGconn *conn, char **steps, int first, int last) {
    for (int i = first; i < last; ++i) {
        if (strcmp(steps[i], "sync") == 0) {
            PGresult *res = PQgetResult(conn);
            if (!res) fail(conn, "no result for sync");
            if (PQresultStatus(res) != PGRES_PIPELINE_SYNC) {
                printf("unexpected %s at sync\n", PQresStatus(PQresultStatus(res)));
                PQclear(res);
                fail(conn, "sync out of step");
            }
            PQclear(res);
            printf("sync %s\n", transaction_status(conn));
            fflush(stdout);
            continue;
        }
        PGresult *res;
        int seen = 0;
        while ((res = PQgetResult(conn)) != NULL) {
            print_result(res);
            PQclear(res);
            ++seen;
        }
        if (seen == 0) fail(conn, "no result for a command");
        fflush(stdout);
    }
}

static void send_step(PGconn *conn, char *step) {
    int ok;
    if (strncmp(step, "q:", 2) == 0) {
        ok = PQsendQueryParams(conn, step + 2, 0, NULL, NULL, NULL, NULL, 0);
    } else if (strncmp(step, "p:", 2) == 0) {
        char *name = step + 2;
        char *colon = strchr(name, ':');
        if (!colon) fail(conn, "p:NAME:SQL needs a name");
        *colon = '\0';
        ok = PQsendPrepare(conn, name, colon + 1, 0, NULL);
    } else if (strncmp(step, "x:", 2) == 0) {
        ok = PQsendQueryPrepared(conn, step + 2, 0, NULL, NULL, NULL, 0);
    } else if (strcmp(step, "sync") == 0) {
        ok = PQpipelineSync(conn);
    } else {
        printf("fatal unknown step %s\n", step);
        exit(2);
    }
    if (!ok) fail(conn, step);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CONNINFO STEP...\n", argv[0]);
        return 2;
    }
    PGconn *conn = PQconnectdb(argv[1]);
    if (PQstatus(conn) != CONNECTION_OK) fail(conn, "connect");
    PQsetNoticeReceiver(conn, print_notice, NULL);

    int batch_start = 2;
    while (batch_start < argc) {
        int end = batch_start;
        while (end < argc && strcmp(argv[end], "final") != 0) ++end;
        if (end > batch_start) {
            if (!PQenterPipelineMode(conn)) fail(conn, "enter pipeline mode");
            /* One Sync's worth at a time: libpq reports the transaction status only when
             * nothing more is queued. */
            int first = batch_start;
            while (first < end) {
                int last = first;
                while (last < end && strcmp(argv[last], "sync") != 0) ++last;
                if (last < end) ++last;
                for (int i = first; i < last; ++i) send_step(conn, argv[i]);
                if (PQflush(conn) != 0) fail(conn, "flush");
                read_results(conn, argv, first, last);
                first = last;
            }
            if (!PQexitPipelineMode(conn)) fail(conn, "exit pipeline mode");
        }
        if (end < argc) {
            PGresult *res = PQexec(conn, "select 1");
            if (PQresultStatus(res) == PGRES_TUPLES_OK)
                printf("final %s\n", PQgetvalue(res, 0, 0));
            else
                print_result(res);
            PQclear(res);
            fflush(stdout);
        }
        batch_start = end + 1;
    }
    PQfinish(conn);
    return 0;
}
