// Accepting connections and spreading them over the worker threads.
#include "proxy/listener.hpp"

#include "proxy/ring.hpp"

#include <unistd.h>

#include <utility>

#include "proxy/client_session.hpp"
#include "proxy/event_log.hpp"

namespace pgwarden::proxy {

namespace {

// An accepted descriptor on its way to a worker: closed if it never gets there (the
// worker stopped first).
struct OwnedDescriptor {
    int fd = -1;
    explicit OwnedDescriptor(int d) : fd(d) {}
    OwnedDescriptor(OwnedDescriptor&& other) noexcept : fd(std::exchange(other.fd, -1)) {}
    OwnedDescriptor& operator=(OwnedDescriptor&&) = delete;
    ~OwnedDescriptor() {
        if (fd >= 0) ::close(fd);
    }
};

}  // namespace

Listener::Listener(asio::io_context& accept_context, Runtime& runtime, const policy::Endpoint& endpoint,
                   unsigned threads, bool io_uring)
    : accept_context_(accept_context), runtime_(runtime), acceptor_(accept_context), protocol_(tcp::v4()),
      io_uring_(io_uring) {
    auto address = asio::ip::make_address(endpoint.host);
    tcp::endpoint ep(address, endpoint.port);
    protocol_ = ep.protocol();
    acceptor_.open(ep.protocol());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind(ep);
    acceptor_.listen(asio::socket_base::max_listen_connections);
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < threads; ++i) workers_.push_back(std::make_unique<Worker>());
}

Listener::~Listener() { stop_workers(); }

void Listener::start() {
    // Each worker opens its ring on its own thread (the ring accepts submissions from that
    // thread only); start() waits until all have tried, so that io_mode() is known.
    std::atomic<unsigned> tried{0};
    for (auto& worker : workers_) {
        worker->guard = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(
            worker->context.get_executor());
        worker->thread = std::thread([this, w = worker.get(), &tried] {
            std::unique_ptr<Ring> ring;
            if (io_uring_) {
                std::string why;
                ring = Ring::open(w->context, why);
                if (ring)
                    rings_started_.fetch_add(1);
                else if (tried.load() == 0)
                    log::warn("io_uring_unavailable", {{"error", why}, {"using", "epoll"}});
            }
            tried.fetch_add(1);
            tried.notify_all();
            if (ring)
                ring->run();
            else
                w->context.run();
        });
    }
    for (unsigned seen = tried.load(); seen < workers_.size(); seen = tried.load()) tried.wait(seen);
    asio::co_spawn(accept_context_, accept_loop(), asio::detached);
}

tcp::endpoint Listener::local_endpoint() const { return acceptor_.local_endpoint(); }

void Listener::stop_accepting() {
    boost::system::error_code ec;
    acceptor_.close(ec);
}

void Listener::stop_workers() {
    for (auto& worker : workers_) {
        worker->guard.reset();
        worker->context.stop();
    }
    for (auto& worker : workers_)
        if (worker->thread.joinable()) worker->thread.join();
}

awaitable<void> Listener::accept_loop() {
    while (acceptor_.is_open()) {
        Worker& worker = *workers_[next_worker_++ % workers_.size()];
        boost::system::error_code ec;
        tcp::socket socket = co_await acceptor_.async_accept(asio::redirect_error(asio::use_awaitable, ec));
        if (ec) {
            if (ec == asio::error::operation_aborted || !acceptor_.is_open()) break;
            // Out of descriptors and the like: say so, back off briefly, keep serving.
            log::error("accept_failed", {{"error", ec.message()}});
            asio::steady_timer pause(accept_context_, std::chrono::milliseconds(50));
            co_await pause.async_wait(asio::use_awaitable);
            continue;
        }
        if (runtime_.shutting_down.load()) continue;
        // The worker registers the descriptor with its own reactor, on its own thread.
        OwnedDescriptor fd{socket.release(ec)};
        if (ec) continue;  // the socket closes with `socket`
        asio::post(worker.context, [this, &worker, fd = std::move(fd)]() mutable {
            tcp::socket socket(worker.context);
            boost::system::error_code assigned;
            socket.assign(protocol_, fd.fd, assigned);
            if (assigned) {
                log::error("accept_failed", {{"error", assigned.message()}});
                return;
            }
            fd.fd = -1;  // the socket owns it now
            start_session(runtime_, std::move(socket));
        });
    }
}

}  // namespace pgwarden::proxy
