// Statement classification: libpg_query parses a query string into a JSON tree, which is
// read here into a flat array (no DOM of maps) and reduced to one StatementInfo per statement.
#include "policy/classifier.hpp"

#include <pg_query.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <limits>
#include <unordered_set>

namespace pgwarden::policy {
namespace {

using namespace std::string_view_literals;

// Texts longer than this are classified every time: caching them would let a few huge
// statements crowd out the many small ones the cache is for.
constexpr std::size_t kMaxCachedTextBytes = 64 * 1024;

// In StatementKind's order.
// clang-format off
constexpr std::array<std::string_view, kStatementKindCount> kKindNames = {
    "select", "insert", "update", "delete", "merge", "copy_in", "copy_out", "ddl", "truncate",
    "begin", "commit", "rollback", "savepoint", "release", "rollback_to", "prepare_transaction",
    "commit_prepared", "set", "show", "call", "do", "explain", "lock", "listen", "notify",
    "maintenance", "other",
};
// clang-format on

bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lowercase(std::string_view text) {
    std::string out(text);
    for (char& c : out)
        c = ascii_lower(c);
    return out;
}

bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (ascii_lower(a[i]) != ascii_lower(b[i])) return false;
    }
    return true;
}

std::string_view trim(std::string_view text) {
    while (!text.empty() && is_space(text.front()))
        text.remove_prefix(1);
    while (!text.empty() && is_space(text.back()))
        text.remove_suffix(1);
    return text;
}

int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// %XX sequences only ('+' stays '+': sqlcommenter percent-encodes, it is not a form body).
// A '%' not followed by two hex digits is kept as it is.
std::string url_decode(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (text[i] == '%' && i + 2 < text.size()) {
            const int high = hex_digit(text[i + 1]);
            const int low = hex_digit(text[i + 2]);
            if (high >= 0 && low >= 0) {
                out += static_cast<char>((high << 4) | low);
                i += 2;
                continue;
            }
        }
        out += text[i];
    }
    return out;
}

// ---------------------------------------------------------------------------------------
// pg_query's JSON, flattened in document order: a subtree is the contiguous range
// [index, end), so "anywhere below this node" is a linear scan and never recurses, however
// deeply the statement nests.

class JsonTree {
public:
    static constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
    enum class Type : std::uint8_t { kObject, kArray, kString, kNumber, kTrue, kFalse, kNull };
    struct Node {
        Type type = Type::kNull;
        std::uint32_t parent = kNone;
        std::uint32_t end = 0;  // one past the last node of this subtree
        std::string_view key;   // member name inside an object
        std::string_view text;  // string contents (still escaped) or number digits
    };

    // False when the text is not well-formed JSON.
    bool parse(std::string_view json);

    const Node& operator[](std::uint32_t index) const { return nodes_[index]; }
    std::uint32_t size() const { return static_cast<std::uint32_t>(nodes_.size()); }

    // The member `key` of an object, or kNone.
    std::uint32_t member(std::uint32_t object, std::string_view key) const;
    // pg_query wraps a Node field as {"TypeName": {...}}: the type's name, or "".
    std::string_view node_type(std::uint32_t wrapper) const;
    // The {...} inside such a wrapper.
    static std::uint32_t node_body(std::uint32_t wrapper) { return wrapper + 1; }

    std::string string_value(std::uint32_t index) const;  // "" unless a string
    std::string string_member(std::uint32_t object, std::string_view key) const;
    // pg_query leaves out members that are false, 0 or "".
    bool bool_member(std::uint32_t object, std::string_view key) const;
    std::int64_t int_member(std::uint32_t object, std::string_view key) const;

private:
    std::uint32_t add(Type type, std::string_view key);
    bool parse_string(std::string_view json, std::size_t& pos, std::string_view& contents) const;

    std::vector<Node> nodes_;
    std::vector<std::uint32_t> open_;  // containers not closed yet
};

std::uint32_t JsonTree::add(Type type, std::string_view key) {
    Node node;
    node.type = type;
    node.key = key;
    node.parent = open_.empty() ? kNone : open_.back();
    node.end = size() + 1;
    nodes_.push_back(node);
    return size() - 1;
}

bool JsonTree::parse_string(std::string_view json, std::size_t& pos,
                            std::string_view& contents) const {
    if (pos >= json.size() || json[pos] != '"') return false;
    const std::size_t start = ++pos;
    // The closing quote is the first one not escaped by an odd run of backslashes.
    for (;;) {
        const void* quote = std::memchr(json.data() + pos, '"', json.size() - pos);
        if (quote == nullptr) return false;
        const std::size_t quote_at = static_cast<const char*>(quote) - json.data();
        std::size_t backslashes = 0;
        while (quote_at - backslashes > start && json[quote_at - backslashes - 1] == '\\') {
            ++backslashes;
        }
        pos = quote_at + 1;
        if (backslashes % 2 == 0) {
            contents = json.substr(start, quote_at - start);
            return true;
        }
    }
}

bool JsonTree::parse(std::string_view json) {
    nodes_.clear();
    open_.clear();
    nodes_.reserve(json.size() / 16 + 8);
    std::size_t pos = 0;
    const auto skip_space = [&] {
        while (pos < json.size() && is_space(json[pos]))
            ++pos;
    };
    // After '{' or ',' inside an object: the next member's name and its ':'.
    const auto read_key = [&](std::string_view& key) {
        skip_space();
        if (!parse_string(json, pos, key)) return false;
        skip_space();
        if (pos >= json.size() || json[pos] != ':') return false;
        ++pos;
        return true;
    };

    std::string_view key;
    for (;;) {
        // A value starts here.
        skip_space();
        if (pos >= json.size()) return false;
        const char c = json[pos];
        bool value_done = true;
        if (c == '{' || c == '[') {
            const bool object = c == '{';
            open_.push_back(add(object ? Type::kObject : Type::kArray, key));
            ++pos;
            skip_space();
            if (pos < json.size() && json[pos] == (object ? '}' : ']')) {
                ++pos;
                open_.pop_back();
            } else {
                key = {};
                if (object && !read_key(key)) return false;
                value_done = false;
            }
        } else if (c == '"') {
            const std::uint32_t index = add(Type::kString, key);
            if (!parse_string(json, pos, nodes_[index].text)) return false;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            const std::size_t start = pos;
            while (pos < json.size() &&
                   (json[pos] == '-' || json[pos] == '+' || json[pos] == '.' || json[pos] == 'e' ||
                    json[pos] == 'E' || (json[pos] >= '0' && json[pos] <= '9'))) {
                ++pos;
            }
            nodes_[add(Type::kNumber, key)].text = json.substr(start, pos - start);
        } else if (json.substr(pos, 4) == "true"sv) {
            add(Type::kTrue, key);
            pos += 4;
        } else if (json.substr(pos, 5) == "false"sv) {
            add(Type::kFalse, key);
            pos += 5;
        } else if (json.substr(pos, 4) == "null"sv) {
            add(Type::kNull, key);
            pos += 4;
        } else {
            return false;
        }
        if (!value_done) continue;

        // After a value: close containers, or move on to the next element.
        for (;;) {
            skip_space();
            if (open_.empty()) return pos == json.size();
            if (pos >= json.size()) return false;
            Node& container = nodes_[open_.back()];
            const bool object = container.type == Type::kObject;
            if (json[pos] == ',') {
                ++pos;
                key = {};
                if (object && !read_key(key)) return false;
                break;
            }
            if (json[pos] != (object ? '}' : ']')) return false;
            ++pos;
            container.end = size();
            open_.pop_back();
        }
    }
}

