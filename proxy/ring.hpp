// An io_uring event loop for a worker thread, with Asio's io_context inside it.
//
// With epoll a relay makes one system call per read and per write, and one per wait:
// about four per transaction, which on a virtual machine is most of a proxy's cost
// (docs/performance.md). With io_uring, reads and writes are queued in memory and one
// io_uring_enter per turn of the loop submits all of them and collects what finished,
// for every session of the thread at once.
//
// Sessions keep using Asio for everything but the relay's reads and writes of plain
// (non-TLS) sockets: startup, TLS, timers, posting from other threads. The ring watches
// Asio's epoll descriptor and runs io_context::poll() only when that descriptor has
// something. A socket whose reads and writes go through the ring is taken out of Asio's
// epoll set, so that its traffic does not wake Asio.
//
// Boost 1.74's Asio has no io_uring backend and no hook for waking a thread blocked
// outside io_context::run(); ring.cpp reaches into its scheduler for that. Where that is
// not possible (another Boost version, a kernel or a seccomp profile without io_uring),
// Ring::open returns null and the worker runs io_context::run() as before.
#pragma once
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <liburing.h>

#include "proxy/asio.hpp"

namespace pgwarden::proxy {

class Ring {
public:
    // Memory recycled through a small list per thread instead of the heap: operations and
    // waiting reads come and go several times per transaction.
    struct Recycled {
        static void* operator new(std::size_t size);
        static void operator delete(void* block, std::size_t size);
    };

    // An operation in flight; its completion runs with the result and flags of its CQE.
    // A multishot operation completes once per CQE, the last one without IORING_CQE_F_MORE.
    class Op : public Recycled {
    public:
        virtual void complete(int result, unsigned flags) = 0;  // may delete the operation
        virtual void destroy() = 0;  // deletes it without completing (at shutdown)
        Op* prev = nullptr;
        Op* next = nullptr;

    protected:
        ~Op() = default;
    };

    class Receiver;

    // A ring for a worker thread running `io`, created on that thread; null and `why` set
    // when io_uring or the Asio internals it needs are not available.
    static std::unique_ptr<Ring> open(asio::io_context& io, std::string& why);
    ~Ring();
    Ring(const Ring&) = delete;
    Ring& operator=(const Ring&) = delete;

    // The ring of the calling thread, if its worker runs one.
    static Ring* current() { return current_; }

    // Runs the thread's loop until `io` is stopped, instead of io.run().
    void run();

    // Asynchronous recv and sendmsg(MSG_NOSIGNAL) with Asio's completion signature
    // void(error_code, std::size_t); a recv that finds the end of the stream completes with
    // asio::error::eof. `message` and what it points to must stay valid until completion.
    // `pending`, if given, holds the operation until it completes, for cancel().
    template <class Token>
    auto async_recv(int fd, asio::mutable_buffer buffer, Op** pending, Token&& token) {
        return asio::async_initiate<Token, void(boost::system::error_code, std::size_t)>(
            [this, fd, buffer, pending](auto handler) {
                Op* op = new HandlerOp<decltype(handler)>(std::move(handler), true, pending);
                if (pending) *pending = op;
                start_recv(fd, buffer.data(), buffer.size(), op);
            },
            token);
    }
    template <class Token>
    auto async_sendmsg(int fd, const msghdr* message, Token&& token) {
        return asio::async_initiate<Token, void(boost::system::error_code, std::size_t)>(
            [this, fd, message](auto handler) {
                Op* op = new HandlerOp<decltype(handler)>(std::move(handler), false, nullptr);
                start_sendmsg(fd, message, op);
            },
            token);
    }

    // Asks the kernel to end `op` early: it completes with asio::error::operation_aborted,
    // unless it finished first.
    void cancel(Op* op);

    // A receiver for the plain socket `fd` (see Receiver), or null when the kernel gave
    // this ring no provided buffers. Released with Receiver::release().
    Receiver* make_receiver(int fd);

    // Provided buffers: the kernel picks one for each receive of a Receiver.
    static constexpr unsigned kBufferCount = 128;       // a power of two
    static constexpr unsigned kBufferSize = 16 * 1024;  // a small answer touches one page
    char* buffer(unsigned id) { return buffers_ + std::size_t(id) * kBufferSize; }
    void give_back(unsigned id);
    unsigned buffers_free() const { return kBufferCount - buffers_held_; }

private:
    // A CQE's result as Asio reports a transfer: the bytes, or `ec` (a cancellation, the
    // socket's error, or, for a receive, the end of the stream on 0).
    static std::size_t transferred(int result, bool eof_on_zero, boost::system::error_code& ec) {
        if (result == -ECANCELED)
            ec = asio::error::operation_aborted;
        else if (result < 0)
            ec = boost::system::error_code(-result, boost::system::system_category());
        else if (result == 0 && eof_on_zero)
            ec = asio::error::eof;
        else
            return std::size_t(result);
        return 0;
    }

    template <class Handler>
    class HandlerOp final : public Op {
    public:
        HandlerOp(Handler handler, bool eof_on_zero, Op** pending)
            : handler_(std::move(handler)), eof_on_zero_(eof_on_zero), pending_(pending) {}
        void complete(int result, unsigned) override {
            Handler handler(std::move(handler_));
            const bool eof_on_zero = eof_on_zero_;
            if (pending_) *pending_ = nullptr;
            delete this;
            boost::system::error_code ec;
            const std::size_t n = transferred(result, eof_on_zero, ec);
            std::move(handler)(ec, n);
        }
        void destroy() override {
            if (pending_) *pending_ = nullptr;
            delete this;
        }

