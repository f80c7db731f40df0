// A byte stream to a client or to PostgreSQL: a TCP socket that may be upgraded to TLS
// in the middle of the startup phase (after SSLRequest). The TLS state is only
// allocated for connections that use it, so plain sessions stay small.
#pragma once
#include <memory>
#include <vector>

#include "proxy/asio.hpp"
#include "proxy/ring.hpp"

namespace pgwarden::proxy {

using boost::system::error_code;

class Stream {
public:
    explicit Stream(tcp::socket socket) : socket_(std::move(socket)) {}

    tcp::socket& socket() { return socket_; }
    bool is_tls() const { return tls_ != nullptr; }
    // From now on, reads and writes of this plain stream go through `ring` (the calling
    // worker's io_uring) instead of Asio's reactor, which stops watching the socket. Does
    // nothing for a TLS stream or a null ring. The relay calls it when it starts.
    void use_ring(Ring* ring);
    bool on_ring() const { return ring_ != nullptr; }
    bool is_open() const { return socket_.is_open(); }

    // Reads at least one byte; 0 bytes and `ec` set on error or end of stream.
    awaitable<std::size_t> read_some(asio::mutable_buffer buffer, error_code& ec);
    // read_some in two halves, for the relay loops, which run for every message. try_read
    // takes bytes that are already there without a coroutine: true when it finished (bytes
    // read, or `ec` set). When it returns false, or the caller knows the socket is drained,
    // wait_read is the asynchronous read; it is Asio's own operation, with no coroutine
    // of ours around it.
    bool try_read(asio::mutable_buffer buffer, std::size_t& n, error_code& ec) {
        n = 0;
        // On the ring, bytes the multishot receive brought are taken without a system call;
        // without it, a read that does not wait would be a system call of its own.
        if (receiver_) return receiver_->take(buffer, n, ec);
        if (tls_ || ring_ || !make_non_blocking()) return false;
        // A session whose peer keeps sending would never give its thread to the other
        // sessions on it: every so many reads that did not wait, it goes through the
        // event loop once.
        if (++reads_without_wait_ >= kMaxReadsWithoutWait) {
            reads_without_wait_ = 0;
            return false;
        }
        n = socket_.read_some(buffer, ec);
        if (ec == asio::error::would_block || ec == asio::error::try_again) {
            ec = {};
            n = 0;
            reads_without_wait_ = 0;
            mark_drained();
            return false;
        }
        if (!ec && n < buffer.size()) mark_drained();
        return true;
    }
    // Waiting is always an asynchronous read, never async_wait: Asio re-arms the
    // descriptor in the kernel (epoll_ctl) for every wait, but not for a read, whose
    // readiness it already watches.
    // After a wait_read of `n` bytes into `room` bytes completed without error, call
    // note_read(n, room): a short read then spares the next wait its speculative read,
    // when that is safe (see stream.cpp).
    awaitable<std::size_t> wait_read(asio::mutable_buffer buffer, error_code& ec) {
        reads_without_wait_ = 0;
        if (receiver_) return receiver_->async_read(buffer, asio::redirect_error(asio::use_awaitable, ec));
        if (ring_)
            return ring_->async_recv(socket_.native_handle(), buffer, &ring_read_,
                                     asio::redirect_error(asio::use_awaitable, ec));
        if (tls_) return tls_->async_read_some(buffer, asio::redirect_error(asio::use_awaitable, ec));
        wait_completes_inline_ = !may_read_speculatively(socket_) && writing_ == 0;
        writes_at_wait_ = writes_started_;
        return socket_.async_read_some(buffer, asio::redirect_error(asio::use_awaitable, ec));
    }
    // Whether wait_read would first try to read (Asio's speculative read): then a
    // try_read costs nothing more, and when it finds nothing the wait needs no such read.
    bool reads_before_waiting() { return receiver_ || (!tls_ && !ring_ && may_read_speculatively(socket_)); }
    void note_read(std::size_t n, std::size_t room) {
        if (!ring_ && n > 0 && n < room && wait_completes_inline_ && writes_started_ == writes_at_wait_) mark_drained();
    }
    // Reads exactly buffer.size() bytes.
    awaitable<std::size_t> read_exact(asio::mutable_buffer buffer, error_code& ec);
    // Writes all of `buffers` (a buffer sequence), in one gathering write where possible.
    template <class ConstBufferSequence>
    awaitable<void> write(const ConstBufferSequence& buffers, error_code& ec) {
        std::size_t sent = 0;
        if (try_write(buffers, sent, ec)) co_return;
        co_await write_rest(buffers, sent, ec);
    }
    // The first half of write(), without a coroutine: nearly every write fits in the
    // socket's send buffer, and sending it here saves the trip through the event loop
    // that an asynchronous write takes even when it completes at once. True when the
    // write is over (everything sent, or `ec` set); otherwise `sent` bytes went and
    // write_rest() sends the others. TLS streams always take the asynchronous way.
    template <class ConstBufferSequence>
    bool try_write(const ConstBufferSequence& buffers, std::size_t& sent, error_code& ec) {
        sent = 0;
        if (tls_ || ring_ || !make_non_blocking()) return false;
        sent = socket_.write_some(buffers, ec);
        if (ec == asio::error::would_block || ec == asio::error::try_again) {
            ec = {};
            sent = 0;
        }
        return ec || sent == asio::buffer_size(buffers);
    }
    // Writes what try_write() left: `buffers` minus its first `sent` bytes.
    template <class ConstBufferSequence>
    awaitable<void> write_rest(const ConstBufferSequence& buffers, std::size_t sent, error_code& ec) {
        auto token = asio::redirect_error(asio::use_awaitable, ec);
        if (tls_) {
            co_await asio::async_write(*tls_, buffers, token);
            co_return;
        }
        if (ring_) {
            ring_iov_.clear();
            for (auto it = asio::buffer_sequence_begin(buffers); it != asio::buffer_sequence_end(buffers); ++it) {
                asio::const_buffer piece(*it);
                if (piece.size() > 0) ring_iov_.push_back({const_cast<void*>(piece.data()), piece.size()});
            }
            co_await write_on_ring(sent, ec);
            co_return;
        }
        ++writes_started_;
        ++writing_;
        std::vector<asio::const_buffer> rest;
        std::size_t skip = sent;
        for (auto it = asio::buffer_sequence_begin(buffers); it != asio::buffer_sequence_end(buffers); ++it) {
            asio::const_buffer piece(*it);
            if (skip >= piece.size()) {
                skip -= piece.size();
                continue;
            }
            rest.push_back(piece + skip);
            skip = 0;
        }
        co_await asio::async_write(socket_, rest, token);
        --writing_;
    }

