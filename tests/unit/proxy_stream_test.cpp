// The relay's reads on a plain stream: a read that came back short tells Asio's reactor
// the socket is drained, so the next wait makes no speculative read; no wake-up may be
// lost by that, whatever the sizes of the reads and of what the peer sends.
#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <random>
#include <string>

#include "proxy/stream.hpp"

using pgwarden::proxy::Stream;
using pgwarden::proxy::tcp;
namespace asio = pgwarden::proxy::asio;
using boost::system::error_code;

namespace {

// A connected pair on loopback: `near` becomes the Stream under test, `far` is the peer.
struct Pair {
    tcp::socket near;
    tcp::socket far;
};

Pair connect_pair(asio::io_context& context) {
    tcp::acceptor acceptor(context, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    tcp::socket far(context);
    far.connect(acceptor.local_endpoint());
    tcp::socket near = acceptor.accept();
    near.set_option(tcp::no_delay(true));
    far.set_option(tcp::no_delay(true));
    return {std::move(near), std::move(far)};
}

// Waits (bounded) until `socket` has `bytes` bytes queued: a loopback send is in the
// receiver's queue, with its readiness event raised, once this sees it.
void wait_queued(tcp::socket& socket, std::size_t bytes) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (socket.available() < bytes) REQUIRE(std::chrono::steady_clock::now() < deadline);
}

// Runs the event loop until `done()` holds or `limit` has passed; returns done().
template <class Done>
bool run_until(asio::io_context& context, Done done, std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done() && std::chrono::steady_clock::now() < deadline) context.run_for(std::chrono::milliseconds(10));
    return done();
}

}  // namespace

TEST_CASE("a short read spares the next wait its speculative read; the next arrival wakes it") {
    asio::io_context context(1);
    auto guard = asio::make_work_guard(context);
    Pair pair = connect_pair(context);
    Stream stream(std::move(pair.near));

    // Bytes arrive and the reactor handles their readiness event with no read queued. (The
    // first mark_drained asks epoll for EPOLLRDHUP, which raises a new event, handled too.)
    bool end_watched = false;
    Stream::mark_drained(stream.socket(), end_watched);
    CHECK(end_watched);
    asio::write(pair.far, asio::buffer(std::string("hello")));
    wait_queued(stream.socket(), 5);
    for (int i = 0; i < 3; ++i) context.poll();

    char room[16];
    std::optional<std::size_t> got;
    error_code ec;
    auto wait = [&]() -> asio::awaitable<void> { got = co_await stream.wait_read(asio::buffer(room), ec); };

    SECTION("without the note, the wait reads what is there at once") {
        asio::co_spawn(context, wait(), asio::detached);
        context.run_for(std::chrono::milliseconds(200));
        REQUIRE(got);
        CHECK(*got == 5);
    }
    SECTION("after a short read was noted, the wait waits for the next arrival") {
        // Saying the socket is drained while bytes are queued is a lie, told here to see
        // that the wait really skips the read: a real short read leaves nothing queued.
        CHECK(Stream::may_read_speculatively(stream.socket()));
        CHECK(Stream::mark_drained(stream.socket(), end_watched));
        CHECK_FALSE(Stream::may_read_speculatively(stream.socket()));
        asio::co_spawn(context, wait(), asio::detached);
        context.run_for(std::chrono::milliseconds(200));
        CHECK_FALSE(got);
        asio::write(pair.far, asio::buffer(std::string("!")));
        run_until(context, [&] { return got.has_value(); }, std::chrono::seconds(5));
        REQUIRE(got);
        CHECK(*got == 6);
        CHECK(std::string(room, 6) == "hello!");
    }
    CHECK_FALSE(ec);
}