std::uint32_t JsonTree::member(std::uint32_t object, std::string_view key) const {
    if (object >= size() || nodes_[object].type != Type::kObject) return kNone;
    for (std::uint32_t child = object + 1; child < nodes_[object].end; child = nodes_[child].end) {
        if (nodes_[child].key == key) return child;
    }
    return kNone;
}

std::string_view JsonTree::node_type(std::uint32_t wrapper) const {
    if (wrapper >= size() || nodes_[wrapper].type != Type::kObject) return {};
    const std::uint32_t body = wrapper + 1;
    if (body >= nodes_[wrapper].end || nodes_[body].end != nodes_[wrapper].end) return {};
    return nodes_[body].key;
}

void append_utf8(std::string& out, std::uint32_t code) {
    if (code < 0x80) {
        out += static_cast<char>(code);
    } else if (code < 0x800) {
        out += static_cast<char>(0xC0 | (code >> 6));
        out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
        out += static_cast<char>(0xE0 | (code >> 12));
        out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (code >> 18));
        out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (code & 0x3F));
    }
}

// Four hex digits at text[pos], or -1.
long hex4(std::string_view text, std::size_t pos) {
    if (pos + 4 > text.size()) return -1;
    long value = 0;
    for (std::size_t i = 0; i < 4; ++i) {
        const int digit = hex_digit(text[pos + i]);
        if (digit < 0) return -1;
        value = (value << 4) | digit;
    }
    return value;
}

std::string unescape_json(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
        if (text[i] != '\\' || i + 1 >= text.size()) {
            out += text[i];
            continue;
        }
        const char escape = text[++i];
        switch (escape) {
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': {
                long code = hex4(text, i + 1);
                if (code < 0) {
                    out += '?';
                    break;
                }
                i += 4;
                // A surrogate pair spells one character beyond the Basic Multilingual Plane.
                if (code >= 0xD800 && code <= 0xDBFF && i + 2 < text.size() &&
                    text[i + 1] == '\\' && text[i + 2] == 'u') {
                    const long low = hex4(text, i + 3);
                    if (low >= 0xDC00 && low <= 0xDFFF) {
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                        i += 6;
                    }
                }
                append_utf8(out, static_cast<std::uint32_t>(code));
                break;
            }
            default: out += escape; break;  // \" \\ \/
        }
    }
    return out;
}

std::string JsonTree::string_value(std::uint32_t index) const {
    if (index >= size() || nodes_[index].type != Type::kString) return {};
    const std::string_view text = nodes_[index].text;
    return text.find('\\') == std::string_view::npos ? std::string(text) : unescape_json(text);
}

std::string JsonTree::string_member(std::uint32_t object, std::string_view key) const {
    return string_value(member(object, key));
}

bool JsonTree::bool_member(std::uint32_t object, std::string_view key) const {
    const std::uint32_t index = member(object, key);
    return index != kNone && nodes_[index].type == Type::kTrue;
}

std::int64_t JsonTree::int_member(std::uint32_t object, std::string_view key) const {
    const std::uint32_t index = member(object, key);
    if (index == kNone || nodes_[index].type != Type::kNumber) return 0;
    std::int64_t value = 0;
    bool negative = false;
    for (const char c : nodes_[index].text) {
        if (c == '-') {
            negative = true;
        } else if (c >= '0' && c <= '9') {
            value = value * 10 + (c - '0');
            if (value > std::numeric_limits<std::int32_t>::max()) break;
        } else {
            break;
        }
    }
    return negative ? -value : value;
}

// ---------------------------------------------------------------------------------------
// Comments, found with pg_query's scanner so that comment-like text inside string
// literals and dollar quotes is not taken.

// Token numbers of pg_query.proto's `Token` enum (libpg_query 15-4).
constexpr std::uint64_t kTokenSqlComment = 275;  // -- ...
constexpr std::uint64_t kTokenCComment = 276;    // /* ... */

struct Comment {
    std::uint32_t start = 0;
    std::string_view body;  // without the comment markers
};

// A minimal protobuf reader for PgQuery__ScanResult: tokens (field 2) holding start (1),
// end (2) and token (4). Decoding the few fields by hand avoids a protobuf-c dependency.
class ProtobufReader {
public:
    explicit ProtobufReader(std::string_view data) : data_(data) {}
    bool done() const { return pos_ >= data_.size(); }
    bool ok() const { return ok_; }

    std::uint64_t varint() {
        std::uint64_t value = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (pos_ >= data_.size()) break;
            const auto byte = static_cast<std::uint8_t>(data_[pos_++]);
            value |= static_cast<std::uint64_t>(byte & 0x7F) << shift;
            if ((byte & 0x80) == 0) return value;
        }
        ok_ = false;
        return 0;
    }
    std::string_view bytes() {
        const std::uint64_t length = varint();
        if (!ok_ || length > data_.size() - pos_) {
            ok_ = false;
            return {};
        }
        const std::string_view chunk = data_.substr(pos_, length);
        pos_ += length;
        return chunk;
    }
    void skip(std::uint64_t wire_type) {
        constexpr std::uint64_t kVarint = 0, kFixed64 = 1, kBytes = 2, kFixed32 = 5;
        std::size_t width = 0;
        switch (wire_type) {
            case kVarint: varint(); return;
            case kBytes: bytes(); return;
            case kFixed64: width = 8; break;
            case kFixed32: width = 4; break;
            default: ok_ = false; return;
        }
        if (width > data_.size() - pos_) {
            ok_ = false;
            return;
        }
        pos_ += width;
    }

