// How much of a relay's CPU per round trip is system-call overhead on this host, and how
// much batching the calls through io_uring would take off. Not part of the build or the
// tests: a measuring tool for docs/performance.md ("What a system call costs here").
//
//   cc -O2 -o /tmp/relay_syscalls tests/bench/relay_syscalls.c -luring   # liburing-dev
//   /tmp/relay_syscalls [pairs] [seconds] [rounds]                     # 16 5 3
//
// Three processes on loopback TCP, like pgbench, a proxy and PostgreSQL: a client that
// keeps `pairs` connections each sending a 100-byte request and waiting for its 300-byte
// answer; an echo server that answers each request; and between them a relay, measured.
// The relay runs one thread, in one of two modes, interleaved round by round:
//   epoll:    epoll_wait, then recv and send per message (PgBouncer's and pgwarden's way);
//   io_uring: a receive is always posted on every socket; each completion posts the send
//             to the other side and the next receive; one io_uring_submit_and_wait per
//             loop turn submits everything and waits for the next completion. The ring
//             defers task work to that call (IORING_SETUP_DEFER_TASKRUN, kernel 6.1);
//             RELAY_URING_PLAIN=1 sets it up without.
// It prints the relay's CPU (user + system, from getrusage) per round trip and its system
// calls per round trip (counted by the relay itself).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { kRequest = 100, kAnswer = 300, kMaxPairs = 256, kBuf = 4096 };

static void die(const char* what) {
    perror(what);
    exit(1);
}

static int listen_on(int* port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || bind(fd, (struct sockaddr*)&a, sizeof a) || listen(fd, 512)) die("listen");
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr*)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr*)&a, sizeof a)) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static int accept_one(int listener) {
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) die("accept");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec + u.ru_stime.tv_usec / 1e6;
}

// Reads or writes exactly n bytes on a blocking socket; 0 at end of stream.
static int exact(int fd, char* buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? send(fd, buf + done, n - done, MSG_NOSIGNAL) : recv(fd, buf + done, n - done, 0);
        if (r <= 0) return 0;
        done += (size_t)r;
    }
    return 1;
}

// The echo server: one thread per connection would hide nothing; a plain epoll loop.
static void serve(int listener, int pairs) {
    int ep = epoll_create1(0);
    for (int i = 0; i < pairs; ++i) {
        int fd = accept_one(listener);
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    }
    char buf[kBuf], answer[kAnswer];
    memset(answer, 'a', sizeof answer);
    struct epoll_event events[kMaxPairs];
    for (;;) {
        int n = epoll_wait(ep, events, kMaxPairs, -1);
        for (int i = 0; i < n; ++i) {
            int fd = events[i].data.fd;
            if (!exact(fd, buf, kRequest, 0)) exit(0);
            if (!exact(fd, answer, kAnswer, 1)) exit(0);
        }
    }
}

// The client: every connection keeps one request in flight; counts round trips.
static void drive(int port, int pairs, volatile uint64_t* trips, int control) {
    int ep = epoll_create1(0);
    int fds[kMaxPairs];
    char request[kRequest], buf[kBuf];
    memset(request, 'q', sizeof request);
    for (int i = 0; i < pairs; ++i) {
        fds[i] = connect_to(port);
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
    }
    struct epoll_event ce = {.events = EPOLLIN, .data.fd = control};
    epoll_ctl(ep, EPOLL_CTL_ADD, control, &ce);
    for (int i = 0; i < pairs; ++i) exact(fds[i], request, kRequest, 1);
    struct epoll_event events[kMaxPairs + 1];
    for (;;) {
        int n = epoll_wait(ep, events, kMaxPairs + 1, -1);
        for (int i = 0; i < n; ++i) {
            int fd = events[i].data.fd;
            if (fd == control) {
                for (int j = 0; j < pairs; ++j) close(fds[j]);
                return;
            }
            if (!exact(fd, buf, kAnswer, 0)) return;
            __atomic_add_fetch(trips, 1, __ATOMIC_RELAXED);
            exact(fd, request, kRequest, 1);
        }
    }
}

static uint64_t syscalls;

