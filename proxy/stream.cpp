// Plain-or-TLS stream operations.
#include "proxy/stream.hpp"

#include <sys/epoll.h>

#include <cstdint>

#include <openssl/ssl.h>

namespace pgwarden::proxy {

// Stream::mark_drained, and why it is safe.
//
// Asio's epoll reactor registers each socket edge-triggered. For every readiness event it
// sets the descriptor's `try_speculative_[read_op]` flag, and an asynchronous read that
// finds the flag set first tries to read before it queues itself: a readiness event that
// came while no read was queued would otherwise be lost. Asio clears the flag only when a
// read returns end of stream, so with a peer that answers a round trip later every wait of
// the relay paid one recvfrom that failed with EAGAIN.
//
// The flag may be cleared right after a read that came back short, provided the reactor
// has not looked for events in between. TCP's recvmsg copies until the receive queue is
// empty (or the buffer full), so a short read left the queue empty, and each later arrival
// wakes the epoll set again (edge-triggered here means an event per arrival, not per
// transition). An event harvested before the read but not yet handled sets the flag again
// and performs the queued read, which then waits: at worst the EAGAIN saved here, never a
// lost wake-up. What must not happen is an event handled between the read and the clearing:
// it would set the flag with no read queued, and the clearing would erase it. (A short
// read also stops at TCP urgent data with bytes queued after it; see kEndEvents.) So:
//  - a synchronous read (try_read) clears it at once, in the same handler;
//  - an asynchronous read only when its completion runs inside the reactor's handling of
//    the event that performed it: Asio completes the first operation that an event
//    finishes in place, and resumes the coroutine in place. That holds when the read was
//    queued without a speculative attempt (a speculative completion is posted) and no
//    write of the same socket was in flight (a finished write would go first, and the
//    read's completion be posted). wait_read notes both before it starts.
// Each io_context runs on one thread, and sessions touch their sockets only there; the
// descriptor's own lock is taken all the same.
//
// The flag is private to Asio. Boost 1.74 (Debian bookworm's) is the only version whose
// layout this was checked against; with any other, or another reactor, this does nothing
// and the relay only pays the extra read again. The members are reached the one way C++
// permits without changing Asio: explicit instantiation, whose template arguments are not
// access-checked, exports pointers to them; the socket's implementation is a protected
// member, reached through a derived class.
#if BOOST_VERSION == 107400 && defined(BOOST_ASIO_HAS_EPOLL) && !defined(BOOST_ASIO_HAS_IOCP)
namespace {

using Reactor = asio::detail::epoll_reactor;
using DescriptorState = Reactor::descriptor_state;
using Mutex = asio::detail::conditionally_enabled_mutex;

template <class Tag, typename Tag::type Member>
struct Export {
    friend typename Tag::type member(Tag) { return Member; }
};
struct SpeculativeFlags {
    using type = bool (DescriptorState::*)[Reactor::max_ops];
    friend type member(SpeculativeFlags);
};
struct DescriptorMutex {
    using type = Mutex DescriptorState::*;
    friend type member(DescriptorMutex);
};
struct RegisteredEvents {
    using type = std::uint32_t DescriptorState::*;
    friend type member(RegisteredEvents);
};
struct DescriptorReactor {
    using type = Reactor* DescriptorState::*;
    friend type member(DescriptorReactor);
};
struct DescriptorNumber {
    using type = int DescriptorState::*;
    friend type member(DescriptorNumber);
};
struct EpollFd {
    using type = int Reactor::*;
    friend type member(EpollFd);
};
struct ReadyEvents {  // the events of the reactor's last look at the descriptor
    using type = unsigned int asio::detail::scheduler_operation::*;
    friend type member(ReadyEvents);
};
template struct Export<SpeculativeFlags, &DescriptorState::try_speculative_>;
template struct Export<DescriptorMutex, &DescriptorState::mutex_>;
template struct Export<RegisteredEvents, &DescriptorState::registered_events_>;
template struct Export<DescriptorReactor, &DescriptorState::reactor_>;
template struct Export<DescriptorNumber, &DescriptorState::descriptor_>;
template struct Export<EpollFd, &Reactor::epoll_fd_>;
template struct Export<ReadyEvents, &asio::detail::scheduler_operation::task_result_>;

struct SocketAccess : tcp::socket {
    static DescriptorState* descriptor(tcp::socket& socket) {
        return (socket.*(&SocketAccess::impl_)).get_implementation().reactor_data_;
    }
};

// The events after which a short read may not have drained the socket: the peer's end or
// an error (no event will follow), and EPOLLPRI, reported with every event while TCP
// urgent data is pending: recvmsg stops short at the urgent mark, bytes queued after it.
constexpr std::uint32_t kEndEvents = EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI;

}  // namespace

bool Stream::mark_drained(tcp::socket& socket, bool& end_watched) {
    DescriptorState* state = SocketAccess::descriptor(socket);
    if (state == nullptr) return false;
    Mutex::scoped_lock lock(state->*member(DescriptorMutex{}));
    std::uint32_t& registered = state->*member(RegisteredEvents{});
    if (!end_watched) {
        // Asio does not ask epoll for EPOLLRDHUP; add it, in Asio's record too, so that
        // its own re-registrations (for writes) keep it. If the end already came, epoll
        // raises a new event for it now, which will set the flag again.
        epoll_event event{};
        event.events = registered | EPOLLRDHUP;
        event.data.ptr = state;
        Reactor* reactor = state->*member(DescriptorReactor{});
        if (::epoll_ctl(reactor->*member(EpollFd{}), EPOLL_CTL_MOD, state->*member(DescriptorNumber{}), &event) != 0)
            return false;
        registered = event.events;
        end_watched = true;
    }
    // The C-style cast reaches the operation base, which descriptor_state inherits privately.
    const unsigned int seen = ((asio::detail::scheduler_operation*)state)->*member(ReadyEvents{});
    if (seen & kEndEvents) return false;
    (state->*member(SpeculativeFlags{}))[Reactor::read_op] = false;
    return true;
}

// Takes the socket out of the reactor's epoll set, for a stream whose I/O moves to the
// ring. Asio keeps its record of the descriptor; its own deregistration at close then
// fails with ENOENT, which it ignores.
static bool leave_reactor(tcp::socket& socket) {
    DescriptorState* state = SocketAccess::descriptor(socket);
    if (state == nullptr) return false;
    Mutex::scoped_lock lock(state->*member(DescriptorMutex{}));
    Reactor* reactor = state->*member(DescriptorReactor{});
    epoll_event unused{};
    if (::epoll_ctl(reactor->*member(EpollFd{}), EPOLL_CTL_DEL, state->*member(DescriptorNumber{}), &unused) != 0)
        return false;
    state->*member(RegisteredEvents{}) = 0;
    return true;
}

bool Stream::may_read_speculatively(tcp::socket& socket) {
    DescriptorState* state = SocketAccess::descriptor(socket);
    if (state == nullptr) return true;
    Mutex::scoped_lock lock(state->*member(DescriptorMutex{}));
    return (state->*member(SpeculativeFlags{}))[Reactor::read_op];
}
#else
static bool leave_reactor(tcp::socket&) { return false; }
bool Stream::mark_drained(tcp::socket&, bool&) { return false; }
bool Stream::may_read_speculatively(tcp::socket&) { return true; }
#endif

void Stream::use_ring(Ring* ring) {
    if (ring == nullptr || tls_ || ring_ || !socket_.is_open()) return;
    // Asio has nothing in flight on the socket here: the relay has not started.
    if (!leave_reactor(socket_)) return;
    ring_ = ring;
    receiver_.reset(ring->make_receiver(socket_.native_handle()));
}

awaitable<void> Stream::write_on_ring(std::size_t skip, error_code& ec) {
    std::size_t first = 0;
    for (;;) {
        while (first < ring_iov_.size() && skip >= ring_iov_[first].iov_len) skip -= ring_iov_[first++].iov_len;
        if (first == ring_iov_.size()) co_return;
        ring_iov_[first].iov_base = static_cast<char*>(ring_iov_[first].iov_base) + skip;
        ring_iov_[first].iov_len -= skip;
        msghdr message{};
        message.msg_iov = ring_iov_.data() + first;
        message.msg_iovlen = ring_iov_.size() - first;
        std::size_t sent = co_await ring_->async_sendmsg(socket_.native_handle(), &message,
                                                         asio::redirect_error(asio::use_awaitable, ec));
        if (ec) co_return;
        skip = sent;
    }
}

awaitable<std::size_t> Stream::read_some(asio::mutable_buffer buffer, error_code& ec) {
    std::size_t n = 0;
    if (try_read(buffer, n, ec)) co_return n;
    co_return co_await wait_read(buffer, ec);
}

awaitable<std::size_t> Stream::read_exact(asio::mutable_buffer buffer, error_code& ec) {
    auto token = asio::redirect_error(asio::use_awaitable, ec);
    if (tls_) co_return co_await asio::async_read(*tls_, buffer, token);
    if (ring_) {
        std::size_t done = 0;
        while (done < buffer.size()) {
            std::size_t n = 0;
            if (!try_read(buffer + done, n, ec)) n = co_await wait_read(buffer + done, ec);
            done += n;
            if (ec) break;
        }
        co_return done;
    }
    co_return co_await asio::async_read(socket_, buffer, token);
}

awaitable<void> Stream::accept_tls(asio::ssl::context& context, error_code& ec) {
    auto tls = std::make_unique<asio::ssl::stream<tcp::socket&>>(socket_, context);
    co_await tls->async_handshake(asio::ssl::stream_base::server,
                                  asio::redirect_error(asio::use_awaitable, ec));
    if (!ec) tls_ = std::move(tls);
}

awaitable<void> Stream::connect_tls(asio::ssl::context& context, const std::string& verify_name,
                                    bool verify, error_code& ec) {
    auto tls = std::make_unique<asio::ssl::stream<tcp::socket&>>(socket_, context);
    if (verify) {
        tls->set_verify_mode(asio::ssl::verify_peer);
        tls->set_verify_callback(asio::ssl::host_name_verification(verify_name));
    } else {
        tls->set_verify_mode(asio::ssl::verify_none);
    }
    // SNI only makes sense for names, not addresses.
    error_code parse_ec;
    asio::ip::make_address(verify_name, parse_ec);
    if (parse_ec) SSL_set_tlsext_host_name(tls->native_handle(), verify_name.c_str());
    co_await tls->async_handshake(asio::ssl::stream_base::client,
                                  asio::redirect_error(asio::use_awaitable, ec));
    if (!ec) tls_ = std::move(tls);
}

void Stream::cancel() {
    error_code ignored;
    socket_.cancel(ignored);
    if (ring_ && ring_read_) ring_->cancel(ring_read_);
    if (receiver_) receiver_->cancel_wait();
}

void Stream::close() {
    error_code ignored;
    if (socket_.is_open()) {
        socket_.shutdown(tcp::socket::shutdown_both, ignored);
        socket_.close(ignored);
    }
}

}  // namespace pgwarden::proxy