private:
    std::string_view data_;
    std::size_t pos_ = 0;
    bool ok_ = true;
};

std::vector<Comment> find_comments(const std::string& sql) {
    std::vector<Comment> comments;
    // Most statements carry no comment; the scanner costs more than these two searches.
    if (sql.find("/*") == std::string::npos && sql.find("--") == std::string::npos) {
        return comments;
    }
    const PgQueryScanResult scan = pg_query_scan(sql.c_str());
    if (scan.error == nullptr && scan.pbuf.data != nullptr) {
        constexpr std::uint64_t kBytesWireType = 2;
        constexpr std::uint64_t kTokensField = 2, kStartField = 1, kEndField = 2, kTokenField = 4;
        ProtobufReader result(std::string_view(scan.pbuf.data, scan.pbuf.len));
        while (result.ok() && !result.done()) {
            const std::uint64_t tag = result.varint();
            if ((tag >> 3) != kTokensField || (tag & 7) != kBytesWireType) {
                result.skip(tag & 7);
                continue;
            }
            ProtobufReader token(result.bytes());
            std::uint64_t start = 0, end = 0, kind = 0;
            while (token.ok() && !token.done()) {
                const std::uint64_t field_tag = token.varint();
                const std::uint64_t field = field_tag >> 3;
                if ((field_tag & 7) != 0) {
                    token.skip(field_tag & 7);
                } else if (field == kStartField) {
                    start = token.varint();
                } else if (field == kEndField) {
                    end = token.varint();
                } else if (field == kTokenField) {
                    kind = token.varint();
                } else {
                    token.varint();
                }
            }
            if (!token.ok() || start > end || end > sql.size()) continue;
            std::string_view text(sql.data() + start, end - start);
            if (kind == kTokenCComment && text.size() >= 4) {
                text = text.substr(2, text.size() - 4);
            } else if (kind == kTokenSqlComment && text.size() >= 2) {
                text.remove_prefix(2);
            } else {
                continue;
            }
            comments.push_back({static_cast<std::uint32_t>(start), text});
        }
    }
    pg_query_free_scan_result(scan);
    return comments;
}

// The first word of a statement: skips the whitespace and comments before it.
std::string_view first_keyword(std::string_view text) {
    std::size_t pos = 0;
    while (pos < text.size()) {
        if (is_space(text[pos])) {
            ++pos;
        } else if (text.substr(pos, 2) == "--"sv) {
            const std::size_t newline = text.find('\n', pos);
            pos = newline == std::string_view::npos ? text.size() : newline + 1;
        } else if (text.substr(pos, 2) == "/*"sv) {
            int depth = 0;  // PostgreSQL's block comments nest
            while (pos < text.size()) {
                if (text.substr(pos, 2) == "/*"sv) {
                    ++depth;
                    pos += 2;
                } else if (text.substr(pos, 2) == "*/"sv) {
                    pos += 2;
                    if (--depth == 0) break;
                } else {
                    ++pos;
                }
            }
        } else {
            break;
        }
    }
    const std::size_t start = pos;
    while (pos < text.size() && ((text[pos] >= 'a' && text[pos] <= 'z') ||
                                 (text[pos] >= 'A' && text[pos] <= 'Z') || text[pos] == '_')) {
        ++pos;
    }
    return text.substr(start, pos - start);
}

// ---------------------------------------------------------------------------------------
// From a statement's parse tree to its StatementInfo.

struct Relation {
    std::int64_t location = 0;
    std::string name;     // "schema.name" or "name"
    bool target = false;  // INSERT/UPDATE/DELETE/MERGE/COPY's own relation, never a CTE
};

// What a linear scan of a subtree finds, wherever it is nested.
struct TreeFacts {
    bool modifies_data = false;         // INSERT/UPDATE/DELETE/MERGE below the top
    std::uint32_t contained_writes = 0;  // bit per StatementKind of those
    bool select_into = false;           // SELECT ... INTO
    bool calls_write_function = false;  // one of [classify] write_functions
    bool row_locking = false;           // FOR UPDATE/SHARE/...
    std::vector<Relation> relations;
    std::vector<std::string> cte_names;  // WITH x AS (...): "x" in FROM is not a table
};

// Statement types whose kind needs no further look; the rest are handled one by one, and
// anything not known at all counts as ddl (or, without a DDL-like name, a write of kind other).
const std::pair<std::string_view, StatementKind> kSimpleKinds[] = {
    {"SelectStmt", StatementKind::kSelect},
    {"InsertStmt", StatementKind::kInsert},
    {"UpdateStmt", StatementKind::kUpdate},
    {"DeleteStmt", StatementKind::kDelete},
    {"MergeStmt", StatementKind::kMerge},
    {"TruncateStmt", StatementKind::kTruncate},
    {"VariableShowStmt", StatementKind::kShow},
    {"ConstraintsSetStmt", StatementKind::kSet},
    {"CallStmt", StatementKind::kCall},
    {"DoStmt", StatementKind::kDo},
    {"LockStmt", StatementKind::kLock},
    {"ListenStmt", StatementKind::kListen},
    {"UnlistenStmt", StatementKind::kListen},
    {"NotifyStmt", StatementKind::kNotify},
    {"VacuumStmt", StatementKind::kMaintenance},  // VACUUM and ANALYZE
    {"ClusterStmt", StatementKind::kMaintenance},
    {"ReindexStmt", StatementKind::kMaintenance},
    {"CheckPointStmt", StatementKind::kMaintenance},
    {"FetchStmt", StatementKind::kSelect},  // FETCH and MOVE
    {"ClosePortalStmt", StatementKind::kSelect},
    {"LoadStmt", StatementKind::kOther},
};

constexpr std::string_view kDdlPrefixes[] = {
    "Create",   "Alter",  "Drop",          "Define",          "Grant",   "Comment",
    "SecLabel", "Rename", "Reassign",      "Import",          "Refresh", "Index",
    "View",     "Rule",   "CompositeType", "ReplicaIdentity",
};

std::optional<StatementKind> simple_kind(std::string_view type) {
    for (const auto& [name, kind] : kSimpleKinds) {
        if (name == type) return kind;
    }
    return std::nullopt;
}