static void relay_epoll(int* client, int* server, int pairs, const volatile int* stop) {
    int ep = epoll_create1(0);
    ++syscalls;
    for (int i = 0; i < pairs; ++i) {
        struct epoll_event a = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        struct epoll_event b = {.events = EPOLLIN, .data.u64 = (uint64_t)(i + kMaxPairs)};
        epoll_ctl(ep, EPOLL_CTL_ADD, client[i], &a);
        epoll_ctl(ep, EPOLL_CTL_ADD, server[i], &b);
        syscalls += 2;
    }
    char buf[kBuf];
    struct epoll_event events[2 * kMaxPairs];
    while (!*stop) {
        int n = epoll_wait(ep, events, 2 * kMaxPairs, 100);
        ++syscalls;
        for (int i = 0; i < n; ++i) {
            uint64_t id = events[i].data.u64;
            int from = id < kMaxPairs ? client[id] : server[id - kMaxPairs];
            int to = id < kMaxPairs ? server[id] : client[id - kMaxPairs];
            ssize_t r = recv(from, buf, sizeof buf, MSG_DONTWAIT);
            ++syscalls;
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                return;
            }
            if (!exact(to, buf, (size_t)r, 1)) return;
            ++syscalls;
        }
    }
}

enum { kRecv = 0, kSend = 1 };

static void relay_uring(int* client, int* server, int pairs, const volatile int* stop) {
    struct io_uring ring;
    // Completions are run only when the relay asks for them (DEFER_TASKRUN, kernel 6.1):
    // no interrupt of the relay for every arriving packet; RELAY_URING_PLAIN=1 leaves it.
    const char* plain = getenv("RELAY_URING_PLAIN");
    const unsigned flags =
        plain && *plain == '1' ? 0 : IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init(4 * kMaxPairs, &ring, flags)) die("io_uring_queue_init");
    ++syscalls;
    // One buffer per direction per pair; a message is sent before the next receive is posted.
    static char bufs[2 * kMaxPairs][kBuf];
    for (int s = 0; s < 2 * pairs; ++s) {
        int i = s % pairs;
        int fd = s < pairs ? client[i] : server[i];
        int slot = s < pairs ? i : i + kMaxPairs;
        struct io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        io_uring_prep_recv(sqe, fd, bufs[slot], kBuf, 0);
        io_uring_sqe_set_data64(sqe, ((uint64_t)slot << 1) | kRecv);
    }
    while (!*stop) {
        struct __kernel_timespec timeout = {.tv_sec = 0, .tv_nsec = 100000000};
        struct io_uring_cqe* cqe = NULL;
        io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &timeout, NULL);
        ++syscalls;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            uint64_t data = io_uring_cqe_get_data64(cqe);
            int slot = (int)(data >> 1);
            int from_client = slot < kMaxPairs;
            int i = from_client ? slot : slot - kMaxPairs;
            if (cqe->res <= 0) return;
            if ((data & 1) == kRecv) {
                // Forward what came, then receive again once the send is done.
                struct io_uring_sqe* sqe = io_uring_get_sqe(&ring);
                io_uring_prep_send(sqe, from_client ? server[i] : client[i], bufs[slot], (unsigned)cqe->res,
                                   MSG_NOSIGNAL);
                io_uring_sqe_set_data64(sqe, ((uint64_t)slot << 1) | kSend);
            } else {
                struct io_uring_sqe* sqe = io_uring_get_sqe(&ring);
                io_uring_prep_recv(sqe, from_client ? client[i] : server[i], bufs[slot], kBuf, 0);
                io_uring_sqe_set_data64(sqe, ((uint64_t)slot << 1) | kRecv);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
    io_uring_queue_exit(&ring);
}

static volatile int stop_flag;
static void on_alarm(int sig) {
    (void)sig;
    stop_flag = 1;
}

