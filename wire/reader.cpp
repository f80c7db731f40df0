// Bounds-checked big-endian reads over a message body. Nothing here allocates: the
// relay path reads every header through it.
#include "wire/reader.hpp"

namespace pgwarden::wire {

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