bool is_ddl_type(std::string_view type) {
    return std::any_of(std::begin(kDdlPrefixes), std::end(kDdlPrefixes),
                       [&](std::string_view prefix) { return type.starts_with(prefix); });
}

// EXPLAIN's option values as PostgreSQL's defGetBoolean reads them; anything that is not
// clearly false counts as true, so an odd spelling never hides an ANALYZE.
bool option_is_true(const JsonTree& tree, std::uint32_t def_elem) {
    const std::uint32_t arg = tree.member(def_elem, "arg");
    if (arg == JsonTree::kNone) return true;
    const std::string_view type = tree.node_type(arg);
    const std::uint32_t body = JsonTree::node_body(arg);
    if (type == "Integer"sv) return tree.int_member(body, "ival") != 0;
    if (type == "Boolean"sv) return tree.bool_member(body, "boolval");
    if (type == "String"sv) {
        const std::string value = lowercase(tree.string_member(body, "sval"));
        return !(value == "false" || value == "off" || value == "no" || value == "0" ||
                 value == "f" || value == "n");
    }
    return true;
}

class StatementAnalyzer {
public:
    StatementAnalyzer(const JsonTree& tree, std::string_view sql,
                      const std::vector<std::string>& write_functions)
        : tree_(tree), sql_(sql), write_functions_(write_functions) {}

    // `wrapper` is a statement node ({"SelectStmt": {...}}); `text` its own text.
    void analyze(std::uint32_t wrapper, std::string_view text, StatementInfo& info) const;

private:
    TreeFacts scan(std::uint32_t body) const;
    bool is_write_function(std::uint32_t funcname) const;
    void add_relation(std::uint32_t range_var, TreeFacts& facts) const;
    void analyze_transaction(std::uint32_t body, std::string_view text, StatementInfo& info) const;
    void analyze_set(std::uint32_t body, StatementInfo& info) const;
    std::string render_set_value(std::uint32_t wrapper) const;
    void add_dropped_relations(std::uint32_t body, StatementInfo& info) const;

    const JsonTree& tree_;
    std::string_view sql_;
    const std::vector<std::string>& write_functions_;
};

TreeFacts StatementAnalyzer::scan(std::uint32_t body) const {
    TreeFacts facts;
    for (std::uint32_t i = body + 1; i < tree_[body].end; ++i) {
        const JsonTree::Node& node = tree_[i];
        const std::string_view key = node.key;
        if (key.empty()) continue;  // an array element
        if (key == "InsertStmt"sv || key == "UpdateStmt"sv || key == "DeleteStmt"sv ||
            key == "MergeStmt"sv) {
            facts.modifies_data = true;
            StatementKind k = key == "InsertStmt"sv   ? StatementKind::kInsert
                              : key == "UpdateStmt"sv ? StatementKind::kUpdate
                              : key == "DeleteStmt"sv ? StatementKind::kDelete
                                                      : StatementKind::kMerge;
            facts.contained_writes |= 1u << static_cast<unsigned>(k);
        } else if (key == "intoClause"sv) {
            facts.select_into = true;
        } else if (key == "lockingClause"sv) {
            facts.row_locking = true;
        } else if (key == "ctename"sv) {
            facts.cte_names.push_back(tree_.string_value(i));
        } else if (key == "relname"sv) {
            // Only RangeVar has a relname in a raw parse tree, whether it is wrapped as a
            // Node or sits in a RangeVar-typed field such as InsertStmt.relation.
            if (node.type == JsonTree::Type::kString) add_relation(node.parent, facts);
        } else if (key == "funcname"sv) {
            if (node.type == JsonTree::Type::kArray && is_write_function(i)) {
                facts.calls_write_function = true;
            }
        }
    }
    return facts;
}

bool StatementAnalyzer::is_write_function(std::uint32_t funcname) const {
    if (write_functions_.empty()) return false;
    std::uint32_t last = JsonTree::kNone;
    for (std::uint32_t part = funcname + 1; part < tree_[funcname].end; part = tree_[part].end) {
        last = part;
    }
    if (last == JsonTree::kNone || tree_.node_type(last) != "String"sv) return false;
    const std::string name = tree_.string_member(JsonTree::node_body(last), "sval");
    return std::any_of(write_functions_.begin(), write_functions_.end(),
                       [&](const std::string& listed) { return iequals(listed, name); });
}

void StatementAnalyzer::add_relation(std::uint32_t range_var, TreeFacts& facts) const {
    Relation relation;
    relation.location = tree_.int_member(range_var, "location");
    relation.name = tree_.string_member(range_var, "schemaname");
    if (!relation.name.empty()) relation.name += '.';
    relation.name += tree_.string_member(range_var, "relname");
    relation.target = tree_[range_var].key == "relation"sv;
    facts.relations.push_back(std::move(relation));
}