// One measured run: fresh processes and connections, `seconds` long. Returns the relay's
// CPU microseconds and system calls per round trip.
static void run(int uring, int pairs, int seconds, double* cpu_us, double* calls, double* tps) {
    int server_port, relay_port;
    int server_listener = listen_on(&server_port);
    int relay_listener = listen_on(&relay_port);
    volatile uint64_t* trips = mmap(NULL, sizeof *trips, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    *trips = 0;
    int control[2];
    if (pipe(control)) die("pipe");
    fflush(stdout);  // the children must not print what the parent buffered
    pid_t server = fork();
    if (server == 0) {
        serve(server_listener, pairs);
        exit(0);
    }
    pid_t client = fork();
    if (client == 0) {
        drive(relay_port, pairs, trips, control[0]);
        exit(0);
    }
    int client_fds[kMaxPairs], server_fds[kMaxPairs];
    for (int i = 0; i < pairs; ++i) {
        client_fds[i] = accept_one(relay_listener);
        server_fds[i] = connect_to(server_port);
    }
    stop_flag = 0;
    syscalls = 0;
    const uint64_t trips_before = *trips;
    const double cpu_before = cpu_seconds(), started = now();
    alarm((unsigned)seconds);
    if (uring)
        relay_uring(client_fds, server_fds, pairs, &stop_flag);
    else
        relay_epoll(client_fds, server_fds, pairs, &stop_flag);
    const double cpu = cpu_seconds() - cpu_before, elapsed = now() - started;
    const uint64_t done = *trips - trips_before;
    if (write(control[1], "x", 1) != 1) die("write");
    for (int i = 0; i < pairs; ++i) close(client_fds[i]), close(server_fds[i]);
    waitpid(client, NULL, 0);
    waitpid(server, NULL, 0);
    close(server_listener), close(relay_listener), close(control[0]), close(control[1]);
    munmap((void*)trips, sizeof *trips);
    *cpu_us = done ? cpu * 1e6 / (double)done : 0;
    *calls = done ? (double)syscalls / (double)done : 0;
    *tps = (double)done / elapsed;
}

static int by_value(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

int main(int argc, char** argv) {
    const int pairs = argc > 1 ? atoi(argv[1]) : 16;
    const int seconds = argc > 2 ? atoi(argv[2]) : 5;
    const int rounds = argc > 3 ? atoi(argv[3]) : 3;
    if (pairs < 1 || pairs > kMaxPairs || seconds < 1 || rounds < 1 || rounds > 32) {
        fprintf(stderr, "usage: %s [pairs 1-%d] [seconds] [rounds 1-32]\n", argv[0], kMaxPairs);
        return 2;
    }
    signal(SIGALRM, on_alarm);
    signal(SIGPIPE, SIG_IGN);
    // A null system call first: what entering and leaving the kernel costs here.
    const double t0 = now();
    for (int i = 0; i < 200000; ++i) getppid();
    printf("null system call: %.0f ns\n", (now() - t0) / 200000 * 1e9);
    double cpu[2][32], calls[2][32], tps[2][32];
    for (int r = 0; r < rounds; ++r)
        for (int mode = 0; mode < 2; ++mode) {
            run(mode, pairs, seconds, &cpu[mode][r], &calls[mode][r], &tps[mode][r]);
            printf("round %d %-8s relay CPU %6.2f us/trip, %5.2f system calls/trip, %8.0f trips/s\n", r + 1,
                   mode ? "io_uring" : "epoll", cpu[mode][r], calls[mode][r], tps[mode][r]);
            fflush(stdout);
        }
    for (int mode = 0; mode < 2; ++mode) {
        qsort(cpu[mode], (size_t)rounds, sizeof(double), by_value);
        qsort(calls[mode], (size_t)rounds, sizeof(double), by_value);
        qsort(tps[mode], (size_t)rounds, sizeof(double), by_value);
    }
    const int m = rounds / 2;
    printf("median  epoll    relay CPU %6.2f us/trip, %5.2f system calls/trip, %8.0f trips/s\n", cpu[0][m], calls[0][m],
           tps[0][m]);
    printf("median  io_uring relay CPU %6.2f us/trip, %5.2f system calls/trip, %8.0f trips/s\n", cpu[1][m], calls[1][m],
           tps[1][m]);
    printf("io_uring / epoll: CPU per trip %.2f, trips/s %.2f\n", cpu[1][m] / cpu[0][m], tps[1][m] / tps[0][m]);
    return 0;
}
