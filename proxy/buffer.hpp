// A read buffer for one direction of a session: bytes arrive at the back, complete
// messages are consumed from the front, and the rest is moved down when space runs out.
// Storage is released whenever the buffer drains, so idle sessions hold no buffers.
#pragma once
#include <cstddef>
#include <cstring>
#include <memory>
#include <string_view>

namespace pgwarden::proxy {

class Buffer {
public:
    static constexpr std::size_t kDefaultCapacity = 16 * 1024;

    std::string_view data() const { return {storage_.get() + begin_, end_ - begin_}; }
    std::size_t size() const { return end_ - begin_; }
    bool empty() const { return begin_ == end_; }
    void consume(std::size_t n) {
        begin_ += n;
        if (begin_ == end_) begin_ = end_ = 0;
    }

    // Room to read into, at least `min_free` bytes (growing to fit a large message).
    char* prepare(std::size_t min_free = 1) {
        if (!storage_) {
            capacity_ = std::max(kDefaultCapacity, min_free);
            storage_.reset(new char[capacity_]);
        } else if (capacity_ - end_ < min_free) {
            if (capacity_ - size() >= min_free && begin_ > 0) {
                std::memmove(storage_.get(), storage_.get() + begin_, size());
            } else {
                std::size_t cap = std::max(capacity_ * 2, size() + min_free);
                std::unique_ptr<char[]> bigger(new char[cap]);
                std::memcpy(bigger.get(), storage_.get() + begin_, size());
                storage_ = std::move(bigger);
                capacity_ = cap;
            }
            end_ -= begin_;
            begin_ = 0;
        }
        return storage_.get() + end_;
    }
    std::size_t free_space() const { return storage_ ? capacity_ - end_ : 0; }
    void commit(std::size_t n) { end_ += n; }

    // Gives memory back when empty: big buffers always, normal ones when `all`.
    void release_if_empty(bool all) {
        if (empty() && storage_ && (all || capacity_ > kDefaultCapacity)) {
            storage_.reset();
            capacity_ = 0;
        }
    }

private:
    std::unique_ptr<char[]> storage_;
    std::size_t capacity_ = 0;
    std::size_t begin_ = 0;
    std::size_t end_ = 0;
};

}  // namespace pgwarden::proxy