void StatementAnalyzer::analyze(std::uint32_t wrapper, std::string_view text,
                                StatementInfo& info) const {
    const std::string_view type = tree_.node_type(wrapper);
    const std::uint32_t body = JsonTree::node_body(wrapper);
    TreeFacts facts = scan(body);

    // Tables in the order they appear in the text, each once. A raw parse tree does not
    // resolve names, so a plain name that some WITH defines is taken to be that CTE.
    std::stable_sort(facts.relations.begin(), facts.relations.end(),
                     [](const Relation& a, const Relation& b) { return a.location < b.location; });
    std::unordered_set<std::string_view> ctes(facts.cte_names.begin(), facts.cte_names.end());
    std::unordered_set<std::string> seen;
    for (Relation& relation : facts.relations) {
        const bool is_cte = !relation.target && ctes.count(relation.name) > 0;
        if (!is_cte && seen.insert(relation.name).second) {
            info.tables.push_back(std::move(relation.name));
        }
    }
    info.row_locking = facts.row_locking;
    info.contained_writes = facts.contained_writes;
    const bool writes_below =
        facts.modifies_data || facts.select_into || facts.calls_write_function;

    if (const auto kind = simple_kind(type)) {
        info.kind = *kind;
        info.is_write = is_write_kind(*kind) || writes_below;
        // FETCH and MOVE run the portal they name, which may be a protocol-level one.
        if (type == "FetchStmt"sv) info.fetch_portal = tree_.string_member(body, "portalname");
    } else if (type == "TransactionStmt"sv) {
        analyze_transaction(body, text, info);
        info.is_write = false;
    } else if (type == "VariableSetStmt"sv) {
        analyze_set(body, info);
        info.is_write = false;
    } else if (type == "DiscardStmt"sv) {
        info.kind = StatementKind::kSet;
        // DISCARD ALL includes RESET ALL and DEALLOCATE ALL.
        info.reset_all = tree_.string_member(body, "target") == "DISCARD_ALL";
        info.deallocate_all = info.reset_all;
        info.is_write = false;
    } else if (type == "CopyStmt"sv) {
        info.kind =
            tree_.bool_member(body, "is_from") ? StatementKind::kCopyIn : StatementKind::kCopyOut;
        info.is_write = is_write_kind(info.kind) || writes_below;
    } else if (type == "ExplainStmt"sv) {
        bool analyze_option = false;
        const std::uint32_t options = tree_.member(body, "options");
        if (options != JsonTree::kNone) {
            for (std::uint32_t option = options + 1; option < tree_[options].end;
                 option = tree_[option].end) {
                const std::uint32_t def_elem = JsonTree::node_body(option);
                if (tree_.string_member(def_elem, "defname") == "analyze" &&
                    option_is_true(tree_, def_elem)) {
                    analyze_option = true;
                }
            }
        }
        StatementInfo inner;
        const std::uint32_t query = tree_.member(body, "query");
        if (query != JsonTree::kNone) analyze(query, text, inner);
        info.kind = StatementKind::kExplain;
        // EXPLAIN alone only plans; ANALYZE runs the statement. An EXECUTE's statement is
        // not known here, so EXPLAIN ANALYZE EXECUTE counts as a write.
        info.is_write = analyze_option && (inner.is_write || !inner.execute_name.empty());
        info.row_locking = analyze_option && inner.row_locking;
        if (analyze_option) {
            // EXPLAIN ANALYZE runs its statement: rules on that statement's kind apply.
            info.contained_writes = inner.contained_writes;
            if (is_write_kind(inner.kind)) info.contained_writes |= 1u << static_cast<unsigned>(inner.kind);
            info.execute_name = inner.execute_name;
        } else {
            info.contained_writes = 0;
        }
    } else if (type == "PrepareStmt"sv) {
        const std::uint32_t query = tree_.member(body, "query");
        if (query != JsonTree::kNone) {
            info.tables.clear();
            analyze(query, text, info);
        } else {
            info.kind = StatementKind::kOther;
            info.is_write = true;
        }
        info.prepare_name = tree_.string_member(body, "name");
    } else if (type == "ExecuteStmt"sv) {
        info.kind = StatementKind::kOther;
        info.execute_name = tree_.string_member(body, "name");
        info.is_write = writes_below;  // its parameters may call nextval()
    } else if (type == "DeallocateStmt"sv) {
        info.kind = StatementKind::kOther;
        info.deallocate_name = tree_.string_member(body, "name");
        info.deallocate_all = info.deallocate_name.empty();
        info.is_write = false;
    } else if (type == "DeclareCursorStmt"sv) {
        StatementInfo inner;
        const std::uint32_t query = tree_.member(body, "query");
        if (query != JsonTree::kNone) analyze(query, text, inner);
        info.kind =
            inner.kind == StatementKind::kSelect ? StatementKind::kSelect : StatementKind::kOther;
        info.is_write = query == JsonTree::kNone || inner.is_write;
    } else if (is_ddl_type(type)) {
        info.kind = StatementKind::kDdl;
        info.is_write = true;
        if (type == "DropStmt"sv) add_dropped_relations(body, info);
    } else {
        info.kind = StatementKind::kOther;
        info.is_write = true;  // a statement type this code does not know: fail closed
    }
}

void StatementAnalyzer::analyze_transaction(std::uint32_t body, std::string_view text,
                                            StatementInfo& info) const {
    const std::string kind = tree_.string_member(body, "kind");
    info.chain = tree_.bool_member(body, "chain");
    info.savepoint = tree_.string_member(body, "savepoint_name");
    info.gid = tree_.string_member(body, "gid");
    if (kind == "TRANS_STMT_BEGIN") {
        info.kind = StatementKind::kBegin;
    } else if (kind == "TRANS_STMT_START") {
        info.kind = StatementKind::kBegin;
        info.is_start_transaction = true;
    } else if (kind == "TRANS_STMT_COMMIT") {
        info.kind = StatementKind::kCommit;
        // The parse tree says COMMIT for END as well; only the text tells them apart.
        info.is_end_alias = iequals(first_keyword(text), "end");
    } else if (kind == "TRANS_STMT_ROLLBACK") {
        info.kind = StatementKind::kRollback;
        info.is_end_alias = iequals(first_keyword(text), "abort");
    } else if (kind == "TRANS_STMT_SAVEPOINT") {
        info.kind = StatementKind::kSavepoint;
    } else if (kind == "TRANS_STMT_RELEASE") {
        info.kind = StatementKind::kRelease;
    } else if (kind == "TRANS_STMT_ROLLBACK_TO") {
        info.kind = StatementKind::kRollbackTo;
    } else if (kind == "TRANS_STMT_PREPARE") {
        info.kind = StatementKind::kPrepareTransaction;
    } else if (kind == "TRANS_STMT_COMMIT_PREPARED" || kind == "TRANS_STMT_ROLLBACK_PREPARED") {
        info.kind = StatementKind::kCommitPrepared;
    } else {
        info.kind = StatementKind::kOther;
    }
}

void StatementAnalyzer::analyze_set(std::uint32_t body, StatementInfo& info) const {
    info.kind = StatementKind::kSet;
    info.set_local = tree_.bool_member(body, "is_local");
    const std::string kind = tree_.string_member(body, "kind");
    if (kind == "VAR_RESET_ALL") {
        info.reset_all = true;
        return;
    }
    // SET TRANSACTION / SESSION CHARACTERISTICS set no parameter by name, and SET x FROM
    // CURRENT leaves x's value as it is: nothing for the proxy to track.
    if (kind == "VAR_SET_MULTI" || kind == "VAR_SET_CURRENT") return;
    info.set_name = lowercase(tree_.string_member(body, "name"));
    if (kind != "VAR_SET_VALUE") return;  // RESET x, SET x TO DEFAULT
    std::string value;
    const std::uint32_t args = tree_.member(body, "args");
    if (args != JsonTree::kNone) {
        for (std::uint32_t arg = args + 1; arg < tree_[args].end; arg = tree_[arg].end) {
            if (arg != args + 1) value += ", ";
            value += render_set_value(arg);
        }
    }
    info.set_value = std::move(value);
}

