// The worker's io_uring loop (see ring.hpp).
#include "proxy/ring.hpp"

#include <poll.h>

#include <cerrno>
#include <cstring>

#include "proxy/stream.hpp"

namespace pgwarden::proxy {

thread_local Ring* Ring::current_ = nullptr;

namespace {
// Freed operation blocks of one thread, for reuse; bounded, so a burst leaves no hoard.
constexpr std::size_t kOpBlock = 192;
constexpr int kMaxFreeOps = 256;
struct FreeOps {
    void* head = nullptr;
    int count = 0;
    ~FreeOps() {
        while (head) {
            void* next = *static_cast<void**>(head);
            ::operator delete(head);
            head = next;
        }
    }
};
thread_local FreeOps free_ops;
}  // namespace

void* Ring::Op::operator new(std::size_t size) {
    if (size > kOpBlock) return ::operator new(size);
    if (void* block = free_ops.head) {
        free_ops.head = *static_cast<void**>(block);
        --free_ops.count;
        return block;
    }
    return ::operator new(kOpBlock);
}

void Ring::Op::operator delete(void* block, std::size_t size) {
    if (size > kOpBlock || free_ops.count >= kMaxFreeOps) {
        ::operator delete(block);
        return;
    }
    *static_cast<void**>(block) = free_ops.head;
    free_ops.head = block;
    ++free_ops.count;
}

// How the loop and Asio share the thread.
//
// Asio runs only inside io_context::poll(), which this loop calls when Asio's epoll
// descriptor reports something (a timer, a socket still on Asio, the interrupter). Outside
// poll() the thread sleeps in io_uring_enter, not in epoll_wait, and Asio does not know
// that: its scheduler wakes a sleeping thread only by "interrupting the task" (making the
// epoll descriptor readable), and only while it believes the task is blocked, which it
// records in `task_interrupted_` = false. After poll() that flag is true. The loop sets it
// back to false once nothing is queued, so that a handler posted later (by another thread,
// or by a session resumed from a ring completion) interrupts the task, which the ring's
// poll of the epoll descriptor reports. The flag and the queue are private to the
// scheduler; they are reached as stream.cpp reaches the reactor's members, and only with
// Boost 1.74, whose layout this was written against.
#if BOOST_VERSION == 107400 && defined(BOOST_ASIO_HAS_EPOLL) && !defined(BOOST_ASIO_HAS_IOCP)
namespace {

using Scheduler = asio::detail::scheduler;
using Operation = asio::detail::scheduler_operation;
using Reactor = asio::detail::epoll_reactor;

// Whether a queue that starts with `front` holds nothing but the reactor's task.
bool queue_is_idle(Operation* front, Operation* task) {
    if (front == nullptr) return true;
    return front == task && asio::detail::op_queue_access::next(front) == nullptr;
}

// Explicit instantiation does not check access in its template arguments: these friends
// reach the scheduler's and the reactor's private members.
template <auto Mutex, auto Flag, auto Queue, auto TaskOp>
struct SchedulerAccess {
    friend void settle_scheduler(Scheduler& s, bool& idle) {
        asio::detail::conditionally_enabled_mutex::scoped_lock lock(s.*Mutex);
        idle = queue_is_idle((s.*Queue).front(), &(s.*TaskOp));
        if (idle) s.*Flag = false;
    }
};
void settle_scheduler(Scheduler& s, bool& idle);
template struct SchedulerAccess<&Scheduler::mutex_, &Scheduler::task_interrupted_,
                                &Scheduler::op_queue_, &Scheduler::task_operation_>;

template <auto EpollFd>
struct ReactorAccess {
    friend int epoll_descriptor(Reactor& r) { return r.*EpollFd; }
};
int epoll_descriptor(Reactor& r);
template struct ReactorAccess<&Reactor::epoll_fd_>;

constexpr std::uint64_t kEpollTag = 1;   // the poll of Asio's epoll descriptor
constexpr std::uint64_t kCancelTag = 2;  // the cancellation at shutdown
constexpr unsigned kEntries = 256;       // submission queue; completions get 16 times that

}  // namespace

std::unique_ptr<Ring> Ring::open(asio::io_context& io, std::string& why) {
    // Creates the reactor now (it registers the scheduler's task) and finds its descriptor.
    Reactor& reactor = asio::use_service<Reactor>(io);
    reactor.init_task();  // what creating the first socket would do
    int epoll_fd = epoll_descriptor(reactor);
    std::unique_ptr<Ring> ring(new Ring(io, epoll_fd));
    io_uring_params params{};
    // Deferred task work: completions are produced only inside io_uring_enter, so one call
    // per turn both submits and collects. Needs Linux 6.1.
    params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
    params.cq_entries = kEntries * 16;
    int rc = io_uring_queue_init_params(kEntries, &ring->ring_, &params);
    if (rc < 0) {
        why = std::string("io_uring_setup: ") + std::strerror(-rc);
        return nullptr;
    }
    ring->initialised_ = true;
    if (!(params.features & IORING_FEAT_NODROP)) {
        why = "io_uring without IORING_FEAT_NODROP";
        return nullptr;
    }
    return ring;
}

Ring::Ring(asio::io_context& io, int epoll_fd) : io_(io), epoll_fd_(epoll_fd) {}

Ring::~Ring() {
    if (!initialised_) return;
    // Cancel what is in flight and wait for it, so that the kernel no longer writes into
    // buffers that the sessions' destruction frees; then destroy the operations, which ends
    // their coroutines, as Asio does with the handlers it holds at shutdown.
    if (in_flight_ != nullptr) {
        io_uring_sqe* sqe = next_sqe();
        io_uring_prep_cancel(sqe, nullptr, IORING_ASYNC_CANCEL_ANY);
        io_uring_sqe_set_data64(sqe, kCancelTag);
        for (int turns = 0; in_flight_ != nullptr && turns < 1000; ++turns) {
            __kernel_timespec wait{0, 10'000'000};
            io_uring_cqe* cqe = nullptr;
            io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &wait, nullptr);
            while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
                const std::uint64_t data = io_uring_cqe_get_data64(cqe);
                const bool more = cqe->flags & IORING_CQE_F_MORE;
                io_uring_cqe_seen(&ring_, cqe);
                if (data == kEpollTag || data == kCancelTag || more) continue;
                Op* op = reinterpret_cast<Op*>(data);
                untrack(op);
                op->destroy();
            }
        }
    }
    while (Op* op = in_flight_) {  // only if the kernel never answered: leak nothing of ours
        untrack(op);
        op->destroy();
    }
    io_uring_queue_exit(&ring_);
}

