// A first-in first-out queue on one growing array whose slots are reused: an entry that
// leaves is reset in place (T::reset() keeps whatever memory T can reuse), so a session
// that keeps a few statements in flight allocates nothing per statement. std::deque
// allocates and frees a node every few entries, one per entry for large ones.
#pragma once
#include <cstddef>
#include <utility>
#include <vector>

namespace pgwarden::proxy {

template <class T>
class RingQueue {
public:
    bool empty() const { return size_ == 0; }
    std::size_t size() const { return size_; }
    std::size_t capacity() const { return capacity_; }

    T& front() { return slots_[head_]; }
    const T& front() const { return slots_[head_]; }
    // The i-th entry from the front (i < size()).
    const T& operator[](std::size_t i) const { return slots_[(head_ + i) & mask_]; }
    T& at(std::size_t i) { return slots_[(head_ + i) & mask_]; }
    const T& back() const { return slots_[(head_ + size_ - 1) & mask_]; }

    // A slot at the back, in T's reset state. References to entries stay valid until the
    // queue grows (an emplace_back while it is full).
    T& emplace_back() {
        if (size_ == capacity_) grow();
        T& slot = slots_[(head_ + size_) & mask_];
        ++size_;
        return slot;
    }
    void push_back(T&& value) { emplace_back() = std::move(value); }

    void pop_front() {
        slots_[head_].reset();
        head_ = (head_ + 1) & mask_;
        --size_;
        // A pipeline of thousands of statements does not keep its array for the session.
        if (size_ == 0) {
            head_ = 0;
            if (capacity_ > kKeptCapacity) {
                slots_ = std::vector<T>();
                capacity_ = mask_ = 0;
            }
        }
    }

    // Enough for a pipeline of a few statements per Sync (four entries each), which would
    // otherwise grow the array again, and destroy it, every time it drains.
    static constexpr std::size_t kKeptCapacity = 32;

private:
    void grow() {
        // Powers of two, so that positions wrap with a mask.
        std::vector<T> bigger(capacity_ == 0 ? 4 : capacity_ * 2);
        for (std::size_t i = 0; i < size_; ++i) bigger[i] = std::move(slots_[(head_ + i) & mask_]);
        slots_ = std::move(bigger);
        capacity_ = slots_.size();
        mask_ = capacity_ - 1;
        head_ = 0;
    }

    std::vector<T> slots_;
    std::size_t capacity_ = 0;  // slots_.size(), a power of two (or 0)
    std::size_t mask_ = 0;      // capacity_ - 1, to wrap positions
    std::size_t head_ = 0;
    std::size_t size_ = 0;
};

}  // namespace pgwarden::proxy
