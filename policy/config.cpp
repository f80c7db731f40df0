// Loads pgwarden's TOML configuration into policy::Config. Every problem is collected with
// its line (not just the first), so `pgwarden --check` can list them all in one pass.
#include "policy/config.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <span>
#include <sstream>
#include <string_view>
#include <utility>
#include <toml++/toml.h>

namespace pgwarden::policy {
namespace {

using namespace std::string_view_literals;

// ---------------------------------------------------------------------------------------
// Plain-text values: durations, sizes, endpoints, addresses. No TOML here.

constexpr std::int64_t kMillisPerSecond = 1000;
constexpr std::uint64_t kKiB = 1024;

std::string_view trim(std::string_view text) {
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front())))
        text.remove_prefix(1);
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
        text.remove_suffix(1);
    return text;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

std::string lower(std::string_view text) {
    std::string out(text);
    for (char& c : out)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

// "1.5s" as 1 + 5/10 and the unit "s", kept in integers so that "0.1s" is exactly 100ms.
struct Decimal {
    std::uint64_t whole = 0;
    std::uint64_t fraction = 0;
    std::uint64_t fraction_scale = 1;
    std::string_view unit;
};

// More fraction digits than this cannot name a whole millisecond or byte in any unit we
// accept, and keeping the count small keeps fraction * unit inside 64 bits.
constexpr std::size_t kMaxFractionDigits = 6;

std::optional<Decimal> split_decimal(std::string_view text) {
    text = trim(text);
    Decimal number;
    std::size_t i = 0;
    while (i < text.size() && is_digit(text[i])) {
        if (__builtin_mul_overflow(number.whole, 10u, &number.whole) ||
            __builtin_add_overflow(number.whole, static_cast<unsigned>(text[i] - '0'),
                                   &number.whole))
            return std::nullopt;
        ++i;
    }
    if (i == 0) return std::nullopt;
    if (i < text.size() && text[i] == '.') {
        ++i;
        std::size_t start = i;
        while (i < text.size() && is_digit(text[i]))
            ++i;
        std::string_view digits = text.substr(start, i - start);
        if (digits.empty()) return std::nullopt;
        while (!digits.empty() && digits.back() == '0')
            digits.remove_suffix(1);
        if (digits.size() > kMaxFractionDigits) return std::nullopt;
        for (char c : digits) {
            number.fraction = number.fraction * 10 + static_cast<unsigned>(c - '0');
            number.fraction_scale *= 10;
        }
    }
    while (i < text.size() && text[i] == ' ')
        ++i;
    number.unit = text.substr(i);
    return number;
}

// number * unit, only when that is a whole count of the base unit and fits.
std::optional<std::uint64_t> scale_exactly(const Decimal& number, std::uint64_t unit) {
    std::uint64_t whole = 0;
    if (__builtin_mul_overflow(number.whole, unit, &whole)) return std::nullopt;
    std::uint64_t fraction = 0;
    if (__builtin_mul_overflow(number.fraction, unit, &fraction)) return std::nullopt;
    if (fraction % number.fraction_scale != 0) return std::nullopt;
    std::uint64_t total = 0;
    if (__builtin_add_overflow(whole, fraction / number.fraction_scale, &total))
        return std::nullopt;
    return total;
}

bool is_ipv4(const std::string& text) {
    in_addr address{};
    return inet_pton(AF_INET, text.c_str(), &address) == 1;
}

bool is_ipv6(const std::string& text) {
    in6_addr address{};
    return inet_pton(AF_INET6, text.c_str(), &address) == 1;
}

// A DNS name or an IPv4 literal; IPv6 literals come in brackets and are checked apart.
bool is_host_name(std::string_view host) {
    if (host.empty() || host.size() > 253) return false;
    if (std::all_of(host.begin(), host.end(), [](char c) { return is_digit(c) || c == '.'; }))
        return is_ipv4(std::string(host));
    std::string_view rest = host;
    if (rest.back() == '.') rest.remove_suffix(1);  // a fully qualified "db.example.com."
    while (true) {
        std::size_t dot = rest.find('.');
        std::string_view label = rest.substr(0, dot);
        if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-')
            return false;
        for (char c : label)
            if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
        if (dot == std::string_view::npos) return true;
        rest.remove_prefix(dot + 1);
    }
}

std::optional<std::uint16_t> parse_port(std::string_view text) {
    if (text.empty() || text.size() > 5) return std::nullopt;
    unsigned port = 0;
    for (char c : text) {
        if (!is_digit(c)) return std::nullopt;
        port = port * 10 + static_cast<unsigned>(c - '0');
    }
    if (port == 0 || port > 65535) return std::nullopt;
    return static_cast<std::uint16_t>(port);
}

// "10.0.0.0/8", "fd00::/8" or a single address. Host bits right of the mask are refused,
// as PostgreSQL's cidr type does: "10.1.2.3/8" is almost always a typo for "10.0.0.0/8".
std::optional<std::string> cidr_problem(const std::string& text) {
    std::size_t slash = text.find('/');
    std::string address = text.substr(0, slash);
    bool v4 = is_ipv4(address);
    if (!v4 && !is_ipv6(address))
        return "\"" + text +
               "\" is not an IP address or CIDR block (such as \"10.0.0.0/8\" or \"fd00::/8\")";
    if (slash == std::string::npos) return std::nullopt;
    std::string_view prefix_text = std::string_view(text).substr(slash + 1);
    unsigned max_prefix = v4 ? 32 : 128;
    unsigned prefix = 0;
    if (prefix_text.empty() || prefix_text.size() > 3 ||
        !std::all_of(prefix_text.begin(), prefix_text.end(), is_digit))
        return "\"" + text + "\" has a malformed prefix length";
    for (char c : prefix_text)
        prefix = prefix * 10 + static_cast<unsigned>(c - '0');
    if (prefix > max_prefix)
        return "\"" + text + "\" has a prefix length over " + std::to_string(max_prefix);
    std::array<unsigned char, 16> bytes{};
    inet_pton(v4 ? AF_INET : AF_INET6, address.c_str(), bytes.data());
    for (unsigned bit = prefix; bit < max_prefix; ++bit) {
        if (bytes[bit / 8] & (0x80u >> (bit % 8)))
            return "\"" + text + "\" has bits set right of the /" + std::to_string(prefix) +
                   " mask (the block starts at a lower address)";
    }
    return std::nullopt;
}

// Optimal string alignment distance: a transposition counts as one edit ("listne").
std::size_t edit_distance(std::string_view a, std::string_view b) {
    std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
    for (std::size_t i = 0; i <= a.size(); ++i)
        d[i][0] = i;
    for (std::size_t j = 0; j <= b.size(); ++j)
        d[0][j] = j;
    for (std::size_t i = 1; i <= a.size(); ++i) {
        for (std::size_t j = 1; j <= b.size(); ++j) {
            std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
                d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
        }
    }
    return d[a.size()][b.size()];
}

// The known name closest to a misspelt one, when it is close enough to be a typo.
std::optional<std::string> closest(std::string_view wrong, std::span<const std::string> known) {
    std::size_t allowed = wrong.size() >= 5 ? 2 : 1;
    std::optional<std::string> best;
    std::size_t best_distance = allowed + 1;
    for (const std::string& candidate : known) {
        std::size_t distance = edit_distance(lower(wrong), candidate);
        if (distance < best_distance) {
            best_distance = distance;
            best = candidate;
        }
    }
    return best;
}

std::string in_quotes(std::string_view text) {
    constexpr std::size_t kShown = 80;
    std::string out = "\"";
    for (char c : text.substr(0, kShown)) {
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
            out += '?';
        else
            out += c;
    }
    if (text.size() > kShown) out += "...";
    return out + "\"";
}

bool has_control_characters(std::string_view text) {
    return std::any_of(text.begin(), text.end(),
                       [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

std::string size_to_string(std::uint64_t bytes) {
    constexpr std::array<std::pair<std::uint64_t, const char*>, 3> units{
        {{kKiB * kKiB * kKiB, "GB"}, {kKiB * kKiB, "MB"}, {kKiB, "kB"}}};
    for (auto [unit, name] : units)
        if (bytes >= unit && bytes % unit == 0) return std::to_string(bytes / unit) + name;
    return std::to_string(bytes) + " bytes";
}

// The spec's statement kinds; kept here (not taken from the classifier) so the config can be
// checked without the parser. "write" stands for every statement classified as a write.
constexpr std::array<std::string_view, 27> kStatementKinds{"select",
                                                           "insert",
                                                           "update",
                                                           "delete",
                                                           "merge",
                                                           "copy_in",
                                                           "copy_out",
                                                           "ddl",
                                                           "truncate",
                                                           "begin",
                                                           "commit",
                                                           "rollback",
                                                           "savepoint",
                                                           "release",
                                                           "rollback_to",
                                                           "prepare_transaction",
                                                           "commit_prepared",
                                                           "set",
                                                           "show",
                                                           "call",
                                                           "do",
                                                           "explain",
                                                           "lock",
                                                           "listen",
                                                           "notify",
                                                           "maintenance",
                                                           "other"};
constexpr std::string_view kAnyWrite = "write";

// ---------------------------------------------------------------------------------------
// Reading TOML.

int line_of(const toml::node& node) { return static_cast<int>(node.source().begin.line); }

const char* type_name(toml::node_type type) {
    switch (type) {
        case toml::node_type::none: return "nothing";
        case toml::node_type::table: return "a table";
        case toml::node_type::array: return "an array";
        case toml::node_type::string: return "a string";
        case toml::node_type::integer: return "an integer";
        case toml::node_type::floating_point: return "a floating-point number";
        case toml::node_type::boolean: return "a boolean";
        case toml::node_type::date: return "a date";
        case toml::node_type::time: return "a time";
        case toml::node_type::date_time: return "a date-time";
    }
    return "a value";
}

class Problems {
public:
    explicit Problems(std::string file) : file_(std::move(file)) {}
    void add(int line, std::string message) {
        errors_.push_back({file_, line, std::move(message)});
    }
    bool empty() const { return errors_.empty(); }
    std::vector<ConfigError> take() {
        std::stable_sort(
            errors_.begin(), errors_.end(),
            [](const ConfigError& a, const ConfigError& b) { return a.line < b.line; });
        return std::move(errors_);
    }

private:
    std::string file_;
    std::vector<ConfigError> errors_;
};

template <typename E>
struct Choice {
    std::string_view name;
    E value;
};

constexpr std::array<Choice<ClientTlsMode>, 3> kClientTlsModes{
    {{"disable", ClientTlsMode::kDisable},
     {"allow", ClientTlsMode::kAllow},
     {"require", ClientTlsMode::kRequire}}};
constexpr std::array<Choice<UpstreamTlsMode>, 4> kUpstreamTlsModes{
    {{"disable", UpstreamTlsMode::kDisable},
     {"prefer", UpstreamTlsMode::kPrefer},
     {"require", UpstreamTlsMode::kRequire},
     {"verify-full", UpstreamTlsMode::kVerifyFull}}};
constexpr std::array<Choice<NestingMode>, 4> kNestingModes{
    {{"warn", NestingMode::kWarn},
     {"reject", NestingMode::kReject},
     {"flatten", NestingMode::kFlatten},
     {"savepoint", NestingMode::kSavepoint}}};
constexpr std::array<Choice<ThrottleCost>, 2> kThrottleCosts{
    {{"statement", ThrottleCost::kStatement}, {"row", ThrottleCost::kRow}}};
constexpr std::array<Choice<ThrottleBucket>, 4> kThrottleBuckets{
    {{"client", ThrottleBucket::kClient},
     {"user", ThrottleBucket::kUser},
     {"database", ThrottleBucket::kDatabase},
     {"rule", ThrottleBucket::kRule}}};
constexpr std::array<Choice<ThrottleAction>, 2> kThrottleActions{
    {{"delay", ThrottleAction::kDelay}, {"reject", ThrottleAction::kReject}}};
constexpr std::array<Choice<RuleAction>, 4> kRuleActions{{{"reject", RuleAction::kReject},
                                                          {"doom", RuleAction::kDoom},
                                                          {"notice", RuleAction::kNotice},
                                                          {"log", RuleAction::kLog}}};
constexpr std::array<Choice<std::string_view>, 2> kLogFormats{{{"text", "text"}, {"json", "json"}}};
constexpr std::array<Choice<std::string_view>, 4> kLogLevels{
    {{"debug", "debug"}, {"info", "info"}, {"warn", "warn"}, {"error", "error"}}};

template <typename E, std::size_t N>
const char* choice_name(const std::array<Choice<E>, N>& choices, E value) {
    for (const auto& choice : choices)
        if (choice.value == value) return choice.name.data();
    return "?";
}

// Checks one element of a list and may normalise it; returns what is wrong, if anything.
using ElementCheck = std::function<std::optional<std::string>(std::string& element)>;

// One TOML table being read: hands out values by key, reports wrong types and values, and
// at the end every key nobody asked for (usually a typo). Readers leave `out` untouched
// unless the value is good, so defaults survive a bad value.
class Section {
public:
    Section(Problems& problems, const toml::table& table, std::string where)
        : problems_(problems), table_(table), where_(std::move(where)) {}

    const std::string& where() const { return where_; }
    void rename(std::string where) { where_ = std::move(where); }
    int line() const { return line_of(table_); }
    int line_of_key(std::string_view key) const {
        const toml::node* node = table_.get(key);
        return node ? line_of(*node) : line();
    }
    bool has(std::string_view key) const { return table_.contains(key); }

    const toml::node* take(std::string_view key) {
        asked_.emplace_back(key);
        return table_.get(key);
    }

    void problem(const toml::node& node, std::string message) {
        problems_.add(line_of(node), std::move(message));
    }
    void problem_here(std::string message) { problems_.add(line(), std::move(message)); }
    std::string subject(std::string_view key) const {
        return "'" + std::string(key) + "' in " + where_;
    }

    void wrong_type(std::string_view key, const toml::node& node, std::string_view expected) {
        problem(node, subject(key) + " must be " + std::string(expected) + ", not " +
                          type_name(node.type()));
    }

    void reject_unknown_keys() {
        for (auto&& [key, node] : table_) {
            if (std::find(asked_.begin(), asked_.end(), key.str()) != asked_.end()) continue;
            std::string message = "unknown key '" + std::string(key.str()) + "' in " + where_;
            if (auto suggestion = closest(key.str(), asked_))
                message += " (did you mean '" + *suggestion + "'?)";
            problems_.add(static_cast<int>(key.source().begin.line), std::move(message));
        }
    }

    const toml::node* read_string(std::string_view key, std::string& out) {
        const toml::node* node = take(key);
        if (!node) return nullptr;
        const auto* value = node->as_string();
        if (!value) {
            wrong_type(key, *node, "a string");
            return nullptr;
        }
        out = value->get();
        return node;
    }

    void read_bool(std::string_view key, bool& out) {
        const toml::node* node = take(key);
        if (!node) return;
        if (const auto* value = node->as_boolean())
            out = value->get();
        else
            wrong_type(key, *node, "true or false");
    }

    template <typename T>
    void read_integer(std::string_view key, T& out, std::int64_t min, std::int64_t max) {
        const toml::node* node = take(key);
        if (!node) return;
        const auto* value = node->as_integer();
        if (!value) {
            wrong_type(key, *node, "an integer");
            return;
        }
        std::int64_t number = value->get();
        if (number < min)
            problem(*node, subject(key) + " must be at least " + std::to_string(min) + ", not " +
                               std::to_string(number));
        else if (number > max)
            problem(*node, subject(key) + " must be at most " + std::to_string(max) + ", not " +
                               std::to_string(number));
        else
            out = static_cast<T>(number);
    }

    // An integer or a float; `exclusive_min` says whether `min` itself is refused.
    const toml::node* read_number(std::string_view key, double& out, double min,
                                  bool exclusive_min) {
        const toml::node* node = take(key);
        if (!node) return nullptr;
        double number = 0;
        if (const auto* integer = node->as_integer())
            number = static_cast<double>(integer->get());
        else if (const auto* floating = node->as_floating_point())
            number = floating->get();
        else {
            wrong_type(key, *node, "a number");
            return nullptr;
        }
        std::ostringstream shown;
        shown << min;
        if (!std::isfinite(number)) {
            problem(*node, subject(key) + " must be a finite number");
            return nullptr;
        }
        if (exclusive_min ? number <= min : number < min) {
            problem(*node, subject(key) + " must be " +
                               (exclusive_min ? "more than " : "at least ") + shown.str());
            return nullptr;
        }
        out = number;
        return node;
    }

    // "250ms", "1.5s", "2m", "1h", "0", or a number of seconds.
    void read_duration(std::string_view key, Duration& out, bool must_be_positive) {
        const toml::node* node = take(key);
        if (!node) return;
        std::optional<Duration> duration;
        if (const auto* text = node->as_string()) {
            duration = parse_duration(text->get());
            if (!duration) {
                problem(*node,
                        subject(key) + ": " + in_quotes(text->get()) +
                            " is not a duration (such as \"250ms\", \"1.5s\", \"2m\", \"1h\")");
                return;
            }
        } else if (const auto* integer = node->as_integer()) {
            std::int64_t seconds = integer->get();
            if (seconds < 0 ||
                seconds > std::numeric_limits<std::int64_t>::max() / kMillisPerSecond) {
                problem(*node,
                        subject(key) + (seconds < 0 ? " must not be negative" : " is too long"));
                return;
            }
            duration = Duration(seconds * kMillisPerSecond);
        } else if (const auto* floating = node->as_floating_point()) {
            double millis = floating->get() * kMillisPerSecond;
            if (!std::isfinite(millis) || millis < 0 || millis > 1e15 ||
                millis != std::floor(millis)) {
                problem(*node,
                        subject(key) + " must be a whole number of milliseconds, not negative");
                return;
            }
            duration = Duration(static_cast<std::int64_t>(millis));
        } else {
            wrong_type(key, *node,
                       "a duration string (such as \"250ms\" or \"1.5s\") or a number of seconds");
            return;
        }
        if (must_be_positive && duration->count() == 0) {
            problem(*node, subject(key) + " must be more than 0");
            return;
        }
        out = *duration;
    }

    // "64kB", "1MB", "1GB", or a number of bytes.
    void read_size(std::string_view key, std::uint64_t& out, std::uint64_t min, std::uint64_t max) {
        const toml::node* node = take(key);
        if (!node) return;
        std::uint64_t bytes = 0;
        if (const auto* text = node->as_string()) {
            auto size = parse_size(text->get());
            if (!size) {
                problem(
                    *node,
                    subject(key) + ": " + in_quotes(text->get()) +
                        " is not a size (such as \"64kB\", \"1MB\", \"1GB\" or a number of bytes)");
                return;
            }
            bytes = *size;
        } else if (const auto* integer = node->as_integer()) {
            if (integer->get() < 0) {
                problem(*node, subject(key) + " must not be negative");
                return;
            }
            bytes = static_cast<std::uint64_t>(integer->get());
        } else {
            wrong_type(key, *node,
                       "a size string (such as \"64kB\" or \"1MB\") or a number of bytes");
            return;
        }
        if (bytes < min)
            problem(*node, subject(key) + " must be at least " + size_to_string(min) + ", not " +
                               size_to_string(bytes));
        else if (bytes > max)
            problem(*node, subject(key) + " must be at most " + size_to_string(max) + ", not " +
                               size_to_string(bytes));
        else
            out = bytes;
    }

    void read_endpoint(std::string_view key, Endpoint& out) {
        std::string text;
        const toml::node* node = read_string(key, text);
        if (!node) return;
        if (auto endpoint = parse_endpoint(text))
            out = *endpoint;
        else
            problem(*node,
                    subject(key) + ": " + in_quotes(text) +
                        " is not \"host:port\" or \"[ipv6]:port\" with a port from 1 to 65535");
    }

    template <typename E, std::size_t N>
    const toml::node* read_choice(std::string_view key, E& out,
                                  const std::array<Choice<E>, N>& choices) {
        std::string text;
        const toml::node* node = read_string(key, text);
        if (!node) return nullptr;
        for (const auto& choice : choices) {
            if (choice.name == text) {
                out = choice.value;
                return node;
            }
        }
        std::string names;
        for (const auto& choice : choices)
            names += (names.empty() ? "\"" : ", \"") + std::string(choice.name) + "\"";
        problem(*node, subject(key) + " must be one of " + names + "; not " + in_quotes(text));
        return nullptr;
    }

    // A string or an array of strings. `empty_problem`, when given, refuses an empty list.
    void read_list(std::string_view key, std::vector<std::string>& out,
                   std::string_view empty_problem, const ElementCheck& check) {
        const toml::node* node = take(key);
        if (!node) return;
        std::vector<std::pair<std::string, const toml::node*>> elements;
        bool all_good = true;
        if (const auto* text = node->as_string()) {
            elements.emplace_back(text->get(), node);
        } else if (const auto* array = node->as_array()) {
            for (const toml::node& element : *array) {
                if (const auto* text = element.as_string()) {
                    elements.emplace_back(text->get(), &element);
                } else {
                    problem(element, subject(key) + ": every element must be a string, not " +
                                         type_name(element.type()));
                    all_good = false;
                }
            }
        } else {
            wrong_type(key, *node, "a string or an array of strings");
            return;
        }
        if (all_good && elements.empty() && !empty_problem.empty()) {
            problem(*node, subject(key) + " is an empty list; " + std::string(empty_problem));
            return;
        }
        std::vector<std::string> values;
        for (auto& [value, element] : elements) {
            if (value.empty()) {
                problem(*element, subject(key) + " has an empty string");
                all_good = false;
                continue;
            }
            if (check) {
                if (auto wrong = check(value)) {
                    problem(*element, subject(key) + ": " + *wrong);
                    all_good = false;
                    continue;
                }
            }
            values.push_back(std::move(value));
        }
        if (all_good) out = std::move(values);
    }

private:
    Problems& problems_;
    const toml::table& table_;
    std::string where_;
    std::vector<std::string> asked_;
};

std::optional<std::string> check_pattern(std::string& pattern) {
    if (has_control_characters(pattern)) return in_quotes(pattern) + " has control characters";
    return std::nullopt;
}

std::optional<std::string> check_address(std::string& address) { return cidr_problem(address); }

std::optional<std::string> check_statement_kind(std::string& kind) {
    if (kind == kAnyWrite) return std::nullopt;
    if (std::find(kStatementKinds.begin(), kStatementKinds.end(), kind) != kStatementKinds.end())
        return std::nullopt;
    std::vector<std::string> known(kStatementKinds.begin(), kStatementKinds.end());
    known.emplace_back(kAnyWrite);
    std::string message = "unknown statement kind " + in_quotes(kind);
    if (auto suggestion = closest(kind, known))
        return message + " (did you mean \"" + *suggestion + "\"?)";
    message += "; kinds are";
    for (std::string_view name : kStatementKinds)
        message += " " + std::string(name);
    return message + ", and \"write\" for every write";
}

bool is_identifier_text(std::string_view text, std::string_view extra) {
    return !text.empty() && std::all_of(text.begin(), text.end(), [extra](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' ||
               extra.find(c) != std::string_view::npos;
    });
}

std::optional<std::string> check_identity_source(std::string& source) {
    if (source == "application_name" || source == "user" || source == "database" ||
        source == "address")
        return std::nullopt;
    if (source.starts_with("comment:")) {
        if (is_identifier_text(std::string_view(source).substr(8), ".-")) return std::nullopt;
        return in_quotes(source) + " needs a tag name after \"comment:\" (letters, digits, _ . -)";
    }
    if (source.starts_with("setting:")) {
        // PostgreSQL compares setting names case-insensitively; store them as SET reports them.
        std::string name = lower(std::string_view(source).substr(8));
        if (!is_identifier_text(name, "."))
            return in_quotes(source) + " needs a setting name after \"setting:\"";
        source = "setting:" + name;
        return std::nullopt;
    }
    return "unknown identity source " + in_quotes(source) +
           "; sources are \"comment:KEY\", \"setting:NAME\", \"application_name\", \"user\", "
           "\"database\", \"address\"";
}

std::optional<std::string> check_function_name(std::string& name) {
    if (has_control_characters(name) || name.find_first_of(" ()") != std::string::npos)
        return in_quotes(name) + " is not a function name";
    return std::nullopt;
}

bool is_valid_sqlstate(std::string_view code) {
    return code.size() == 5 && std::all_of(code.begin(), code.end(), [](char c) {
               return is_digit(c) || (c >= 'A' && c <= 'Z');
           });
}

// Reads the whole document into a Config, reporting into `problems`.
class ConfigReader {
public:
    ConfigReader(Problems& problems, std::filesystem::path base_dir)
        : problems_(problems), base_dir_(std::move(base_dir)) {}

    Config read(const toml::table& root) {
        for (auto&& [key, node] : root)
            read_top_level(key, node);
        check_across_sections();
        return std::move(config_);
    }

private:
    using TableReader = void (ConfigReader::*)(Section&);
    struct TableEntry {
        std::string_view name;
        TableReader read;
    };
    static const std::array<TableEntry, 9>& tables() {
        static constexpr std::array<TableEntry, 9> kTables{{
            {"proxy", &ConfigReader::read_proxy},
            {"admin", &ConfigReader::read_admin},
            {"log", &ConfigReader::read_log},
            {"tls", &ConfigReader::read_tls},
            {"upstream_tls", &ConfigReader::read_upstream_tls},
            {"identity", &ConfigReader::read_identity},
            {"classify", &ConfigReader::read_classify},
            {"transactions", &ConfigReader::read_transactions},
            {"metrics", &ConfigReader::read_metrics},
        }};
        return kTables;
    }

    void read_top_level(const toml::key& key, const toml::node& node) {
        std::string_view name = key.str();
        int line = static_cast<int>(key.source().begin.line);
        for (const TableEntry& entry : tables()) {
            if (entry.name != name) continue;
            const toml::table* table = node.as_table();
            if (!table) {
                problems_.add(line, "[" + std::string(name) + "] must be a table, not " +
                                        type_name(node.type()));
                return;
            }
            Section section(problems_, *table, "[" + std::string(name) + "]");
            (this->*entry.read)(section);
            section.reject_unknown_keys();
            return;
        }
        if (name == "throttle" || name == "rule") {
            const toml::array* array = node.as_array();
            bool tables_only =
                array && std::all_of(array->begin(), array->end(),
                                     [](const toml::node& n) { return n.is_table(); });
            if (!tables_only) {
                problems_.add(line, "'" + std::string(name) +
                                        "' must be an array of tables, written [[" +
                                        std::string(name) + "]], not " + type_name(node.type()));
                return;
            }
            for (const toml::node& element : *array) {
                if (name == "throttle")
                    read_throttle(*element.as_table(), config_.throttles.size() + 1);
                else
                    read_rule(*element.as_table(), config_.rules.size() + 1);
            }
            return;
        }
        std::vector<std::string> known{"throttle", "rule"};
        for (const TableEntry& entry : tables())
            known.emplace_back(entry.name);
        auto suggestion = closest(name, known);
        std::string message;
        if (node.is_table()) {
            message = "unknown table [" + std::string(name) + "]";
            if (suggestion) message += " (did you mean [" + *suggestion + "]?)";
        } else if (node.is_array() && node.as_array()->is_array_of_tables()) {
            message = "unknown table [[" + std::string(name) + "]]";
            if (suggestion) message += " (did you mean [[" + *suggestion + "]]?)";
        } else {
            message = "unknown key '" + std::string(name) + "' at the top level";
            if (suggestion)
                message += " (did you mean [" + *suggestion + "]?)";
            else
                message += "; settings belong in a table such as [proxy]";
        }
        problems_.add(line, std::move(message));
    }

    void read_proxy(Section& s) {
        ProxyConfig& proxy = config_.proxy;
        s.read_endpoint("listen", proxy.listen);
        proxy_listen_line_ = s.line_of_key("listen");
        s.read_endpoint("upstream", proxy.upstream);
        s.read_integer("threads", proxy.threads, 0, 1024);
        s.read_bool("io_uring", proxy.io_uring);
        s.read_integer("max_client_connections", proxy.max_client_connections, 1, 1'000'000);
        s.read_integer("max_unauthenticated", proxy.max_unauthenticated, 1, 1'000'000);
        s.read_duration("auth_timeout", proxy.auth_timeout, true);
        s.read_duration("connect_timeout", proxy.connect_timeout, true);
        s.read_duration("shutdown_timeout", proxy.shutdown_timeout, false);
        // PostgreSQL itself refuses client messages of 1GB and over (PQ_LARGE_MESSAGE_LIMIT).
        constexpr std::uint64_t kGiB = kKiB * kKiB * kKiB;
        s.read_size("max_message_bytes", proxy.max_message_bytes, kKiB, kGiB);
        s.read_size("max_statement_bytes", proxy.max_statement_bytes, 1, kGiB);
    }

    void read_admin(Section& s) {
        AdminConfig& admin = config_.admin;
        s.read_endpoint("listen", admin.listen);
        admin_listen_line_ = s.line_of_key("listen");
        s.read_bool("enabled", admin.enabled);
        // It travels in an HTTP header, so it must be printable ASCII without spaces.
        if (const toml::node* node = s.read_string("token", admin.token)) {
            if (!std::all_of(admin.token.begin(), admin.token.end(),
                             [](char c) { return c > 0x20 && c < 0x7f; })) {
                s.problem(*node, s.subject("token") + " must be printable ASCII without spaces");
                admin.token.clear();
            }
        }
    }

    void read_log(Section& s) {
        std::string_view format = config_.log.format, level = config_.log.level;
        if (s.read_choice("format", format, kLogFormats)) config_.log.format = std::string(format);
        if (s.read_choice("level", level, kLogLevels)) config_.log.level = std::string(level);
    }

    void read_tls(Section& s) {
        ClientTlsConfig& tls = config_.tls;
        s.read_choice("mode", tls.mode, kClientTlsModes);
        const toml::node* cert = s.read_string("cert", tls.cert_file);
        const toml::node* key = s.read_string("key", tls.key_file);
        if (tls.mode == ClientTlsMode::kDisable) return;
        std::string mode = "[tls] mode = \"" + std::string(to_string(tls.mode)) + "\"";
        if (tls.cert_file.empty())
            problems_.add(s.line_of_key("mode"), mode + " needs 'cert' (a PEM certificate file)");
        else if (cert)
            check_file(s, "cert", *cert, tls.cert_file);
        if (tls.key_file.empty())
            problems_.add(s.line_of_key("mode"), mode + " needs 'key' (a PEM private key file)");
        else if (key)
            check_file(s, "key", *key, tls.key_file);
    }

    void read_upstream_tls(Section& s) {
        UpstreamTlsConfig& tls = config_.upstream_tls;
        s.read_choice("mode", tls.mode, kUpstreamTlsModes);
        const toml::node* ca = s.read_string("ca", tls.ca_file);
        if (const toml::node* node = s.read_string("server_name", tls.server_name)) {
            if (!is_host_name(tls.server_name)) {
                s.problem(*node, s.subject("server_name") + ": " + in_quotes(tls.server_name) +
                                     " is not a host name");
                tls.server_name.clear();
            }
        }
        if (ca && tls.mode == UpstreamTlsMode::kVerifyFull && !tls.ca_file.empty())
            check_file(s, "ca", *ca, tls.ca_file);
    }

    void read_identity(Section& s) {
        s.read_list("sources", config_.identity.sources,
                    "name at least one source (such as \"user\")", check_identity_source);
    }

    void read_classify(Section& s) {
        s.read_list("write_functions", config_.classify.write_functions, "", check_function_name);
        s.read_integer("cache_entries", config_.classify.cache_entries, 0, 10'000'000);
    }

    void read_transactions(Section& s) {
        s.read_choice("nesting", config_.transactions.nesting, kNestingModes);
        s.read_duration("idle_timeout", config_.transactions.idle_timeout, false);
    }

    void read_metrics(Section& s) {
        s.read_integer("max_clients", config_.metrics.max_clients, 0, 1'000'000);
    }

    void read_throttle(const toml::table& table, std::size_t number) {
        Section s(problems_, table, "[[throttle]] #" + std::to_string(number));
        ThrottleRule throttle;
        throttle.line = s.line();
        read_name(s, throttle.name, throttle_names_);
        throttle.match = read_match(s, false);
        s.read_list("statements", throttle.statements,
                    "leave 'statements' out to throttle every write",
                    [](std::string& kind) -> std::optional<std::string> {
                        if (kind == "commit" || kind == "rollback")
                            return "COMMIT and ROLLBACK are never throttled";
                        return check_statement_kind(kind);
                    });
        if (!s.has("rate"))
            s.problem_here(s.where() + " needs 'rate' (tokens per second, more than 0)");
        bool rate_ok = s.read_number("rate", throttle.rate, 0, true) != nullptr;
        // A bucket must hold at least one token, or a rate below 1/s could never admit anything.
        throttle.burst = std::max(throttle.rate, 1.0);
        s.read_number("burst", throttle.burst, 1, false);
        s.read_choice("cost", throttle.cost, kThrottleCosts);
        s.read_choice("bucket", throttle.bucket, kThrottleBuckets);
        s.read_choice("action", throttle.action, kThrottleActions);
        s.read_duration("max_delay", throttle.max_delay, false);
        s.read_duration("penalty", throttle.penalty, false);
        s.reject_unknown_keys();
        if (rate_ok) config_.throttles.push_back(std::move(throttle));
    }

    void read_rule(const toml::table& table, std::size_t number) {
        Section s(problems_, table, "[[rule]] #" + std::to_string(number));
        Rule rule;
        rule.line = s.line();
        read_name(s, rule.name, rule_names_);
        rule.match = read_match(s, true);
        for (std::string_view misplaced : {"statements"sv, "tables"sv}) {
            if (const toml::node* node = s.take(misplaced))
                s.problem(*node, s.subject(misplaced) + " belongs inside match: match = { " +
                                     std::string(misplaced) + " = [...] }");
        }
        if (!s.has("action"))
            s.problem_here(s.where() +
                           " needs 'action' (\"reject\", \"doom\", \"notice\" or \"log\")");
        s.read_choice("action", rule.action, kRuleActions);
        if (const toml::node* node = s.read_string("sqlstate", rule.sqlstate)) {
            if (!is_valid_sqlstate(rule.sqlstate)) {
                s.problem(*node, s.subject("sqlstate") + ": " + in_quotes(rule.sqlstate) +
                                     " is not a SQLSTATE (5 characters of 0-9 and A-Z)");
            } else if (rule.action == RuleAction::kReject &&
                       (rule.sqlstate.starts_with("00") || rule.sqlstate.starts_with("01") ||
                        rule.sqlstate.starts_with("02"))) {
                s.problem(
                    *node,
                    s.subject("sqlstate") + ": " + in_quotes(rule.sqlstate) +
                        " is a success, warning or no-data code; a rejection needs an error class");
            }
        }
        if (const toml::node* node = s.read_string("message", rule.message)) {
            if (rule.message.empty()) s.problem(*node, s.subject("message") + " must not be empty");
        } else {
            rule.message = "pgwarden: rule " + rule.name;
        }
        NestingMode nesting{};
        if (s.read_choice("nesting", nesting, kNestingModes)) rule.nesting = nesting;
        s.reject_unknown_keys();
        config_.rules.push_back(std::move(rule));
    }

    // Names key metrics, logs and bucket state across reloads, so they must be unique.
    void read_name(Section& s, std::string& name, std::map<std::string, int>& seen) {
        std::string kind = s.where().substr(0, s.where().find(' '));
        if (!s.has("name")) {
            s.problem_here(s.where() + " needs 'name' (unique among " + kind + " entries)");
            return;
        }
        const toml::node* node = s.read_string("name", name);
        if (!node) return;
        if (name.empty() || has_control_characters(name)) {
            s.problem(*node,
                      s.subject("name") + " must be a non-empty name without control characters");
            return;
        }
        s.rename(kind + " '" + name + "'");
        auto [first, inserted] = seen.emplace(name, line_of(*node));
        if (!inserted)
            s.problem(*node, "duplicate " + kind + " name '" + name + "' (first used on line " +
                                 std::to_string(first->second) + ")");
    }

    Match read_match(Section& owner, bool for_rule) {
        Match match;
        const toml::node* node = owner.take("match");
        if (!node) return match;
        const toml::table* table = node->as_table();
        if (!table) {
            owner.wrong_type("match", *node, "a table such as { user = \"app\" }");
            return match;
        }
        Section s(problems_, *table, "the match of " + owner.where());
        constexpr std::string_view kEverything = "leave the key out to match everything";
        s.read_list("user", match.user, kEverything, check_pattern);
        s.read_list("database", match.database, kEverything, check_pattern);
        s.read_list("application_name", match.application_name, kEverything, check_pattern);
        s.read_list("client", match.client, kEverything, check_pattern);
        s.read_list("address", match.address, kEverything, check_address);
        if (for_rule) {
            s.read_list("statements", match.statements, kEverything, check_statement_kind);
            s.read_list("tables", match.tables, kEverything, check_pattern);
        } else {
            if (const toml::node* misplaced = s.take("statements"))
                s.problem(*misplaced, "'statements' of " + owner.where() +
                                          " belongs beside match, not inside it");
            if (const toml::node* misplaced = s.take("tables"))
                s.problem(*misplaced,
                          s.where() + " cannot name tables: throttles count writes per bucket");
        }
        s.reject_unknown_keys();
        return match;
    }

    // Relative paths are taken from the config file's directory, so the same file works
    // wherever pgwarden is started from.
    void check_file(Section& s, std::string_view key, const toml::node& node, std::string& path) {
        std::filesystem::path file(path);
        if (file.is_relative() && !base_dir_.empty()) file = base_dir_ / file;
        path = file.string();
        std::error_code error;
        auto status = std::filesystem::status(file, error);
        if (!std::filesystem::exists(status)) {
            s.problem(node, s.subject(key) + ": no such file " + in_quotes(path));
        } else if (std::filesystem::is_directory(status)) {
            s.problem(node, s.subject(key) + ": " + in_quotes(path) + " is a directory");
        } else if (!std::ifstream(file).is_open()) {
            s.problem(node, s.subject(key) + ": cannot read " + in_quotes(path));
        }
    }

    void check_across_sections() {
        const Endpoint& proxy = config_.proxy.listen;
        const Endpoint& admin = config_.admin.listen;
        if (config_.admin.enabled && proxy.port == admin.port && proxy.host == admin.host)
            problems_.add(std::max(proxy_listen_line_, admin_listen_line_),
                          "[admin] listen and [proxy] listen are both " + proxy.to_string());
    }

    Problems& problems_;
    std::filesystem::path base_dir_;
    Config config_;
    std::map<std::string, int> throttle_names_;
    std::map<std::string, int> rule_names_;
    int proxy_listen_line_ = 0;
    int admin_listen_line_ = 0;
};

LoadResult load(const std::string& text, const std::string& file,
                const std::filesystem::path& base_dir) {
    Problems problems(file);
    toml::table root;
    try {
        root = toml::parse(std::string_view(text), std::string_view(file));
    } catch (const toml::parse_error& error) {
        problems.add(static_cast<int>(error.source().begin.line),
                     "TOML syntax error: " + std::string(error.description()));
        return {std::nullopt, problems.take()};
    }
    Config config = ConfigReader(problems, base_dir).read(root);
    config.source = file;
    if (!problems.empty()) return {std::nullopt, problems.take()};
    return {std::move(config), {}};
}

}  // namespace

std::string Endpoint::to_string() const {
    if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
    return host + ":" + std::to_string(port);
}

std::optional<Endpoint> parse_endpoint(const std::string& text) {
    std::string_view rest = text;
    Endpoint endpoint;
    if (rest.starts_with('[')) {
        std::size_t close = rest.find(']');
        if (close == std::string_view::npos) return std::nullopt;
        endpoint.host = std::string(rest.substr(1, close - 1));
        if (!is_ipv6(endpoint.host)) return std::nullopt;
        rest.remove_prefix(close + 1);
        if (!rest.starts_with(':')) return std::nullopt;
        rest.remove_prefix(1);
    } else {
        std::size_t colon = rest.find(':');
        // A second colon means an IPv6 address without brackets: its port would be ambiguous.
        if (colon == std::string_view::npos || rest.find(':', colon + 1) != std::string_view::npos)
            return std::nullopt;
        endpoint.host = std::string(rest.substr(0, colon));
        if (!is_host_name(endpoint.host)) return std::nullopt;
        rest.remove_prefix(colon + 1);
    }
    auto port = parse_port(rest);
    if (!port) return std::nullopt;
    endpoint.port = *port;
    return endpoint;
}

std::optional<Duration> parse_duration(const std::string& text) {
    auto number = split_decimal(text);
    if (!number) return std::nullopt;
    // PostgreSQL's time units; a bare number is seconds, like an integer in the TOML file.
    constexpr std::array<std::pair<std::string_view, std::uint64_t>, 7> kUnits{{{"", 1000},
                                                                                {"ms", 1},
                                                                                {"s", 1000},
                                                                                {"m", 60'000},
                                                                                {"min", 60'000},
                                                                                {"h", 3'600'000},
                                                                                {"d", 86'400'000}}};
    for (auto [unit, millis] : kUnits) {
        if (unit != number->unit) continue;
        auto total = scale_exactly(*number, millis);
        if (!total ||
            *total > static_cast<std::uint64_t>(std::numeric_limits<Duration::rep>::max()))
            return std::nullopt;
        return Duration(static_cast<Duration::rep>(*total));
    }
    return std::nullopt;
}

std::optional<std::uint64_t> parse_size(const std::string& text) {
    auto number = split_decimal(text);
    if (!number) return std::nullopt;
    // PostgreSQL's memory units (1024-based); the case is forgiven, "KB" is no ambiguity here.
    constexpr std::array<std::pair<std::string_view, std::uint64_t>, 6> kUnits{
        {{"", 1},
         {"b", 1},
         {"kb", kKiB},
         {"mb", kKiB * kKiB},
         {"gb", kKiB * kKiB * kKiB},
         {"tb", kKiB * kKiB * kKiB * kKiB}}};
    std::string unit = lower(number->unit);
    for (auto [name, bytes] : kUnits)
        if (name == unit) return scale_exactly(*number, bytes);
    return std::nullopt;
}

std::string ConfigError::to_string() const {
    std::string where = file.empty() ? "<config>" : file;
    if (line > 0) where += ":" + std::to_string(line);
    return where + ": " + message;
}

LoadResult load_config_text(const std::string& text, const std::string& file) {
    return load(text, file, {});
}

LoadResult load_config_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::error_code error;
    if (!in.is_open() || std::filesystem::is_directory(path, error)) {
        return {std::nullopt, {ConfigError{path, 0, "cannot read the config file"}}};
    }
    std::ostringstream text;
    text << in.rdbuf();
    if (in.bad()) return {std::nullopt, {ConfigError{path, 0, "cannot read the config file"}}};
    return load(text.str(), path, std::filesystem::path(path).parent_path());
}

const char* to_string(NestingMode m) { return choice_name(kNestingModes, m); }
const char* to_string(RuleAction a) { return choice_name(kRuleActions, a); }
const char* to_string(ClientTlsMode m) { return choice_name(kClientTlsModes, m); }
const char* to_string(UpstreamTlsMode m) { return choice_name(kUpstreamTlsModes, m); }
const char* to_string(ThrottleCost c) { return choice_name(kThrottleCosts, c); }
const char* to_string(ThrottleBucket b) { return choice_name(kThrottleBuckets, b); }
const char* to_string(ThrottleAction a) { return choice_name(kThrottleActions, a); }

}  // namespace pgwarden::policy