io_uring_sqe* Ring::next_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {
        io_uring_submit(&ring_);  // the submission queue is full: hand it over now
        sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
}

void Ring::track(Op* op) {
    op->prev = nullptr;
    op->next = in_flight_;
    if (in_flight_) in_flight_->prev = op;
    in_flight_ = op;
}

void Ring::untrack(Op* op) {
    if (op->prev)
        op->prev->next = op->next;
    else
        in_flight_ = op->next;
    if (op->next) op->next->prev = op->prev;
}

void Ring::start_recv(int fd, void* data, std::size_t size, Op* op) {
    track(op);
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_recv(sqe, fd, data, size, 0);
    io_uring_sqe_set_data(sqe, op);
}

void Ring::start_sendmsg(int fd, const msghdr* message, Op* op) {
    track(op);
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_sendmsg(sqe, fd, message, MSG_NOSIGNAL);
    io_uring_sqe_set_data(sqe, op);
}

void Ring::cancel(Op* op) {
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_cancel(sqe, op, 0);
    io_uring_sqe_set_data64(sqe, kCancelTag);
}

void Ring::watch_epoll() {
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_poll_multishot(sqe, epoll_fd_, POLLIN);
    io_uring_sqe_set_data64(sqe, kEpollTag);
    epoll_watched_ = true;
}

void Ring::run_asio() {
    auto& scheduler = asio::use_service<Scheduler>(io_);
    for (;;) {
        io_.poll();
        if (io_.stopped()) return;
        bool idle = false;
        settle_scheduler(scheduler, idle);
        if (idle) return;
    }
}

void Ring::run() {
    current_ = this;
    run_asio();
    while (!io_.stopped()) {
        if (!epoll_watched_) watch_epoll();
        io_uring_cqe* cqe = nullptr;
        int rc = io_uring_submit_and_wait(&ring_, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY && rc != -ETIME) {
            // Nothing here can fail but for a bug; say so loudly rather than spin.
            throw std::system_error(-rc, std::system_category(), "io_uring_enter");
        }
        bool asio_ready = false;
        while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
            const std::uint64_t data = io_uring_cqe_get_data64(cqe);
            const int result = cqe->res;
            const bool more = cqe->flags & IORING_CQE_F_MORE;
            io_uring_cqe_seen(&ring_, cqe);
            if (data == kEpollTag) {
                asio_ready = true;
                if (!more)
                    epoll_watched_ = false;  // the kernel ended the multishot poll: arm it again
                continue;
            }
            if (data == kCancelTag) continue;
            Op* op = reinterpret_cast<Op*>(data);
            untrack(op);
            op->complete(result);
        }
        if (asio_ready) run_asio();
    }
    current_ = nullptr;
}

#else
std::unique_ptr<Ring> Ring::open(asio::io_context&, std::string& why) {
    why = "built without the Asio internals the ring needs (Boost 1.74 with epoll)";
    return nullptr;
}
Ring::~Ring() = default;
void Ring::run() {}
void Ring::start_recv(int, void*, std::size_t, Op*) {}
void Ring::start_sendmsg(int, const msghdr*, Op*) {}
void Ring::cancel(Op*) {}
#endif

}  // namespace pgwarden::proxy
