// Bounds-checked reading of message bodies in network byte order. A read past the end
// or an unterminated string sets a sticky error instead of reading out of bounds.
#pragma once
#include <cstdint>
#include <string_view>

namespace pgwarden::wire {

class Reader {
public:
    explicit Reader(std::string_view body) : data_(body) {}

    // The fixed-size reads are inline: every message header and most bodies go through them.
    std::uint8_t byte() {
        if (!need(1)) return 0;
        return static_cast<std::uint8_t>(data_[pos_++]);
    }
    std::uint16_t uint16() {
        if (!need(2)) return 0;
        const auto* p = reinterpret_cast<const unsigned char*>(data_.data() + pos_);
        pos_ += 2;
        return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
    }
    std::uint32_t uint32() {
        if (!need(4)) return 0;
        const auto* p = reinterpret_cast<const unsigned char*>(data_.data() + pos_);
        pos_ += 4;
        return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
               std::uint32_t{p[3]};
    }
    // C++20 defines unsigned-to-signed conversion as two's complement, so these are exact.
    std::int16_t int16() { return static_cast<std::int16_t>(uint16()); }
    std::int32_t int32() { return static_cast<std::int32_t>(uint32()); }
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
    bool need(std::size_t n) {
        if (!ok_ || n > data_.size() - pos_) {
            ok_ = false;
            return false;
        }
        return true;
    }
    std::string_view data_;
    std::size_t pos_ = 0;
    bool ok_ = true;
};

}  // namespace pgwarden::wire