// A SET argument as text: strings and identifiers as given, numbers as written.
std::string StatementAnalyzer::render_set_value(std::uint32_t wrapper) const {
    const std::string_view type = tree_.node_type(wrapper);
    const std::uint32_t body = JsonTree::node_body(wrapper);
    if (type == "TypeCast"sv) {  // SET TIME ZONE INTERVAL '...'
        const std::uint32_t arg = tree_.member(body, "arg");
        return arg == JsonTree::kNone ? std::string() : render_set_value(arg);
    }
    if (type != "A_Const"sv) return {};
    if (const std::uint32_t text = tree_.member(body, "sval"); text != JsonTree::kNone) {
        return tree_.string_member(text, "sval");
    }
    if (const std::uint32_t number = tree_.member(body, "fval"); number != JsonTree::kNone) {
        return tree_.string_member(number, "fval");
    }
    if (const std::uint32_t number = tree_.member(body, "ival"); number != JsonTree::kNone) {
        // libpg_query 15-4's JSON drops negative integers ("ival":{}), so the digits are
        // taken from the query text at the constant's location.
        const std::int64_t location = tree_.int_member(body, "location");
        if (location > 0 && static_cast<std::size_t>(location) < sql_.size()) {
            std::size_t end = static_cast<std::size_t>(location);
            if (sql_[end] == '-' || sql_[end] == '+') ++end;
            while (end < sql_.size() && sql_[end] >= '0' && sql_[end] <= '9')
                ++end;
            const std::string_view digits =
                sql_.substr(static_cast<std::size_t>(location), end - location);
            if (!digits.empty() && digits.back() >= '0' && digits.back() <= '9') {
                return std::string(digits);
            }
        }
        return std::to_string(tree_.int_member(number, "ival"));
    }
    if (const std::uint32_t flag = tree_.member(body, "boolval"); flag != JsonTree::kNone) {
        return tree_.bool_member(flag, "boolval") ? "true" : "false";
    }
    return {};
}

// DROP names its relations as lists of strings, not RangeVars.
void StatementAnalyzer::add_dropped_relations(std::uint32_t body, StatementInfo& info) const {
    const std::string type = tree_.string_member(body, "removeType");
    if (type != "OBJECT_TABLE" && type != "OBJECT_VIEW" && type != "OBJECT_MATVIEW" &&
        type != "OBJECT_FOREIGN_TABLE" && type != "OBJECT_SEQUENCE" && type != "OBJECT_INDEX") {
        return;
    }
    const std::uint32_t objects = tree_.member(body, "objects");
    if (objects == JsonTree::kNone) return;
    for (std::uint32_t object = objects + 1; object < tree_[objects].end;
         object = tree_[object].end) {
        const std::uint32_t items = tree_.member(JsonTree::node_body(object), "items");
        if (items == JsonTree::kNone) continue;
        std::vector<std::string> parts;
        for (std::uint32_t part = items + 1; part < tree_[items].end; part = tree_[part].end) {
            parts.push_back(tree_.string_member(JsonTree::node_body(part), "sval"));
        }
        if (parts.empty()) continue;
        // catalog.schema.name keeps schema.name, as RangeVars do.
        std::string name = parts.back();
        if (parts.size() >= 2) name = parts[parts.size() - 2] + "." + name;
        if (std::find(info.tables.begin(), info.tables.end(), name) == info.tables.end()) {
            info.tables.push_back(std::move(name));
        }
    }
}

// Adds the tags of the comments in text[info.location, end). Comments and statements both
// come in text order, so `next` carries on where the previous statement stopped.
void attach_tags(const std::vector<Comment>& comments, std::size_t& next, std::uint64_t end,
                 StatementInfo& info) {
    while (next < comments.size() && comments[next].start < info.location)
        ++next;
    for (; next < comments.size() && comments[next].start < end; ++next) {
        for (auto& tag : parse_comment_tags(comments[next].body)) {
            info.tags.push_back(std::move(tag));
        }
    }
}

// Fail closed: one write of kind `other` covering the whole text.
Classification unparsable(const std::string& sql) {
    Classification result;
    StatementInfo& info = result.statements.emplace_back();
    info.kind = StatementKind::kOther;
    info.is_write = true;
    info.parse_error = true;
    info.length = static_cast<std::uint32_t>(sql.size());
    std::size_t next_comment = 0;
    attach_tags(find_comments(sql), next_comment, sql.size(), info);
    return result;
}

}  // namespace

const char* to_string(StatementKind kind) {
    const auto index = static_cast<std::size_t>(kind);
    return index < kKindNames.size() ? kKindNames[index].data() : "other";
}

std::optional<StatementKind> statement_kind_from_string(std::string_view name) {
    for (std::size_t i = 0; i < kKindNames.size(); ++i) {
        if (kKindNames[i] == name) return static_cast<StatementKind>(i);
    }
    return std::nullopt;
}

bool is_write_kind(StatementKind kind) {
    switch (kind) {
        case StatementKind::kInsert:
        case StatementKind::kUpdate:
        case StatementKind::kDelete:
        case StatementKind::kMerge:
        case StatementKind::kCopyIn:
        case StatementKind::kDdl:
        case StatementKind::kTruncate:
        case StatementKind::kCall:
        case StatementKind::kDo: return true;
        default: return false;
    }
}

std::string_view StatementInfo::tag(std::string_view key) const {
    for (const auto& [name, value] : tags) {
        if (name == key) return value;
    }
    return {};
}

bool Classification::any_write() const {
    return std::any_of(statements.begin(), statements.end(),
                       [](const StatementInfo& info) { return info.is_write; });
}

