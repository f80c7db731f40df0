// The per-direction read buffer: small messages stay in the object's own space, large
// ones move to the heap with their bytes intact, and a drained buffer gives the heap back.
#include <catch2/catch.hpp>

#include <cstring>
#include <string>

#include "proxy/buffer.hpp"

using pgwarden::proxy::Buffer;
using namespace std::string_literals;

namespace {

void append(Buffer& buffer, const std::string& bytes) {
    char* p = buffer.prepare(bytes.size());
    REQUIRE(buffer.free_space() >= bytes.size());
    std::memcpy(p, bytes.data(), bytes.size());
    buffer.commit(bytes.size());
}

}  // namespace

TEST_CASE("a new buffer reads into its own space and allocates nothing") {
    Buffer buffer;
    CHECK(buffer.empty());
    buffer.prepare(1);
    CHECK_FALSE(buffer.on_heap());
    CHECK(buffer.free_space() == Buffer::kInlineCapacity);
    append(buffer, "Q\0\0\0\x0Bselect 1\0"s);
    CHECK(buffer.size() == 14);
    CHECK_FALSE(buffer.on_heap());
}

TEST_CASE("consuming everything rewinds, so the small space is reused") {
    Buffer buffer;
    for (int round = 0; round < 100; ++round) {
        append(buffer, std::string(300, char('a' + round % 26)));
        CHECK(buffer.data() == std::string(300, char('a' + round % 26)));
        buffer.consume(300);
        CHECK(buffer.empty());
    }
    CHECK_FALSE(buffer.on_heap());
}

TEST_CASE("a partial message is moved down before the buffer grows") {
    Buffer buffer;
    append(buffer, std::string(400, 'x'));
    buffer.consume(300);  // 100 bytes of a message left at offset 300
    // 150 more fit in the small space once the 100 are moved to the front.
    append(buffer, std::string(150, 'y'));
    CHECK_FALSE(buffer.on_heap());
    CHECK(buffer.data() == std::string(100, 'x') + std::string(150, 'y'));
}

TEST_CASE("a message larger than the small space moves to the heap with its bytes") {
    Buffer buffer;
    append(buffer, std::string(500, 'a'));
    buffer.consume(200);
    const std::string big(Buffer::kDefaultCapacity + 10, 'b');
    append(buffer, big);
    CHECK(buffer.on_heap());
    CHECK(buffer.data() == std::string(300, 'a') + big);

    SECTION("releasing keeps a buffer that still holds bytes") {
        buffer.release_if_empty(true);
        CHECK(buffer.on_heap());
        CHECK(buffer.size() == 300 + big.size());
    }
    SECTION("a drained buffer gives the heap back and reads into its own space again") {
        buffer.consume(buffer.size());
        buffer.release_if_empty(false);  // larger than the default capacity: always released
        CHECK_FALSE(buffer.on_heap());
        append(buffer, "tail");
        CHECK(buffer.data() == "tail");
        CHECK(buffer.free_space() == Buffer::kInlineCapacity - 4);
    }
}

TEST_CASE("a default-size heap buffer is only released when asked for all") {
    Buffer buffer;
    append(buffer, std::string(Buffer::kInlineCapacity + 1, 'c'));
    REQUIRE(buffer.on_heap());
    buffer.consume(buffer.size());
    buffer.release_if_empty(false);
    CHECK(buffer.on_heap());
    buffer.release_if_empty(true);
    CHECK_FALSE(buffer.on_heap());
}

TEST_CASE("a relay read after one that filled its room is a large one, into the heap") {
    Buffer buffer;
    std::span<char> room = buffer.prepare_read(1, false);
    CHECK(room.size() == Buffer::kInlineCapacity);
    std::memset(room.data(), 'd', room.size());
    buffer.commit(room.size());  // the small space is full: more is on its way
    REQUIRE_FALSE(buffer.on_heap());

    room = buffer.prepare_read(1, true);
    CHECK(buffer.on_heap());
    CHECK(room.size() >= Buffer::kBurstRead);
    CHECK(room.size() == buffer.free_space());
    CHECK(buffer.data() == std::string(Buffer::kInlineCapacity, 'd'));

    SECTION("drained in the middle of a burst, it keeps the heap for the next read") {
        buffer.consume(buffer.size());
        buffer.prepare_read(1, true);
        CHECK(buffer.on_heap());
        CHECK(buffer.free_space() >= Buffer::kBurstRead);
    }
    SECTION("drained once the burst is over, it goes back to its own space") {
        buffer.consume(buffer.size());
        room = buffer.prepare_read(1, false);
        CHECK_FALSE(buffer.on_heap());
        CHECK(room.size() == Buffer::kInlineCapacity);  // the small space's size, not the heap's
    }
    SECTION("a partial message moves down rather than the heap buffer growing") {
        const std::size_t capacity = buffer.size() + buffer.free_space();
        room = buffer.prepare_read(1, true);
        std::memset(room.data(), 'e', room.size());
        buffer.commit(room.size());
        buffer.consume(buffer.size() - 10);  // 10 bytes of a message left at the end
        buffer.prepare_read(1, true);
        CHECK(buffer.size() + buffer.free_space() == capacity);
        CHECK(buffer.data() == std::string(10, 'e'));
    }
}
