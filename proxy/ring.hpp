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

#include <liburing.h>

#include "proxy/asio.hpp"

namespace pgwarden::proxy {

class Ring {
public:
    // An operation in flight; its completion runs with the result of its CQE.
    class Op {
    public:
        virtual void complete(int result) = 0;  // deletes the operation
        virtual void destroy() = 0;             // deletes it without completing (at shutdown)
        Op* prev = nullptr;
        Op* next = nullptr;

        // Operations come and go four times per transaction; their memory is recycled
        // through a small list per thread instead of the heap.
        static void* operator new(std::size_t size);
        static void operator delete(void* block, std::size_t size);

    protected:
        ~Op() = default;
    };

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

private:
    template <class Handler>
    class HandlerOp final : public Op {
    public:
        HandlerOp(Handler handler, bool eof_on_zero, Op** pending)
            : handler_(std::move(handler)), eof_on_zero_(eof_on_zero), pending_(pending) {}
        void complete(int result) override {
            Handler handler(std::move(handler_));
            const bool eof_on_zero = eof_on_zero_;
            if (pending_) *pending_ = nullptr;
            delete this;
            boost::system::error_code ec;
            std::size_t n = 0;
            if (result == -ECANCELED)
                ec = asio::error::operation_aborted;
            else if (result < 0)
                ec = boost::system::error_code(-result, boost::system::system_category());
            else if (result == 0 && eof_on_zero)
                ec = asio::error::eof;
            else
                n = std::size_t(result);
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

    Ring(asio::io_context& io, int epoll_fd);
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
};

}  // namespace pgwarden::proxy