std::vector<std::pair<std::string, std::string>> parse_comment_tags(std::string_view comment) {
    std::vector<std::pair<std::string, std::string>> tags;
    std::size_t pos = 0;
    const std::size_t size = comment.size();
    const auto skip_space = [&] {
        while (pos < size && is_space(comment[pos]))
            ++pos;
    };
    const auto skip_past_comma = [&] {
        const std::size_t comma = comment.find(',', pos);
        pos = comma == std::string_view::npos ? size : comma + 1;
    };
    for (;;) {
        skip_space();
        if (pos >= size) break;
        const std::size_t key_start = pos;
        while (pos < size && comment[pos] != '=' && comment[pos] != ',' && comment[pos] != '\'') {
            ++pos;
        }
        const std::string_view key = trim(comment.substr(key_start, pos - key_start));
        const bool key_ok = pos < size && comment[pos] == '=' && !key.empty() &&
                            std::none_of(key.begin(), key.end(), is_space);
        if (!key_ok) {
            skip_past_comma();
            continue;
        }
        ++pos;  // '='
        skip_space();
        if (pos >= size || comment[pos] != '\'') {
            skip_past_comma();
            continue;
        }
        ++pos;
        std::string value;
        bool closed = false;
        while (pos < size) {
            const char c = comment[pos++];
            if (c == '\\' && pos < size) {
                value += comment[pos++];
            } else if (c == '\'') {
                closed = true;
                break;
            } else {
                value += c;
            }
        }
        if (!closed) break;
        tags.emplace_back(url_decode(key), url_decode(value));
        skip_space();
        if (pos < size && comment[pos] == ',') {
            ++pos;
        } else if (pos < size) {
            skip_past_comma();  // junk after the value: drop it, keep the pair before it
        }
    }
    return tags;
}

Classifier::Classifier(ClassifyConfig config) : config_(std::move(config)) {
    // Only the last component of a function name is compared ("pg_catalog.nextval").
    for (std::string& name : config_.write_functions) {
        const std::size_t dot = name.rfind('.');
        if (dot != std::string::npos) name.erase(0, dot + 1);
    }
}

Classifier::~Classifier() = default;

template <typename Value>
const Value* Classifier::Lru<Value>::find(std::string_view key) {
    const auto found = index_.find(key);
    if (found == index_.end()) return nullptr;
    entries_.splice(entries_.begin(), entries_, found->second);
    return &found->second->second;
}

template <typename Value>
void Classifier::Lru<Value>::insert(std::string key, Value value, std::size_t limit) {
    if (limit == 0 || index_.contains(key)) return;
    entries_.emplace_front(std::move(key), std::move(value));
    index_.emplace(entries_.front().first, entries_.begin());
    if (entries_.size() > limit) {
        index_.erase(entries_.back().first);
        entries_.pop_back();
    }
}