    private:
        Handler handler_;
        bool eof_on_zero_;
        Op** pending_;
    };

    friend class Receiver;
    Ring(asio::io_context& io, int epoll_fd);
    bool setup_buffers();
    void start_recv_multishot(int fd, Op* op);
    void start_recv(int fd, void* data, std::size_t size, Op* op);
    void start_sendmsg(int fd, const msghdr* message, Op* op);
    io_uring_sqe* next_sqe();
    void track(Op* op);
    void untrack(Op* op);
    void watch_epoll();
    void run_asio();

    static thread_local Ring* current_;

    asio::io_context& io_;
    int epoll_fd_;
    io_uring ring_{};
    bool initialised_ = false;
    bool epoll_watched_ = false;
    Op* in_flight_ = nullptr;  // a list, for destroy() at shutdown
    Receiver* receivers_ = nullptr;  // every live receiver, detached at shutdown
    io_uring_buf_ring* buffer_ring_ = nullptr;
    char* buffers_ = nullptr;
    unsigned buffers_held_ = 0;  // handed out by the kernel and not given back yet
    bool multishot_ = true;      // false once the kernel refused a multishot receive
};

// The receiving side of a plain socket on the ring: one multishot receive stays armed in
// the kernel and delivers whatever arrives into provided buffers, so that no receive is
// queued, and no poll armed, per message. Bytes wait here until the relay takes them
// (take(), which copies them into its own buffer and gives the provided buffer back).
// Once kMaxChunks buffers wait, the multishot receive is cancelled, so that a peer that
// sends faster than the other side takes it fills the socket's window, not pgwarden's
// memory. The cancellation reaches the kernel at the next turn, after what the receive
// took in this one (the kernel retries a multishot receive up to 32 times while the
// socket has data), so a stalled direction may hold that many more until its reader
// catches up; when few are left, the others receive into their own room (below). Where provided buffers run low it receives into the reader's own
// room instead, one receive per wait, as without provided buffers.
//
// The end of the stream and errors are kept and reported once the bytes before them have
// been taken, as a socket would. A Receiver belongs to one Stream and is released with it;
// while the kernel still holds its receive it lives on until the last completion.
class Ring::Receiver final : public Ring::Op {
public:
    Receiver(Ring& ring, int fd);

    // Takes bytes already received into `room`, without waiting: true when it took some
    // (`n`), or when the stream has ended (`ec`: asio::error::eof or the socket's error).
    bool take(asio::mutable_buffer room, std::size_t& n, boost::system::error_code& ec);

    // Waits for bytes and takes them, with Asio's completion signature; call it only when
    // take() returned false. `room` must stay valid until completion.
    template <class Token>
    auto async_read(asio::mutable_buffer room, Token&& token) {
        return asio::async_initiate<Token, void(boost::system::error_code, std::size_t)>(
            [this, room](auto handler) { wait(new HandlerWaiter<decltype(handler)>(std::move(handler)), room); },
            token);
    }

    // Ends a waiting async_read early with asio::error::operation_aborted (unless bytes
    // come first); does nothing when none waits.
    void cancel_wait();
    // The stream is gone: gives the buffers back and ends the receive in the kernel.
    void release();

    void complete(int result, unsigned flags) override;
    void destroy() override;

private:
    friend class Ring;
    class Waiter : public Recycled {
    public:
        virtual void complete(boost::system::error_code ec, std::size_t n) = 0;
        virtual void destroy() = 0;

    protected:
        ~Waiter() = default;
    };
    template <class Handler>
    class HandlerWaiter final : public Waiter {
    public:
        explicit HandlerWaiter(Handler handler) : handler_(std::move(handler)) {}
        void complete(boost::system::error_code ec, std::size_t n) override {
            Handler handler(std::move(handler_));
            delete this;
            std::move(handler)(ec, n);
        }
        void destroy() override { delete this; }

    private:
        Handler handler_;
    };
    struct Chunk {
        std::uint16_t id;
        std::uint32_t offset;
        std::uint32_t size;
    };
    static constexpr std::size_t kMaxChunks = 4;

    ~Receiver() = default;
    void wait(Waiter* waiter, asio::mutable_buffer room);
    void arm();
    void finish_wait(boost::system::error_code ec, std::size_t n);  // the last thing a caller does
    void drop();  // unlinks from the ring and deletes
    std::size_t copy_out(asio::mutable_buffer room);
    bool queued() const { return head_ < chunks_.size(); }

    Ring* ring_;
    int fd_;
    std::vector<Chunk> chunks_;
    std::size_t head_ = 0;               // the first chunk not yet taken
    boost::system::error_code end_;      // eof or an error, after the chunks
    Waiter* waiter_ = nullptr;
    asio::mutable_buffer room_;
    bool armed_ = false;       // the multishot receive is in the kernel
    bool single_ = false;      // a single receive into room_ is in the kernel
    bool cancelling_ = false;  // a cancellation of either is on its way
    bool abort_ = false;       // the waiter asked to end (cancel_wait)
    bool released_ = false;    // the stream is gone
    bool delivered_ = false;   // a multishot receive has brought bytes
    Receiver* prev_ = nullptr;  // in the ring's list of receivers
    Receiver* next_ = nullptr;
};

}  // namespace pgwarden::proxy
