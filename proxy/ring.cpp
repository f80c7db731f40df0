// The worker's io_uring loop (see ring.hpp).
#include "proxy/ring.hpp"

#include <poll.h>
#include <sys/mman.h>

#include <algorithm>
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

void* Ring::Recycled::operator new(std::size_t size) {
    if (size > kOpBlock) return ::operator new(size);
    if (void* block = free_ops.head) {
        free_ops.head = *static_cast<void**>(block);
        --free_ops.count;
        return block;
    }
    return ::operator new(kOpBlock);
}

void Ring::Recycled::operator delete(void* block, std::size_t size) {
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
constexpr unsigned short kBufferGroup = 0;
// A receiver that would need a provided buffer when fewer than this are left receives
// into its reader's own room instead.
constexpr unsigned kBufferReserve = 16;

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
    ring->setup_buffers();  // without them, every receive is one of its own
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
    // Receivers of streams that outlive the ring (their sessions end with the io_context)
    // must not touch it again.
    for (Receiver* r = receivers_; r != nullptr; r = r->next_) {
        r->ring_ = nullptr;
        r->chunks_.clear();
        r->head_ = 0;
    }
    receivers_ = nullptr;
    if (buffer_ring_) io_uring_unregister_buf_ring(&ring_, kBufferGroup);
    io_uring_queue_exit(&ring_);
    if (buffer_ring_) ::munmap(buffer_ring_, kBufferCount * sizeof(io_uring_buf));
    if (buffers_) ::munmap(buffers_, std::size_t(kBufferCount) * kBufferSize);
}

bool Ring::setup_buffers() {
    const std::size_t ring_bytes = kBufferCount * sizeof(io_uring_buf);
    void* ring_memory = ::mmap(nullptr, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring_memory == MAP_FAILED) return false;
    // Pages of the buffers are only touched by what is received into them.
    void* memory = ::mmap(nullptr, std::size_t(kBufferCount) * kBufferSize, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        ::munmap(ring_memory, ring_bytes);
        return false;
    }
    auto* ring = static_cast<io_uring_buf_ring*>(ring_memory);
    io_uring_buf_ring_init(ring);
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<std::uint64_t>(ring);
    reg.ring_entries = kBufferCount;
    reg.bgid = kBufferGroup;
    if (io_uring_register_buf_ring(&ring_, &reg, 0) != 0) {
        ::munmap(ring_memory, ring_bytes);
        ::munmap(memory, std::size_t(kBufferCount) * kBufferSize);
        return false;
    }
    buffer_ring_ = ring;
    buffers_ = static_cast<char*>(memory);
    for (unsigned id = 0; id < kBufferCount; ++id)
        io_uring_buf_ring_add(buffer_ring_, buffer(id), kBufferSize, static_cast<unsigned short>(id),
                              io_uring_buf_ring_mask(kBufferCount), static_cast<int>(id));
    io_uring_buf_ring_advance(buffer_ring_, kBufferCount);
    return true;
}

void Ring::give_back(unsigned id) {
    io_uring_buf_ring_add(buffer_ring_, buffer(id), kBufferSize, static_cast<unsigned short>(id),
                          io_uring_buf_ring_mask(kBufferCount), 0);
    io_uring_buf_ring_advance(buffer_ring_, 1);
    --buffers_held_;
}

Ring::Receiver* Ring::make_receiver(int fd) {
    if (buffer_ring_ == nullptr) return nullptr;
    return new Receiver(*this, fd);
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

void Ring::start_recv_multishot(int fd, Op* op) {
    track(op);
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_recv_multishot(sqe, fd, nullptr, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = kBufferGroup;
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
            const unsigned cqe_flags = cqe->flags;
            const bool more = cqe_flags & IORING_CQE_F_MORE;
            io_uring_cqe_seen(&ring_, cqe);
            if (data == kEpollTag) {
                asio_ready = true;
                if (!more)
                    epoll_watched_ = false;  // the kernel ended the multishot poll: arm it again
                continue;
            }
            if (data == kCancelTag) continue;
            Op* op = reinterpret_cast<Op*>(data);
            if (!more) untrack(op);
            op->complete(result, cqe_flags);
        }
        if (asio_ready) run_asio();
    }
    current_ = nullptr;
}

