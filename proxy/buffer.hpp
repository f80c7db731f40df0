// A read buffer for one direction of a session: bytes arrive at the back, complete
// messages are consumed from the front, and the rest is moved down when space runs out.
// Heap storage is released whenever the buffer drains, so idle sessions hold no heap
// buffers, only the small one inside the object.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <span>
#include <string_view>

namespace pgwarden::proxy {

class Buffer {
public:
    static constexpr std::size_t kDefaultCapacity = 16 * 1024;
    // Room inside the object itself: a drained buffer gives its heap storage back and the
    // next read lands here. Most statements and most answers to them fit, so a session
    // that trades small messages neither holds nor allocates heap buffers. 1 KiB holds an
    // ORM's one-row SELECT of a wide table and its answer; in 512 bytes each took two reads.
    static constexpr std::size_t kInlineCapacity = 1024;

    Buffer() = default;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    std::string_view data() const { return {base() + begin_, end_ - begin_}; }
    std::size_t size() const { return end_ - begin_; }
    bool empty() const { return begin_ == end_; }
    void consume(std::size_t n) {
        begin_ += n;
        if (begin_ == end_) begin_ = end_ = 0;
    }

    // Room to read into, at least `min_free` bytes (growing to fit a large message).
    char* prepare(std::size_t min_free = 1) {
        if (capacity() - end_ < min_free) {
            if (capacity() - size() >= min_free) {
                std::memmove(base(), base() + begin_, size());
            } else {
                std::size_t cap = storage_ ? std::max(capacity_ * 2, size() + min_free)
                                           : std::max(kDefaultCapacity, size() + min_free);
                std::unique_ptr<char[]> bigger(new char[cap]);
                std::memcpy(bigger.get(), base() + begin_, size());
                storage_ = std::move(bigger);
                capacity_ = cap;
            }
            end_ -= begin_;
            begin_ = 0;
        }
        return base() + end_;
    }
    std::size_t free_space() const { return capacity() - end_; }
    void commit(std::size_t n) { end_ += n; }

    // Room for a relay loop's next read of at least `want` bytes. A buffer that holds
    // nothing goes back to its own small space (an idle session holds no heap buffer),
    // unless `burst`: the last read filled its room, so more is on its way, and it reads
    // kBurstRead bytes at a time into the heap. Without this a large answer would move
    // in pieces of the small space, one system call each way per piece.
    static constexpr std::size_t kBurstRead = 8 * 1024;
    std::span<char> prepare_read(std::size_t want, bool burst) {
        if (!burst) release_if_empty(true);
        char* room = prepare(burst ? std::max(want, kBurstRead) : want);
        return {room, free_space()};
    }

    // Gives heap memory back when empty: big buffers always, normal ones when `all`.
    void release_if_empty(bool all) {
        if (empty() && storage_ && (all || capacity_ > kDefaultCapacity)) {
            storage_.reset();
            capacity_ = 0;
        }
    }
    bool on_heap() const { return storage_ != nullptr; }

private:
    char* base() { return storage_ ? storage_.get() : inline_; }
    const char* base() const { return storage_ ? storage_.get() : inline_; }
    std::size_t capacity() const { return storage_ ? capacity_ : kInlineCapacity; }

    std::unique_ptr<char[]> storage_;
    std::size_t capacity_ = 0;  // of storage_
    std::size_t begin_ = 0;
    std::size_t end_ = 0;
    char inline_[kInlineCapacity];
};

}  // namespace pgwarden::proxy
