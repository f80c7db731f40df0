// libFuzzer target: the input is the body of a comment carrying sqlcommenter tags
// (client='tenant%3A42',route='/home'). The tag parser must give back what an encoder
// wrote, and a statement carrying the comment must report the same tags, whether the
// comment is a /* block */ or a -- line.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "policy/classifier.hpp"
#include "tests/fuzz/fuzz_check.hpp"

namespace {

using namespace pgwarden::policy;
using pgwarden::wire::fuzz::require;
using Tags = std::vector<std::pair<std::string, std::string>>;

// Application comments are short; the tag parser is linear, but the statements built
// around the input go through libpg_query, so very long inputs only slow the run down.
constexpr std::size_t kMaxInputBytes = 8 * 1024;

// sqlcommenter's encoding: everything but RFC 3986's unreserved characters as %XX.
std::string percent_encode(std::string_view text) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out;
    for (const char c : text) {
        const auto byte = static_cast<unsigned char>(c);
        if ((byte >= 'a' && byte <= 'z') || (byte >= 'A' && byte <= 'Z') ||
            (byte >= '0' && byte <= '9') || byte == '-' || byte == '_' || byte == '.' ||
            byte == '~') {
            out += c;
        } else {
            out += '%';
            out += kHex[byte >> 4];
            out += kHex[byte & 0xF];
        }
    }
    return out;
}

std::string encode_tags(const Tags& tags) {
    std::string out;
    for (const auto& [key, value] : tags) {
        if (!out.empty()) out += ',';
        out += percent_encode(key) + "='" + percent_encode(value) + "'";
    }
    return out;
}

// The tags of a one-statement text that is "SELECT 1" plus a comment.
Tags tags_of(Classifier& classifier, const std::string& sql) {
    const auto result = classifier.classify(sql);
    require(result->statements.size() == 1);
    const StatementInfo& info = result->statements.front();
    require(!info.parse_error && info.kind == StatementKind::kSelect && !info.is_write);
    return info.tags;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size > kMaxInputBytes) return 0;
    const std::string_view body(reinterpret_cast<const char*>(data), size);

    const Tags tags = parse_comment_tags(body);
    require(parse_comment_tags(body) == tags);
    std::size_t equals_signs = 0;
    for (const char c : body) equals_signs += c == '=' ? 1 : 0;
    require(tags.size() <= equals_signs);  // each pair needs its own '='
    // Decoding only shrinks text, and each pair spends at least '=' and two quotes of it.
    std::size_t spent = 0;
    for (const auto& [key, value] : tags) {
        require(!key.empty());
        spent += key.size() + value.size() + 3;
    }
    require(spent <= body.size());
    // Whatever was decoded, encoded again, decodes to the same pairs.
    require(parse_comment_tags(encode_tags(tags)) == tags);

    // The same body inside a statement's comment. A NUL ends the text for PostgreSQL's
    // scanner, so such texts are refused before they get this far.
    if (body.find('\0') != std::string_view::npos) return 0;
    ClassifyConfig config;
    config.cache_entries = 0;
    Classifier classifier(config);
    // A block comment ends at the first "*/" and nests at "/*", so only a body free of
    // both (also where it meets the markers) is one whole comment.
    const std::string block = "/*" + std::string(body) + "*/";
    if (block.find("/*", 1) == std::string::npos && block.find("*/", 2) == block.size() - 2) {
        require(tags_of(classifier, "SELECT 1 " + block) == tags);
        require(tags_of(classifier, block + " SELECT 1") == tags);
        require(tags_of(classifier, "SELECT 1; " + block) == tags);
    }
    // A line comment ends at the end of the line.
    if (body.find_first_of("\r\n") == std::string_view::npos) {
        require(tags_of(classifier, "SELECT 1 --" + std::string(body)) == tags);
        require(tags_of(classifier, "--" + std::string(body) + "\nSELECT 1") == tags);
    }
    return 0;
}