// Ring::Receiver (see ring.hpp). The kernel holds the receiver while armed_ or single_;
// whatever the kernel or a waiter's completion does, a function here touches nothing of
// the receiver after it completed the waiter (which may end the session, and so release
// and delete the receiver) or deleted it.
Ring::Receiver::Receiver(Ring& ring, int fd) : ring_(&ring), fd_(fd) {
    next_ = ring.receivers_;
    if (next_) next_->prev_ = this;
    ring.receivers_ = this;
}

void Ring::Receiver::drop() {
    if (ring_) {
        if (prev_)
            prev_->next_ = next_;
        else
            ring_->receivers_ = next_;
        if (next_) next_->prev_ = prev_;
    }
    delete this;
}

std::size_t Ring::Receiver::copy_out(asio::mutable_buffer room) {
    std::size_t n = 0;
    char* to = static_cast<char*>(room.data());
    while (n < room.size() && queued()) {
        Chunk& chunk = chunks_[head_];
        const std::size_t k = std::min<std::size_t>(chunk.size, room.size() - n);
        std::memcpy(to + n, ring_->buffer(chunk.id) + chunk.offset, k);
        n += k;
        chunk.offset += static_cast<std::uint32_t>(k);
        chunk.size -= static_cast<std::uint32_t>(k);
        if (chunk.size == 0) {
            ring_->give_back(chunk.id);
            ++head_;
        }
    }
    if (!queued()) {
        chunks_.clear();
        head_ = 0;
    }
    return n;
}

bool Ring::Receiver::take(asio::mutable_buffer room, std::size_t& n, boost::system::error_code& ec) {
    n = 0;
    if (queued()) {
        n = copy_out(room);
        return true;
    }
    if (end_) {
        ec = end_;
        return true;
    }
    return false;
}

void Ring::Receiver::wait(Waiter* waiter, asio::mutable_buffer room) {
    waiter_ = waiter;
    room_ = room;
    abort_ = false;
    if (ring_ == nullptr) return;  // the thread's loop is over; release() destroys the waiter
    if (queued() || end_) {
        // Callers take() first, so this does not happen on the relay's path; completing
        // here, inside the initiation, would resume the coroutine within itself.
        boost::system::error_code ec = end_;
        const std::size_t n = queued() ? copy_out(room) : 0;
        if (n > 0) ec = {};
        waiter_ = nullptr;
        struct Pending {
            Waiter* waiter;
            boost::system::error_code ec;
            std::size_t n;
            Pending(Waiter* w, boost::system::error_code e, std::size_t k) : waiter(w), ec(e), n(k) {}
            Pending(Pending&& other) noexcept : waiter(std::exchange(other.waiter, nullptr)), ec(other.ec), n(other.n) {}
            ~Pending() {
                if (waiter) waiter->destroy();
            }
            void operator()() { std::exchange(waiter, nullptr)->complete(ec, n); }
        };
        asio::post(ring_->io_, Pending(waiter, ec, n));
        return;
    }
    if (!armed_) arm();  // when armed, the next completion serves the waiter
}

void Ring::Receiver::arm() {
    if (ring_->multishot_ && ring_->buffers_free() >= kBufferReserve) {
        armed_ = true;
        ring_->start_recv_multishot(fd_, this);
    } else {
        single_ = true;
        ring_->start_recv(fd_, room_.data(), room_.size(), this);
    }
}

void Ring::Receiver::finish_wait(boost::system::error_code ec, std::size_t n) {
    Waiter* waiter = waiter_;
    waiter_ = nullptr;
    abort_ = false;
    waiter->complete(ec, n);
}

void Ring::Receiver::cancel_wait() {
    if (waiter_ == nullptr || abort_ || ring_ == nullptr) return;
    abort_ = true;
    if ((armed_ || single_) && !cancelling_) {
        cancelling_ = true;
        ring_->cancel(this);
    }
}

