// The accepting side: one io_context per worker thread, each running the sessions it is
// given for their whole life (nothing on the hot path is shared between threads), and an
// acceptor that hands new connections to the workers in turn.
#pragma once
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "proxy/asio.hpp"
#include "proxy/runtime.hpp"

namespace pgwarden::proxy {

class Listener {
public:
    // Binds `endpoint` on `accept_context`; throws std::system_error when it cannot.
    // Workers run an io_uring loop (Ring) when `io_uring` and the kernel allow it.
    Listener(asio::io_context& accept_context, Runtime& runtime, const policy::Endpoint& endpoint, unsigned threads,
             bool io_uring);
    ~Listener();

    void start();           // starts worker threads and accepting
    void stop_accepting();  // closes the listening socket; sessions go on
    void stop_workers();    // stops every worker and joins the threads
    tcp::endpoint local_endpoint() const;
    unsigned thread_count() const { return unsigned(workers_.size()); }
    // "io_uring" or "epoll", once start() has returned.
    const char* io_mode() const { return rings_started_ > 0 ? "io_uring" : "epoll"; }

private:
    awaitable<void> accept_loop();

    struct Worker {
        // One thread runs it, and every operation on its sockets and timers starts on that
        // thread (connections are handed over as bare descriptors, see accept_loop): Asio's
        // per-descriptor locks would guard against nothing, so they are off. Posting to it
        // from other threads stays safe (the scheduler keeps its lock).
        asio::io_context context{BOOST_ASIO_CONCURRENCY_HINT_UNSAFE_IO};
        std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> guard;
        std::thread thread;
    };
    asio::io_context& accept_context_;
    Runtime& runtime_;
    tcp::acceptor acceptor_;
    tcp protocol_;
    std::vector<std::unique_ptr<Worker>> workers_;
    std::size_t next_worker_ = 0;
    bool io_uring_;
    std::atomic<unsigned> rings_started_{0};
};

}  // namespace pgwarden::proxy
