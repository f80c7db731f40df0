// Name, address, kind and table matching.
#include "policy/match.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <cstring>

namespace pgwarden::policy {

bool glob_match(std::string_view pattern, std::string_view text) {
    // Iterative wildcard matching with backtracking to the last '*'.
    std::size_t p = 0, t = 0, star = std::string_view::npos, mark = 0;
    while (t < text.size()) {
        if (p < pattern.size() && pattern[p] == '*') {
            star = p++;
            mark = t;
        } else if (p < pattern.size() && pattern[p] == text[t]) {
            ++p;
            ++t;
        } else if (star != std::string_view::npos) {
            p = star + 1;
            t = ++mark;
        } else {
            return false;
        }
    }
    while (p < pattern.size() && pattern[p] == '*') ++p;
    return p == pattern.size();
}

Glob::Glob(std::string pattern) : pattern_(std::move(pattern)) {
    const std::string_view p = pattern_;
    const auto stars = std::count(p.begin(), p.end(), '*');
    if (stars == 0) {
        shape_ = Shape::kLiteral;
        fixed_ = std::string(p);
    } else if (p.find_first_not_of('*') == std::string_view::npos) {
        shape_ = Shape::kAny;
    } else if (stars == 1 && p.back() == '*') {
        shape_ = Shape::kPrefix;
        fixed_ = std::string(p.substr(0, p.size() - 1));
    } else if (stars == 1 && p.front() == '*') {
        shape_ = Shape::kSuffix;
        fixed_ = std::string(p.substr(1));
    }
}

bool Glob::matches(std::string_view text) const {
    switch (shape_) {
        case Shape::kAny: return true;
        case Shape::kLiteral: return text == fixed_;
        case Shape::kPrefix: return text.starts_with(fixed_);
        case Shape::kSuffix: return text.ends_with(fixed_);
        case Shape::kGeneral: break;
    }
    return glob_match(pattern_, text);
}

bool Glob::matches_joined(std::string_view head, std::string_view tail) const {
    const std::string_view fixed = fixed_;
    switch (shape_) {
        case Shape::kAny:
            return true;
        case Shape::kLiteral:
            return fixed.size() == head.size() + tail.size() && fixed.starts_with(head) && fixed.ends_with(tail);
        case Shape::kPrefix:
            if (fixed.size() <= head.size()) return head.starts_with(fixed);
            return fixed.starts_with(head) && tail.starts_with(fixed.substr(head.size()));
        case Shape::kSuffix:
            if (fixed.size() <= tail.size()) return tail.ends_with(fixed);
            return fixed.ends_with(tail) && head.ends_with(fixed.substr(0, fixed.size() - tail.size()));
        case Shape::kGeneral:
            break;
    }
    // Identifiers are at most 63 bytes: the joined name fits on the stack.
    char local[256];
    if (head.size() + tail.size() <= sizeof local) {
        std::memcpy(local, head.data(), head.size());
        std::memcpy(local + head.size(), tail.data(), tail.size());
        return glob_match(pattern_, std::string_view(local, head.size() + tail.size()));
    }
    std::string joined(head);
    joined += tail;
    return glob_match(pattern_, joined);
}

std::optional<Cidr> Cidr::parse(std::string_view text) {
    Cidr c;
    std::string addr(text);
    int prefix = -1;
    if (auto slash = addr.find('/'); slash != std::string::npos) {
        // Digits only: stoi would also take " 8", "+8" and "-1" (which meant /32 here).
        std::string_view digits = std::string_view(addr).substr(slash + 1);
        if (digits.empty() || digits.size() > 3 ||
            digits.find_first_not_of("0123456789") != std::string_view::npos)
            return std::nullopt;
        prefix = std::stoi(std::string(digits));
        addr.resize(slash);
    }
    if (inet_pton(AF_INET, addr.c_str(), c.bytes_.data()) == 1) {
        c.v6_ = false;
        c.prefix_ = prefix < 0 ? 32 : prefix;
        if (c.prefix_ > 32) return std::nullopt;
    } else if (inet_pton(AF_INET6, addr.c_str(), c.bytes_.data()) == 1) {
        c.v6_ = true;
        c.prefix_ = prefix < 0 ? 128 : prefix;
        if (c.prefix_ > 128) return std::nullopt;
    } else {
        return std::nullopt;
    }
    return c;
}

bool Cidr::contains(std::string_view address) const {
    std::array<std::uint8_t, 16> bytes{};
    // Link-local peers come with a zone ("fe80::1%eth0"); like pg_hba, compare the address only.
    std::string a(address.substr(0, address.find('%')));
    bool v6;
    if (inet_pton(AF_INET, a.c_str(), bytes.data()) == 1) {
        v6 = false;
    } else if (inet_pton(AF_INET6, a.c_str(), bytes.data()) == 1) {
        v6 = true;
        // An IPv4 client seen through an IPv6 socket (::ffff:a.b.c.d) matches v4 networks.
        static const std::uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (!v6_ && std::memcmp(bytes.data(), mapped, 12) == 0) {
            std::memmove(bytes.data(), bytes.data() + 12, 4);
            v6 = false;
        }
    } else {
        return false;
    }
    if (v6 != v6_) return false;
    int full = prefix_ / 8, rest = prefix_ % 8;
    if (std::memcmp(bytes.data(), bytes_.data(), std::size_t(full)) != 0) return false;
    if (rest == 0) return true;
    std::uint8_t mask = std::uint8_t(0xff << (8 - rest));
    return (bytes[std::size_t(full)] & mask) == (bytes_[std::size_t(full)] & mask);
}

KindSet::KindSet(const std::vector<std::string>& names) {
    for (const auto& n : names) {
        if (n == "write") {
            writes_ = true;
        } else if (auto k = statement_kind_from_string(n)) {
            bits_ |= 1u << static_cast<unsigned>(*k);
            any_ = true;
        }
    }
}

bool KindSet::matches(const StatementInfo& statement) const {
    if (statement.unknown) return true;
    if (writes_ && statement.is_write) return true;
    // A rule on "insert" also catches an INSERT inside a writable WITH or EXPLAIN ANALYZE.
    return contains(statement.kind) || (bits_ & statement.contained_writes) != 0;
}

Matcher::Matcher(const Match& match) : match_(match), kinds_(match.statements) {
    for (const auto& a : match.address)
        if (auto c = Cidr::parse(a)) networks_.push_back(*c);
    auto compile = [](const std::vector<std::string>& patterns, std::vector<Glob>& out) {
        out.reserve(patterns.size());
        for (const auto& p : patterns) out.emplace_back(p);
    };
    compile(match.user, user_);
    compile(match.database, database_);
    compile(match.application_name, application_name_);
    compile(match.client, client_);
    tables_.reserve(match.tables.size());
    for (const auto& t : match.tables) tables_.emplace_back(t);
}

bool Matcher::any_glob(const std::vector<Glob>& patterns, std::string_view value) {
    if (patterns.empty()) return true;
    for (const auto& p : patterns)
        if (p.matches(value)) return true;
    return false;
}

bool Matcher::matches_client(const ClientIdentity& identity, std::string_view client) const {
    if (!any_glob(user_, identity.user())) return false;
    if (!any_glob(database_, identity.database())) return false;
    if (!any_glob(application_name_, identity.application_name())) return false;
    if (!any_glob(client_, client)) return false;
    if (!match_.address.empty()) {
        bool inside = false;
        for (const auto& n : networks_) inside = inside || n.contains(identity.address());
        if (!inside) return false;
    }
    return true;
}

bool Matcher::matches_kind(const StatementInfo& statement) const {
    return kinds_.empty() || kinds_.matches(statement);
}

bool Matcher::matches_tables(const StatementInfo& statement) const {
    if (tables_.empty() || statement.unknown) return true;
    for (const auto& table : statement.tables) {
        const std::size_t dot = TablePattern::last_dot(table);
        for (const auto& pattern : tables_)
            if (pattern.matches(table, dot)) return true;
    }
    return false;
}

TablePattern::TablePattern(std::string pattern)
    : glob_(pattern), qualified_(pattern.find('.') != std::string::npos) {}

std::size_t TablePattern::last_dot(std::string_view table) {
    const void* dot = table.empty() ? nullptr : memrchr(table.data(), '.', table.size());
    return dot ? std::size_t(static_cast<const char*>(dot) - table.data()) : std::string_view::npos;
}

bool TablePattern::matches(std::string_view table, std::size_t dot) const {
    if (!qualified_) return glob_.matches(dot == std::string_view::npos ? table : table.substr(dot + 1));
    if (dot != std::string_view::npos) return glob_.matches(table);
    // A qualified pattern and an unqualified name: match against "public.<name>".
    return glob_.matches_joined("public.", table);
}

bool table_matches(std::string_view pattern, std::string_view table) {
    return TablePattern(std::string(pattern)).matches(table);
}

}  // namespace pgwarden::policy