TEST_CASE("relay-style reads lose no wake-up, whatever the sizes of reads and sends") {
    // The peer sends a chunk, then waits for a one-byte acknowledgement before the next,
    // so a read that wrongly marked the socket drained with bytes left would never wake.
    asio::io_context context(1);
    Pair pair = connect_pair(context);
    Stream stream(std::move(pair.near));
    std::mt19937 random(GENERATE(1u, 2u, 3u, 4u));
    constexpr int kChunks = 3000;

    std::string sent, received;
    bool reader_done = false, writer_done = false;
    auto writer = [&]() -> asio::awaitable<void> {
        std::uniform_int_distribution<int> size(1, 400);
        char ack = 0;
        for (int i = 0; i < kChunks; ++i) {
            std::string chunk(std::size_t(size(random)), '\0');
            for (char& c : chunk) c = char('a' + random() % 26);
            sent += chunk;
            // Sometimes two sends per chunk, so that bytes arrive while the reader waits.
            const std::size_t half = random() % 2 ? chunk.size() / 2 : chunk.size();
            co_await asio::async_write(pair.far, asio::buffer(chunk.data(), half), asio::use_awaitable);
            if (half < chunk.size())
                co_await asio::async_write(pair.far, asio::buffer(chunk.data() + half, chunk.size() - half),
                                           asio::use_awaitable);
            co_await asio::async_read(pair.far, asio::buffer(&ack, 1), asio::use_awaitable);
        }
        writer_done = true;
    };
    auto reader = [&]() -> asio::awaitable<void> {
        std::uniform_int_distribution<std::size_t> room_size(1, 300);
        char room[300];
        int acks = 0;
        while (acks < kChunks) {
            const asio::mutable_buffer room_buffer(room, room_size(random));
            std::size_t n = 0;
            error_code ec;
            // As the relay does: take what is there without waiting, else wait.
            if (random() % 2 == 0 || !stream.try_read(room_buffer, n, ec)) {
                n = co_await stream.wait_read(room_buffer, ec);
                if (!ec) stream.note_read(n, room_buffer.size());
            }
            REQUIRE_FALSE(ec);
            received.append(room, n);
            if (received.size() == sent.size()) {  // the whole chunk: `sent` grows before a send
                ++acks;
                const char ack = 1;
                co_await asio::async_write(stream.socket(), asio::buffer(&ack, 1), asio::use_awaitable);
            }
        }
        reader_done = true;
    };
    asio::co_spawn(context, writer(), asio::detached);
    asio::co_spawn(context, reader(), asio::detached);
    run_until(context, [&] { return reader_done && writer_done; }, std::chrono::seconds(30));
    REQUIRE(writer_done);
    REQUIRE(reader_done);
    CHECK(received == sent);
}

TEST_CASE("relay-style reads see the end of the stream that follows the last bytes") {
    // A short read may also take the peer's FIN (or find its reset) with the last bytes:
    // the socket then has nothing queued, yet the next read must find the end at once,
    // since no readiness event will come for it again.
    std::mt19937 random(GENERATE(1u, 2u, 3u));
    for (int round = 0; round < 200; ++round) {
        asio::io_context context(1);
        Pair pair = connect_pair(context);
        Stream stream(std::move(pair.near));
        const bool reset = random() % 3 == 0;
        const int rounds_before = int(random() % 3);
        bool ended = false;
        std::size_t received = 0, sent = 0;
        auto peer = [&]() -> asio::awaitable<void> {
            char ack = 0;
            for (int i = 0; i <= rounds_before; ++i) {
                std::string chunk(1 + random() % 200, 'x');
                sent += chunk.size();
                co_await asio::async_write(pair.far, asio::buffer(chunk), asio::use_awaitable);
                if (i < rounds_before) co_await asio::async_read(pair.far, asio::buffer(&ack, 1), asio::use_awaitable);
            }
            if (reset) pair.far.set_option(asio::socket_base::linger(true, 0));
            pair.far.close();  // right after the last bytes: often read together with them
        };
        auto reader = [&]() -> asio::awaitable<void> {
            char room[300];
            for (;;) {
                const asio::mutable_buffer room_buffer(room, 1 + random() % 300);
                std::size_t n = 0;
                error_code ec;
                // As the relay does: after a read, straight to a wait when nothing is left
                // over, sometimes a read without waiting first.
                if (random() % 2 == 0 || !stream.try_read(room_buffer, n, ec)) {
                    n = co_await stream.wait_read(room_buffer, ec);
                    if (!ec) stream.note_read(n, room_buffer.size());
                }
                if (ec) break;
                received += n;
                if (received == sent) {
                    const char ack = 1;
                    error_code write_ec;
                    co_await asio::async_write(stream.socket(), asio::buffer(&ack, 1),
                                               asio::redirect_error(asio::use_awaitable, write_ec));
                }
            }
            ended = true;
        };
        asio::co_spawn(context, peer(), asio::detached);
        asio::co_spawn(context, reader(), asio::detached);
        run_until(context, [&] { return ended; }, std::chrono::seconds(10));
        INFO("round " << round << (reset ? ", reset" : ", FIN") << ", " << sent << " bytes sent, " << received
                      << " received");
        REQUIRE(ended);
    }
}