    // Sends ring_iov_ minus its first `skip` bytes through the ring, to the end or an error.
    awaitable<void> write_on_ring(std::size_t skip, error_code& ec);

    // TLS handshakes; on failure `ec` is set and the stream stays plain.
    awaitable<void> accept_tls(asio::ssl::context& context, error_code& ec);
    awaitable<void> connect_tls(asio::ssl::context& context, const std::string& verify_name,
                                bool verify, error_code& ec);

    // Ends the read or wait in flight, if any, with asio::error::operation_aborted (unless
    // it finished first), as tcp::socket::cancel() does for Asio's operations.
    void cancel();
    // Close both directions at once; safe to call twice.
    void close();

    // Tells Asio's reactor that `socket` has no bytes waiting (see mark_drained() below),
    // unless the reactor has seen the end of the stream or an error on it; first asks epoll
    // to report the peer's end (EPOLLRDHUP) unless `end_watched`. True when it took effect.
    // Public for the tests, which check that it does.
    static bool mark_drained(tcp::socket& socket, bool& end_watched);
    // Whether an asynchronous read started now on `socket` would first try to read.
    static bool may_read_speculatively(tcp::socket& socket);

private:
    // Puts the socket in non-blocking mode for the synchronous attempts (once); false if
    // that failed, and then only asynchronous operations are used.
    bool make_non_blocking() {
        if (!non_blocking_) {
            error_code ec;
            socket_.non_blocking(true, ec);
            non_blocking_ = !ec;
        }
        return non_blocking_;
    }

    // A plain read that came back short (or would block) left the socket's receive queue
    // empty: every byte that arrives later brings a new readiness event. Asio does not know
    // that; before it queues an asynchronous read it tries one more read, which then fails
    // with EAGAIN: one system call per wait, a third of the relay's. This tells Asio's
    // reactor that the socket is drained, so that the next asynchronous read just waits.
    // See stream.cpp for why that is safe and how it is done.
    void mark_drained() {
        if (!tls_) mark_drained(socket_, end_watched_);
    }

    static constexpr int kMaxReadsWithoutWait = 16;

    tcp::socket socket_;
    bool non_blocking_ = false;
    int reads_without_wait_ = 0;  // reads in a row that found their bytes already there
    // For note_read: the last wait_read's completion can only come straight from the
    // reactor's handling of a readiness event (no speculative read, no write of this
    // socket in flight), and how many asynchronous writes had started by then.
    bool wait_completes_inline_ = false;
    bool end_watched_ = false;  // epoll reports EPOLLRDHUP for this socket
    int writing_ = 0;  // asynchronous writes in flight (a count, should two ever overlap)
    unsigned writes_started_ = 0;
    unsigned writes_at_wait_ = 0;
    std::unique_ptr<asio::ssl::stream<tcp::socket&>> tls_;
    Ring* ring_ = nullptr;
    std::vector<iovec> ring_iov_;  // the write in flight on the ring
    Ring::Op* ring_read_ = nullptr;  // the read in flight on the ring
    struct ReleaseReceiver {
        void operator()(Ring::Receiver* receiver) const { receiver->release(); }
    };
    // The ring's receiving side of this socket, when the ring has provided buffers.
    // Declared after socket_: released before the socket closes.
    std::unique_ptr<Ring::Receiver, ReleaseReceiver> receiver_;
};

}  // namespace pgwarden::proxy