namespace {

bool is_identifier_char(char c) {
    const auto u = static_cast<unsigned char>(c);
    return (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || (u >= '0' && u <= '9') || u == '_' ||
           u == '$' || u >= 0x80;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// What one classification may stand for: a single INSERT/UPDATE/DELETE/MERGE/SELECT whose
// details are keywords and names only. Excluded: SET (its value), PREPARE TRANSACTION (its
// id), EXPLAIN (ANALYZE 0 and ANALYZE 1 differ), PREPARE/EXECUTE/DEALLOCATE, text the
// parser rejected, and several statements (their offsets move with the constants).
bool shape_can_stand_for_others(const Classification& c) {
    if (c.statements.size() != 1) return false;
    const StatementInfo& s = c.statements.front();
    switch (s.kind) {
        case StatementKind::kSelect:
        case StatementKind::kInsert:
        case StatementKind::kUpdate:
        case StatementKind::kDelete:
        case StatementKind::kMerge: break;
        default: return false;
    }
    return !s.parse_error && !s.unknown && s.prepare_name.empty() && s.execute_name.empty() && s.fetch_portal.empty() &&
           s.deallocate_name.empty() && !s.deallocate_all && s.set_name.empty() && !s.set_value &&
           !s.set_local && !s.reset_all && s.gid.empty() && s.savepoint.empty();
}

}  // namespace

bool statement_shape(std::string_view sql, std::string& shape, std::size_t& first, std::size_t& last) {
    // Follows PostgreSQL's scanner (standard_conforming_strings on, as libpg_query parses)
    // only as far as it must to find constants; everything it is unsure of fails.
    shape.clear();
    shape.reserve(sql.size());
    first = last = 0;
    bool any = false;
    const std::size_t n = sql.size();
    std::size_t i = 0;
    const auto constant = [&](std::size_t begin, std::size_t end, char type) {
        if (!any) first = begin;
        any = true;
        last = end;
        shape += '\0';  // never in a text that gets here: NUL fails below
        shape += type;
    };
    std::size_t run = 0;  // start of the text not yet copied
    const auto flush = [&] { shape.append(sql.substr(run, i - run)); };
    while (i < n) {
        const char c = sql[i];
        // Most bytes only need copying, which happens a run at a time.
        if (c != '\'' && c != '"' && c != '-' && c != '/' && c != '$' && c != '.' && c != '\0' && !is_digit(c)) {
            ++i;
            continue;
        }
        flush();
        const bool after_identifier = i > 0 && is_identifier_char(sql[i - 1]);
        if (c == '\0') return false;
        if (c == '\'') {
            // E'..', B'..', X'..', N'..', U&'..': the prefix changes how the body reads.
            if (after_identifier || (i > 0 && sql[i - 1] == '&')) return false;
            std::size_t j = i + 1;
            for (;; ++j) {
                if (j >= n || sql[j] == '\0') return false;
                if (sql[j] == '\'') {
                    if (j + 1 < n && sql[j + 1] == '\'') {
                        ++j;
                        continue;
                    }
                    break;
                }
            }
            constant(i, j + 1, 's');
            i = run = j + 1;
            continue;
        }
        if (c == '"') {  // quoted identifier: kept
            std::size_t j = i + 1;
            for (;; ++j) {
                if (j >= n || sql[j] == '\0') return false;
                if (sql[j] == '"') {
                    if (j + 1 < n && sql[j + 1] == '"') {
                        ++j;
                        continue;
                    }
                    break;
                }
            }
            shape.append(sql.substr(i, j + 1 - i));
            i = run = j + 1;
            continue;
        }
        if (c == '-' && i + 1 < n && sql[i + 1] == '-') {  // line comment: kept
            std::size_t j = sql.find('\n', i);
            j = j == std::string_view::npos ? n : j + 1;
            const std::string_view comment = sql.substr(i, j - i);
            if (comment.find('\0') != std::string_view::npos) return false;
            shape.append(comment);
            i = run = j;
            continue;
        }
        if (c == '/' && i + 1 < n && sql[i + 1] == '*') {  // block comment, nesting: kept
            std::size_t j = i;
            int depth = 0;
            do {
                if (j + 1 >= n) return false;
                if (sql[j] == '\0') return false;
                if (sql[j] == '/' && sql[j + 1] == '*') {
                    ++depth;
                    j += 2;
                } else if (sql[j] == '*' && sql[j + 1] == '/') {
                    --depth;
                    j += 2;
                } else {
                    ++j;
                }
            } while (depth > 0);
            shape.append(sql.substr(i, j - i));
            i = run = j;
            continue;
        }
        if (c == '$' && !after_identifier) {
            if (i + 1 >= n || !is_digit(sql[i + 1])) return false;  // a dollar quote
            std::size_t j = i + 1;  // $n: a parameter, kept
            while (j < n && is_digit(sql[j]))
                ++j;
            shape.append(sql.substr(i, j - i));
            i = run = j;
            continue;
        }
        if (!after_identifier && (is_digit(c) || (c == '.' && i + 1 < n && is_digit(sql[i + 1])))) {
            std::size_t j = i;
            while (j < n && is_digit(sql[j]))
                ++j;
            if (j < n && sql[j] == '.' && !(j + 1 < n && sql[j + 1] == '.')) {
                ++j;
                while (j < n && is_digit(sql[j]))
                    ++j;
            }
            if (j < n && (sql[j] == 'e' || sql[j] == 'E')) {
                std::size_t k = j + 1;
                if (k < n && (sql[k] == '+' || sql[k] == '-')) ++k;
                if (k < n && is_digit(sql[k])) {
                    while (k < n && is_digit(sql[k]))
                        ++k;
                    j = k;
                }
            }
            constant(i, j, 'n');
            i = run = j;
            continue;
        }
        shape += c;
        run = ++i;
    }
    flush();
    return any;
}

std::shared_ptr<const Classification> Classifier::classify(std::string_view sql) {
    const bool cacheable = config_.cache_entries > 0 && sql.size() <= kMaxCachedTextBytes;
    if (cacheable) {
        if (const auto* found = exact_.find(sql)) {
            ++hits_;
            return *found;
        }
    }
    ++misses_;
    std::size_t first_constant = 0, last_constant = 0;
    const bool shaped = cacheable && statement_shape(sql, shape_, first_constant, last_constant);
    if (shaped) {
        if (const Template* found = shapes_.find(shape_)) {
            // Offsets before the first constant and after the last are the same in every
            // text of the shape; only the statement's length moves.
            const StatementInfo& model = found->classification->statements.front();
            Spare* spare = nullptr;
            for (std::size_t tried = 0; tried < kSpares && !spare; ++tried) {
                Spare& candidate = spares_[next_spare_];
                next_spare_ = (next_spare_ + 1) % kSpares;
                if (!candidate.classification || candidate.classification.use_count() == 1) spare = &candidate;
            }
            if (!spare) {  // all held: the oldest slot takes a new one
                spare = &spares_[next_spare_];
                next_spare_ = (next_spare_ + 1) % kSpares;
            }
            if (!spare->classification || spare->classification.use_count() > 1) {
                spare->classification = std::make_shared<Classification>();
                spare->filled_from.reset();
            }
            Classification& copy = *spare->classification;
            if (spare->filled_from != found->classification) {
                // Forgotten first: a copy that throws half-way must not pass for either.
                spare->filled_from.reset();
                copy.statements.resize(1);
                copy.statements.front() = model;  // assignment keeps the strings' memory
                spare->filled_from = found->classification;
            }
            copy.statements.front().length =
                static_cast<std::uint32_t>(sql.size() - found->tail - model.location);
            copy.log_text.assign(sql.substr(0, 200));
            ++shape_hits_;
            return spare->classification;
        }
    }
    Classification fresh = classify_uncached(sql);
    fresh.log_text = std::string(sql.substr(0, 200));
    auto result = std::make_shared<const Classification>(std::move(fresh));
    if (cacheable) {
        exact_.insert(std::string(sql), result, config_.cache_entries);
        if (shaped && shape_can_stand_for_others(*result)) {
            const StatementInfo& only = result->statements.front();
            const std::size_t end = std::size_t{only.location} + only.length;
            if (only.location <= first_constant && end >= last_constant && end <= sql.size())
                shapes_.insert(shape_, Template{result, static_cast<std::uint32_t>(sql.size() - end)},
                               config_.cache_entries);
        }
    }
    return result;
}

Classification Classifier::classify_uncached(std::string_view sql) const {
    // pg_query reads a C string; the server would stop at a NUL as well, but the proxy might
    // not, so a text with one is not trusted to mean what its prefix means.
    const std::string text(sql);
    if (text.find('\0') != std::string::npos ||
        text.size() > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max())) {
        return unparsable(text);
    }

    // pg_query keeps its memory context per thread, so one Classifier per thread is safe.
    struct ParseResult {
        PgQueryParseResult result;
        ~ParseResult() { pg_query_free_parse_result(result); }
    } parsed{pg_query_parse(text.c_str())};
    JsonTree tree;
    if (parsed.result.error != nullptr || parsed.result.parse_tree == nullptr ||
        !tree.parse(parsed.result.parse_tree)) {
        return unparsable(text);
    }

    Classification result;
    const std::uint32_t statements = tree.member(0, "stmts");
    if (statements == JsonTree::kNone) return result;  // nothing but comments and spaces
    const std::vector<Comment> comments = find_comments(text);
    std::size_t next_comment = 0;
    const StatementAnalyzer analyzer(tree, text, config_.write_functions);
    for (std::uint32_t raw = statements + 1; raw < tree[statements].end; raw = tree[raw].end) {
        StatementInfo& info = result.statements.emplace_back();
        // Each statement runs from just after the previous ';' (leading comments included)
        // up to its own ';'; a length of 0 means "to the end of the text".
        const std::int64_t location = tree.int_member(raw, "stmt_location");
        const std::int64_t length = tree.int_member(raw, "stmt_len");
        if (location < 0 || static_cast<std::size_t>(location) > text.size() || length < 0 ||
            static_cast<std::size_t>(location + length) > text.size()) {
            return unparsable(text);
        }
        info.location = static_cast<std::uint32_t>(location);
        info.length = static_cast<std::uint32_t>(length > 0 ? length : text.size() - location);
        const std::uint32_t statement = tree.member(raw, "stmt");
        if (statement == JsonTree::kNone) return unparsable(text);
        analyzer.analyze(statement, std::string_view(text).substr(info.location, info.length),
                         info);
        // A comment after the last ';' ("SELECT 1; /* client='a' */") belongs to no statement
        // of the server's; it is taken as the last statement's, as its author meant.
        const bool last = tree[raw].end == tree[statements].end;
        attach_tags(comments, next_comment,
                    last ? text.size() : std::uint64_t{info.location} + info.length, info);
    }
    return result;
}

}  // namespace pgwarden::policy