TEST_CASE("once the reactor has seen the peer's end, the socket is not marked drained") {
    asio::io_context context(1);
    auto guard = asio::make_work_guard(context);
    Pair pair = connect_pair(context);
    Stream stream(std::move(pair.near));
    bool end_watched = false;
    CHECK(Stream::mark_drained(stream.socket(), end_watched));
    pair.far.close();
    // Bounded: the FIN's readiness event reaches the reactor within a few polls.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    bool refused = false;
    while (!refused && std::chrono::steady_clock::now() < deadline) {
        context.poll();
        refused = !Stream::mark_drained(stream.socket(), end_watched);
    }
    REQUIRE(refused);
    CHECK(Stream::may_read_speculatively(stream.socket()));
    // And the next wait finds the end at once.
    char room[8];
    error_code ec;
    bool done = false;
    asio::co_spawn(context, [&]() -> asio::awaitable<void> {
        co_await stream.wait_read(asio::buffer(room), ec);
        done = true;
    }, asio::detached);
    run_until(context, [&] { return done; }, std::chrono::seconds(5));
    REQUIRE(done);
    CHECK(ec == asio::error::eof);
}

TEST_CASE("in a steady exchange of small messages, every wait starts without a speculative read") {
    // The relay's pattern: when Asio would read before waiting, read without waiting
    // instead (EAGAIN marks the socket drained); otherwise wait, and note the read.
    asio::io_context context(1);
    Pair pair = connect_pair(context);
    Stream stream(std::move(pair.near));
    std::mt19937 random(7);
    constexpr int kExchanges = 500;
    int waits = 0, speculative_waits = 0, exchanges = 0;
    bool done = false;
    auto peer = [&]() -> asio::awaitable<void> {
        char ack = 0;
        for (int i = 0; i < kExchanges; ++i) {
            std::string message(1 + random() % 200, 'm');
            co_await asio::async_write(pair.far, asio::buffer(message), asio::use_awaitable);
            co_await asio::async_read(pair.far, asio::buffer(&ack, 1), asio::use_awaitable);
        }
    };
    auto reader = [&]() -> asio::awaitable<void> {
        char room[512];
        while (exchanges < kExchanges) {
            std::size_t n = 0;
            error_code ec;
            if (!(stream.reads_before_waiting() && stream.try_read(asio::buffer(room), n, ec))) {
                ++waits;
                if (exchanges >= 3 && Stream::may_read_speculatively(stream.socket())) ++speculative_waits;
                n = co_await stream.wait_read(asio::buffer(room), ec);
                if (!ec) stream.note_read(n, sizeof room);
            }
            REQUIRE_FALSE(ec);
            if (n == 0) continue;  // a wake-up with nothing to read
            ++exchanges;           // each message is read whole: it is sent in one piece
            const char ack = 1;
            co_await asio::async_write(stream.socket(), asio::buffer(&ack, 1), asio::use_awaitable);
        }
        done = true;
    };
    asio::co_spawn(context, peer(), asio::detached);
    asio::co_spawn(context, reader(), asio::detached);
    run_until(context, [&] { return done; }, std::chrono::seconds(20));
    REQUIRE(done);
    CHECK(waits >= kExchanges / 2);
    CHECK(speculative_waits == 0);
}

