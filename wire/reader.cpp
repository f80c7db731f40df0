// Bounds-checked big-endian reads over a message body. Nothing here allocates: the
// relay path reads every header through it.
#include "wire/reader.hpp"

namespace pgwarden::wire {

bool Reader::need(std::size_t n) {
    if (!ok_ || n > data_.size() - pos_) {
        ok_ = false;
        return false;
    }
    return true;
}

std::uint8_t Reader::byte() {
    if (!need(1)) return 0;
    return static_cast<std::uint8_t>(data_[pos_++]);
}

std::uint16_t Reader::uint16() {
    if (!need(2)) return 0;
    const auto high = static_cast<std::uint8_t>(data_[pos_]);
    const auto low = static_cast<std::uint8_t>(data_[pos_ + 1]);
    pos_ += 2;
    return static_cast<std::uint16_t>((high << 8) | low);
}

std::uint32_t Reader::uint32() {
    if (!need(4)) return 0;
    std::uint32_t value = 0;
    for (std::size_t i = 0; i < 4; ++i) {
        value = (value << 8) | static_cast<std::uint8_t>(data_[pos_ + i]);
    }
    pos_ += 4;
    return value;
}

// C++20 defines unsigned-to-signed conversion as two's complement, so these are exact.
std::int16_t Reader::int16() { return static_cast<std::int16_t>(uint16()); }
std::int32_t Reader::int32() { return static_cast<std::int32_t>(uint32()); }

std::string_view Reader::cstring() {
    if (!ok_) return {};
    const std::size_t terminator = data_.find('\0', pos_);
    if (terminator == std::string_view::npos) {
        ok_ = false;
        return {};
    }
    const std::string_view text = data_.substr(pos_, terminator - pos_);
    pos_ = terminator + 1;
    return text;
}

std::string_view Reader::bytes(std::size_t n) {
    if (!need(n)) return {};
    const std::string_view chunk = data_.substr(pos_, n);
    pos_ += n;
    return chunk;
}

std::string_view Reader::rest() { return bytes(remaining()); }

}  // namespace pgwarden::wire
