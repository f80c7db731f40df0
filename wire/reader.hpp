// Bounds-checked reading of message bodies in network byte order. A read past the end
// or an unterminated string sets a sticky error instead of reading out of bounds.
#pragma once
#include <cstdint>
#include <string_view>

namespace pgwarden::wire {

class Reader {
public:
    explicit Reader(std::string_view body) : data_(body) {}

    std::int16_t int16();
    std::int32_t int32();
    std::uint16_t uint16();
    std::uint32_t uint32();
    std::uint8_t byte();
    // A NUL-terminated string; the view excludes the terminator.
    std::string_view cstring();
    std::string_view bytes(std::size_t n);
    std::string_view rest();

    bool ok() const { return ok_; }
    bool at_end() const { return pos_ == data_.size(); }
    // ok() and every byte consumed: what a parser of a fixed-shape message wants.
    bool done() const { return ok_ && at_end(); }
    std::size_t remaining() const { return data_.size() - pos_; }

private:
    bool need(std::size_t n);
    std::string_view data_;
    std::size_t pos_ = 0;
    bool ok_ = true;
};

}  // namespace pgwarden::wire
