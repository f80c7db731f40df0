// libFuzzer target: the input is a query string as a client sends it in a Query or Parse
// message. It is classified with libpg_query as the proxy does; the result must describe
// the text consistently, fail closed where it cannot, and not depend on the cache.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "policy/classifier.hpp"
#include "tests/fuzz/fuzz_check.hpp"

namespace {

using namespace pgwarden::policy;
using pgwarden::wire::fuzz::require;

// The proxy accepts statements up to [proxy] max_statement_bytes (1 MiB by default), but
// PostgreSQL's parser takes time that grows faster than the text with some nestings; past
// this size one input can outlast the smoke run's -timeout without showing anything new.
constexpr std::size_t kMaxInputBytes = 16 * 1024;

bool same_statement(const StatementInfo& a, const StatementInfo& b) {
    return a.kind == b.kind && a.is_write == b.is_write && a.parse_error == b.parse_error &&
           a.unknown == b.unknown && a.row_locking == b.row_locking &&
           a.location == b.location && a.length == b.length && a.tables == b.tables &&
           a.contained_writes == b.contained_writes && a.chain == b.chain &&
           a.is_end_alias == b.is_end_alias && a.is_start_transaction == b.is_start_transaction &&
           a.savepoint == b.savepoint && a.gid == b.gid && a.set_name == b.set_name &&
           a.set_value == b.set_value && a.set_local == b.set_local &&
           a.reset_all == b.reset_all && a.prepare_name == b.prepare_name &&
           a.execute_name == b.execute_name && a.deallocate_name == b.deallocate_name &&
           a.deallocate_all == b.deallocate_all && a.tags == b.tags;
}

bool same_classification(const Classification& a, const Classification& b) {
    if (a.log_text != b.log_text || a.statements.size() != b.statements.size()) return false;
    for (std::size_t i = 0; i < a.statements.size(); ++i) {
        if (!same_statement(a.statements[i], b.statements[i])) return false;
    }
    return true;
}

bool is_transaction_end(StatementKind kind) {
    return kind == StatementKind::kCommit || kind == StatementKind::kRollback;
}

void check_statement(const StatementInfo& info, std::string_view sql) {
    require(info.location <= sql.size() && info.length <= sql.size() - info.location);
    require(!info.unknown);  // only the session marks statements it cannot see
    // Fail closed: what is a write by its kind is never reported as a read.
    if (is_write_kind(info.kind)) require(info.is_write);
    // A statement that runs an INSERT/UPDATE/DELETE/MERGE somewhere inside is a write.
    if (info.contained_writes != 0) require(info.is_write);
    require((info.contained_writes >> kStatementKindCount) == 0);
    for (std::size_t kind = 0; kind < kStatementKindCount; ++kind) {
        if ((info.contained_writes >> kind) & 1u) {
            require(is_write_kind(static_cast<StatementKind>(kind)));
        }
    }
    for (const std::string& table : info.tables) require(!table.empty());
    // Transaction-control and SET details only ever come with their statement kinds.
    if (info.chain || info.is_end_alias) require(is_transaction_end(info.kind));
    if (info.is_start_transaction) require(info.kind == StatementKind::kBegin);
    if (info.set_value || info.set_local || info.reset_all) require(info.kind == StatementKind::kSet);
    if (info.set_value) require(!info.set_name.empty());
    if (info.deallocate_all) require(info.deallocate_name.empty());
    for (const auto& tag : info.tags) require(!tag.first.empty());
    // The kind's name maps back to the kind (configs name kinds by these strings).
    require(statement_kind_from_string(to_string(info.kind)) == info.kind);
}

void check_classification(const Classification& result, std::string_view sql) {
    require(result.log_text == sql.substr(0, 200));
    const auto& statements = result.statements;
    if (!statements.empty() && statements.front().parse_error) {
        // Unparsable text fails closed as one write covering all of it.
        require(statements.size() == 1);
        const StatementInfo& info = statements.front();
        require(info.kind == StatementKind::kOther && info.is_write);
        require(info.location == 0 && info.length == sql.size());
        require(result.any_write());
    }
    bool any_write = false;
    for (std::size_t i = 0; i < statements.size(); ++i) {
        const StatementInfo& info = statements[i];
        check_statement(info, sql);
        if (i > 0) {
            require(!info.parse_error);
            // Statements come in text order and do not overlap.
            const StatementInfo& previous = statements[i - 1];
            require(previous.location + previous.length <= info.location);
        }
        any_write = any_write || info.is_write;
    }
    require(result.any_write() == any_write);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size > kMaxInputBytes) return 0;
    const std::string_view sql(reinterpret_cast<const char*>(data), size);

    // One classifier with a cache, as each proxy thread has, kept across inputs so that
    // eviction and hits on earlier texts are exercised too; a small cache evicts often.
    static Classifier cached([] {
        ClassifyConfig config;
        config.cache_entries = 8;
        return config;
    }());
    ClassifyConfig uncached_config;
    uncached_config.cache_entries = 0;
    Classifier uncached(uncached_config);

    const std::uint64_t shared_before = cached.shape_hits();
    const auto first = cached.classify(sql);
    const bool by_shape = cached.shape_hits() != shared_before;
    require(first != nullptr);
    check_classification(*first, sql);

    // Asking again hits the cache and hands out the same result (a text served by its
    // shape is not kept under its own text: it is served by its shape again).
    const std::uint64_t hits = cached.cache_hits();
    const auto again = cached.classify(sql);
    if (by_shape)
        require(same_classification(*again, *first));
    else
        require(again == first && cached.cache_hits() == hits + 1);
    require(cached.cache_size() <= 8);

    // Classification is a function of the text alone: without the cache it is the same.
    const auto fresh = uncached.classify(sql);
    require(fresh != first && uncached.cache_size() == 0);
    require(same_classification(*fresh, *first));

    // Only the bytes of the view are classified: the proxy hands in views into its read
    // buffer, where the next message follows without a terminating NUL.
    std::string padded(sql);
    padded += "; DROP TABLE pad";
    const auto bounded = uncached.classify(std::string_view(padded).substr(0, sql.size()));
    require(same_classification(*bounded, *first));

    // The same text with other digits is often the same shape: whatever the shape cache
    // serves for it must be what parsing it says.
    std::string variant(sql);
    for (char& c : variant)
        if (c >= '0' && c <= '9') c = c == '9' ? '1' : static_cast<char>(c + 1);
    if (variant != sql) {
        const auto served = cached.classify(variant);
        const auto parsed = uncached.classify(variant);
        require(same_classification(*served, *parsed));
    }
    return 0;
}