void Ring::Receiver::complete(int result, unsigned flags) {
    if (single_) {
        // A receive into the waiter's own room.
        single_ = false;
        cancelling_ = false;
        if (released_ || waiter_ == nullptr) {
            if (released_) drop();
            return;
        }
        boost::system::error_code ec;
        const std::size_t n = transferred(result, true, ec);
        finish_wait(ec, n);
        return;
    }
    if (!(flags & IORING_CQE_F_MORE)) {
        armed_ = false;
        cancelling_ = false;
    }
    if (flags & IORING_CQE_F_BUFFER) {
        const unsigned id = flags >> IORING_CQE_BUFFER_SHIFT;
        ++ring_->buffers_held_;
        if (released_ || result <= 0) {
            ring_->give_back(id);
        } else {
            chunks_.push_back({static_cast<std::uint16_t>(id), 0, static_cast<std::uint32_t>(result)});
            delivered_ = true;
        }
        if (result == 0) end_ = asio::error::eof;  // today's kernels keep the buffer then
    } else if (result == 0) {
        end_ = asio::error::eof;
    } else if (result == -EINVAL && !delivered_) {
        // A kernel before 6.0 has provided buffers but no multishot receive: from here on,
        // this ring receives once per wait.
        ring_->multishot_ = false;
    } else if (result < 0 && result != -ENOBUFS && result != -ECANCELED) {
        end_ = boost::system::error_code(-result, boost::system::system_category());
    }
    if (released_) {
        if (!armed_) drop();
        return;
    }
    if (waiter_ == nullptr) {
        // Nobody reads: past kMaxChunks, stop receiving until the reader catches up.
        if (armed_ && !cancelling_ && chunks_.size() - head_ >= kMaxChunks) {
            cancelling_ = true;
            ring_->cancel(this);
        }
        return;
    }
    if (queued()) {
        const std::size_t n = copy_out(room_);
        finish_wait({}, n);
        return;
    }
    if (end_) {
        finish_wait(end_, 0);
        return;
    }
    if (armed_) return;
    if (abort_) {
        finish_wait(asio::error::operation_aborted, 0);
        return;
    }
    arm();  // ended for want of buffers, or cancelled while the reader caught up
}

void Ring::Receiver::release() {
    // A single receive into room_ cannot be in flight here with its room already freed: a
    // reader that waits holds its session, so the stream is released only once the wait
    // ended, or from ~Ring, whose drain has the kernel finish before memory is freed.
    released_ = true;
    if (Waiter* waiter = std::exchange(waiter_, nullptr)) waiter->destroy();
    if (ring_ == nullptr) {
        drop();
        return;
    }
    while (queued()) {
        ring_->give_back(chunks_[head_].id);
        ++head_;
    }
    chunks_.clear();
    head_ = 0;
    if (armed_ || single_) {
        if (!cancelling_) {
            cancelling_ = true;
            ring_->cancel(this);
        }
        return;  // deleted at the kernel's last completion
    }
    drop();
}

void Ring::Receiver::destroy() {
    // The ring is going away and has taken this receiver's operation back.
    armed_ = false;
    single_ = false;
    if (released_) {
        drop();
        return;
    }
    if (Waiter* waiter = std::exchange(waiter_, nullptr)) waiter->destroy();  // may release this
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
void Ring::start_recv_multishot(int, Op*) {}
void Ring::cancel(Op*) {}
Ring::Receiver* Ring::make_receiver(int) { return nullptr; }
void Ring::give_back(unsigned) {}
Ring::Receiver::Receiver(Ring& ring, int fd) : ring_(&ring), fd_(fd) {}
bool Ring::Receiver::take(asio::mutable_buffer, std::size_t& n, boost::system::error_code&) {
    n = 0;
    return false;
}
void Ring::Receiver::wait(Waiter* waiter, asio::mutable_buffer) { waiter->destroy(); }
void Ring::Receiver::cancel_wait() {}
void Ring::Receiver::release() { delete this; }
void Ring::Receiver::complete(int, unsigned) {}
void Ring::Receiver::destroy() {}
#endif

}  // namespace pgwarden::proxy
