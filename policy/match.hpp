// Matching clients and statements against the `match` tables of [[rule]] and
// [[throttle]]: '*' wildcards for names, CIDR blocks for addresses, statement kinds
// (with "write" meaning anything classified as a write) and table patterns.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/identity.hpp"

namespace pgwarden::policy {

// Shell-style match where '*' stands for any run of characters (and nothing else is special).
bool glob_match(std::string_view pattern, std::string_view text);

// A glob pattern compiled once: the shapes configs use (a literal, "*", "prefix*",
// "*suffix") compare without the general matcher, which the rest fall back to.
class Glob {
public:
    explicit Glob(std::string pattern);
    bool matches(std::string_view text) const;
    // matches(head + tail), without joining them.
    bool matches_joined(std::string_view head, std::string_view tail) const;

private:
    enum class Shape : std::uint8_t { kAny, kLiteral, kPrefix, kSuffix, kGeneral };
    std::string pattern_;
    std::string fixed_;  // kLiteral: the whole text; kPrefix/kSuffix: the part without '*'
    Shape shape_ = Shape::kGeneral;
};

// An IPv4 or IPv6 network ("10.0.0.0/8", "::1/128", or a plain address).
class Cidr {
public:
    static std::optional<Cidr> parse(std::string_view text);
    bool contains(std::string_view address) const;

private:
    bool v6_ = false;
    std::array<std::uint8_t, 16> bytes_{};
    int prefix_ = 0;
};

// A table pattern ("audit.*", "orders", "*.secrets") compiled once: does it match a table
// name as written in a statement ("audit.log", "orders")? Unqualified names count as
// schema "public"; an unqualified pattern matches the name in any schema.
class TablePattern {
public:
    explicit TablePattern(std::string pattern);
    bool matches(std::string_view table) const { return matches(table, last_dot(table)); }
    // The same, with `dot` = last_dot(table) worked out once for many patterns.
    bool matches(std::string_view table, std::size_t dot) const;
    static std::size_t last_dot(std::string_view table);  // npos when unqualified

private:
    Glob glob_;
    bool qualified_;  // the pattern names a schema
};

// Which statement kinds a list names: kinds by name, or "write" for any write.
class KindSet {
public:
    KindSet() = default;
    explicit KindSet(const std::vector<std::string>& names);
    bool empty() const { return !any_ && !writes_; }
    bool matches(const StatementInfo& statement) const;
    bool contains(StatementKind kind) const { return bits_ & (1u << static_cast<unsigned>(kind)); }

private:
    std::uint32_t bits_ = 0;
    bool any_ = false;
    bool writes_ = false;
};

class Matcher {
public:
    Matcher() = default;
    explicit Matcher(const Match& match);

    bool matches_client(const ClientIdentity& identity, std::string_view client) const;
    // Statement kinds and tables (only set for [[rule]]); true when neither is given.
    bool matches_statement(const StatementInfo& statement) const {
        return matches_kind(statement) && matches_tables(statement);
    }
    // The two halves of matches_statement(). The tables' answer depends on nothing but
    // the statement's tables (and `unknown`), so a caller may remember it.
    bool matches_kind(const StatementInfo& statement) const;
    bool matches_tables(const StatementInfo& statement) const;
    bool has_tables() const { return !tables_.empty(); }

private:
    static bool any_glob(const std::vector<Glob>& patterns, std::string_view value);
    Match match_;
    std::vector<Glob> user_, database_, application_name_, client_;
    std::vector<TablePattern> tables_;
    std::vector<Cidr> networks_;
    KindSet kinds_;
};

// TablePattern(pattern).matches(table), for one-off checks.
bool table_matches(std::string_view pattern, std::string_view table);

}  // namespace pgwarden::policy
