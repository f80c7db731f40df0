// The interceptor's queue of responses in flight: first in, first out across growth and
// wrap-around, popped slots reset and reused, and a long pipeline's array given back.
#include <catch2/catch.hpp>

#include <string>

#include "proxy/ring_queue.hpp"

using pgwarden::proxy::RingQueue;

namespace {

struct Entry {
    int value = 0;
    std::string text;
    void reset() {
        value = 0;
        text.clear();  // keeps its capacity
    }
};

}  // namespace

TEST_CASE("entries leave in the order they came, across wrap-around and growth") {
    RingQueue<Entry> queue;
    CHECK(queue.empty());
    int next_in = 0, next_out = 0;
    // Interleave pushes and pops so that the head moves around the array while it grows.
    for (int round = 0; round < 50; ++round) {
        for (int i = 0; i < round % 7 + 1; ++i) {
            Entry& e = queue.emplace_back();
            CHECK(e.value == 0);
            CHECK(e.text.empty());
            e.value = ++next_in;
            e.text = "entry " + std::to_string(next_in);
        }
        for (int i = 0; i < round % 5 + 1 && !queue.empty(); ++i) {
            ++next_out;
            CHECK(queue.front().value == next_out);
            CHECK(queue.front().text == "entry " + std::to_string(next_out));
            queue.pop_front();
        }
        CHECK(queue.size() == std::size_t(next_in - next_out));
        // Indexing counts from the front, wherever the front sits in the array.
        const auto& view = queue;
        for (std::size_t i = 0; i < view.size(); ++i) CHECK(view[i].value == next_out + 1 + int(i));
    }
    while (!queue.empty()) {
        CHECK(queue.front().value == ++next_out);
        queue.pop_front();
    }
    CHECK(next_out == next_in);
}

TEST_CASE("a popped slot comes back reset, with its memory kept") {
    RingQueue<Entry> queue;
    for (int i = 0; i < 4; ++i) queue.emplace_back();  // fill the first array exactly
    for (int i = 0; i < 4; ++i) queue.pop_front();
    std::string long_text(200, 'x');
    Entry& first = queue.emplace_back();
    first.value = 7;
    first.text = long_text;
    const char* storage = first.text.data();
    queue.pop_front();
    // Four pops later the same slot is handed out again (capacity 4, no growth).
    for (int i = 0; i < 3; ++i) {
        queue.emplace_back();
        queue.pop_front();
    }
    Entry& again = queue.emplace_back();
    CHECK(again.value == 0);
    CHECK(again.text.empty());
    CHECK(again.text.capacity() >= long_text.size());
    again.text = long_text;
    CHECK(again.text.data() == storage);
    CHECK(queue.capacity() == 4);
}

TEST_CASE("push_back moves a whole entry in") {
    RingQueue<Entry> queue;
    Entry e;
    e.value = 3;
    e.text = "moved";
    queue.push_back(std::move(e));
    REQUIRE(queue.size() == 1);
    CHECK(queue.front().value == 3);
    CHECK(queue.front().text == "moved");
}

TEST_CASE("a queue that drains after a long pipeline gives its array back") {
    RingQueue<Entry> queue;
    for (int i = 0; i < 1000; ++i) queue.emplace_back().value = i;
    CHECK(queue.capacity() >= 1000);
    for (int i = 0; i < 999; ++i) queue.pop_front();
    CHECK(queue.capacity() >= 1000);  // not while anything is in flight
    CHECK(queue.front().value == 999);
    queue.pop_front();
    CHECK(queue.empty());
    CHECK(queue.capacity() == 0);
    // Small queues keep theirs.
    for (int i = 0; i < 3; ++i) queue.emplace_back();
    for (int i = 0; i < 3; ++i) queue.pop_front();
    CHECK(queue.capacity() == 4);
}