TEST_CASE("a short read that stopped at TCP urgent data does not lose the bytes after it") {
    // TCP's recvmsg stops at the urgent mark even with bytes queued after it, so a read
    // that came back short there did not drain the socket. Whenever the mark is pending,
    // epoll reports EPOLLPRI with every event, and the socket must then not be marked.
    asio::io_context context(1);
    auto guard = asio::make_work_guard(context);
    Pair pair = connect_pair(context);
    Stream stream(std::move(pair.near));
    char room[16];
    // A first short read through the stream, so that its own first marking (which asks
    // epoll for EPOLLRDHUP, and so raises a fresh event) is behind us.
    asio::write(pair.far, asio::buffer(std::string("x")));
    wait_queued(stream.socket(), 1);
    for (int i = 0; i < 3; ++i) context.poll();
    std::size_t first = 0;
    error_code ec;
    REQUIRE(stream.try_read(asio::buffer(room), first, ec));
    REQUIRE(first == 1);
    for (int i = 0; i < 3; ++i) context.poll();
    REQUIRE_FALSE(Stream::may_read_speculatively(stream.socket()));

    auto send_around_urgent = [&] {
        asio::write(pair.far, asio::buffer(std::string("abc")));
        pair.far.send(asio::buffer(std::string("d")), tcp::socket::message_out_of_band);
        asio::write(pair.far, asio::buffer(std::string("efg")));
        // FIONREAD counts only the bytes before the mark; give the rest a moment on
        // loopback (the test still fails without the fix if they come later).
        wait_queued(stream.socket(), 3);
        context.run_for(std::chrono::milliseconds(50));
    };

    std::string received;
    bool finished = false;
    // Reads as the relay does until "efg" arrived (bounded by the caller): after a short
    // read, a read without waiting only where Asio would read before waiting anyway.
    auto read_rest = [&]() -> asio::awaitable<void> {
        while (received.find("efg") == std::string::npos) {
            std::size_t n = 0;
            if (!(stream.reads_before_waiting() && stream.try_read(asio::buffer(room), n, ec))) {
                n = co_await stream.wait_read(asio::buffer(room), ec);
                if (!ec) stream.note_read(n, sizeof room);
            }
            if (ec) break;
            received.append(room, n);
        }
        finished = true;
    };

    SECTION("a synchronous read") {
        send_around_urgent();
        std::size_t n = 0;
        REQUIRE(stream.try_read(asio::buffer(room), n, ec));
        REQUIRE_FALSE(ec);
        received.append(room, n);
        CHECK(received == "abc");
    }
    SECTION("an asynchronous read performed by the reactor") {
        // The wait is queued before the bytes come, so the reactor's handling of their
        // event performs the read and completes it in place (note_read may then mark).
        std::optional<std::size_t> got;
        asio::co_spawn(context, [&]() -> asio::awaitable<void> {
            got = co_await stream.wait_read(asio::buffer(room), ec);
            if (!ec) stream.note_read(*got, sizeof room);
        }, asio::detached);
        context.poll();
        REQUIRE_FALSE(got);
        send_around_urgent();
        run_until(context, [&] { return got.has_value(); }, std::chrono::seconds(3));
        REQUIRE(got);
        REQUIRE_FALSE(ec);
        received.append(room, *got);
        CHECK(received == "abc");
    }
    asio::co_spawn(context, read_rest(), asio::detached);
    run_until(context, [&] { return finished; }, std::chrono::seconds(3));
    INFO("received \"" << received << "\"");
    REQUIRE(finished);
    CHECK_FALSE(ec);
    CHECK(received == "abcefg");
}
