// What the fuzz targets assert beyond "no sanitizer report": a parser's accepted output
// must re-encode to the input, which catches parsers that skip or misplace bytes.
#pragma once
#include <cstdlib>
#include <string_view>

namespace pgwarden::wire::fuzz {

inline void require(bool condition) {
    if (!condition) std::abort();
}

// `view` lies inside `whole`: a parser never points outside the buffer it was given.
inline bool inside(std::string_view view, std::string_view whole) {
    return view.empty() || (view.data() >= whole.data() &&
                            view.data() + view.size() <= whole.data() + whole.size());
}

}  // namespace pgwarden::wire::fuzz
