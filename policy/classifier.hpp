// Statement classification with PostgreSQL's own parser (libpg_query): what kind each
// statement of a query string is, whether it can change data, which tables it touches.
// Text the parser rejects fails closed: one statement of kind `other` that is a write.
#pragma once
#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "policy/config.hpp"

namespace pgwarden::policy {

enum class StatementKind : std::uint8_t {
    kSelect, kInsert, kUpdate, kDelete, kMerge, kCopyIn, kCopyOut, kDdl, kTruncate,
    kBegin, kCommit, kRollback, kSavepoint, kRelease, kRollbackTo, kPrepareTransaction,
    kCommitPrepared, kSet, kShow, kCall, kDo, kExplain, kLock, kListen, kNotify,
    kMaintenance, kOther,
};
inline constexpr std::size_t kStatementKindCount = static_cast<std::size_t>(StatementKind::kOther) + 1;
// The spec's names: "select", "copy_in", "rollback_to", ...
const char* to_string(StatementKind kind);
std::optional<StatementKind> statement_kind_from_string(std::string_view name);
// Kinds that are writes by their nature (insert, update, delete, merge, copy_in, ddl,
// truncate, call, do); other statements can still be writes (see StatementInfo::is_write).
bool is_write_kind(StatementKind kind);

// What one statement of a query string is.
struct StatementInfo {
    StatementKind kind = StatementKind::kOther;
    bool is_write = true;        // can change data (fails closed)
    bool parse_error = false;    // the parser rejected the text
    // pgwarden cannot tell what runs (a portal or statement it could not track): every
    // statement-kind and table condition of a rule or throttle counts as met.
    bool unknown = false;
    bool row_locking = false;    // SELECT ... FOR UPDATE/SHARE/...
    std::uint32_t location = 0;  // byte offset of the statement in the query text
    std::uint32_t length = 0;    // byte length (to the end of the text for the last one)
    std::vector<std::string> tables;  // relations touched, "schema.name" or "name" as written
    // Kinds of the data-modifying statements run inside this one (a writable WITH,
    // EXPLAIN ANALYZE of a write, COPY (INSERT ... RETURNING) TO): one bit per StatementKind.
    std::uint32_t contained_writes = 0;

    // Transaction control details.
    bool chain = false;               // COMMIT/ROLLBACK AND CHAIN
    bool is_end_alias = false;        // END (commit) / ABORT (rollback) spelling
    bool is_start_transaction = false;  // START TRANSACTION rather than BEGIN
    std::string savepoint;            // SAVEPOINT / RELEASE / ROLLBACK TO name
    std::string gid;                  // PREPARE TRANSACTION / COMMIT|ROLLBACK PREPARED id

    // SET / RESET of a configuration parameter (kind kSet).
    std::string set_name;             // lower-cased; "" with RESET ALL
    std::optional<std::string> set_value;  // nullopt: RESET / SET ... TO DEFAULT
    bool set_local = false;
    bool reset_all = false;

    // SQL-level prepared statements.
    std::string prepare_name;         // PREPARE name AS ...: kind/is_write are the inner statement's
    std::string execute_name;         // EXECUTE name (also EXPLAIN ANALYZE EXECUTE name)
    std::string deallocate_name;      // DEALLOCATE name
    std::string fetch_portal;         // FETCH / MOVE: the cursor or portal they run
    bool deallocate_all = false;

    // sqlcommenter tags from comments in this statement's text: key -> value, decoded.
    std::vector<std::pair<std::string, std::string>> tags;

    std::string_view tag(std::string_view key) const;  // "" when absent
};

struct Classification {
    std::vector<StatementInfo> statements;  // in order; empty for an empty query
    std::string log_text;                   // the first 200 bytes of the text, for logs
    bool any_write() const;
};

// The shape of a query text: the text with every plain string and numeric constant
// replaced by a marker, everything else (keywords, identifiers, parameters, comments,
// spaces) kept byte for byte. Two texts with one shape differ only in the values of their
// constants. False when the text has something the shape cannot stand for safely
// (escape-string or bit-string constants, dollar quotes, NULs, unterminated quotes or
// comments) or no constant at all. `first`/`last` receive where the first constant begins
// and the last one ends.
bool statement_shape(std::string_view sql, std::string& shape, std::size_t& first, std::size_t& last);

// Classifies query strings. Keeps the results of recent texts in a bounded LRU cache, and
// a second one by shape (statement_shape) for single DML statements, whose classification
// does not depend on the values of their constants: `SELECT ... WHERE aid = 17` is
// classified once, not once per value. Not thread-safe: each proxy thread owns one.
class Classifier {
public:
    explicit Classifier(ClassifyConfig config);
    ~Classifier();

    std::shared_ptr<const Classification> classify(std::string_view sql);

    std::size_t cache_size() const { return exact_.size(); }
    std::uint64_t cache_hits() const { return hits_; }
    std::uint64_t cache_misses() const { return misses_; }  // shape hits included
    std::uint64_t shape_hits() const { return shape_hits_; }

private:
    Classification classify_uncached(std::string_view sql) const;

    // A classification stands for every text of one shape, with `tail` bytes (the ';' and
    // what follows it) after its one statement.
    struct Template {
        std::shared_ptr<const Classification> classification;
        std::uint32_t tail = 0;
    };
    // Bounded LRU from text to value.
    template <typename Value>
    class Lru {
    public:
        const Value* find(std::string_view key);
        void insert(std::string key, Value value, std::size_t limit);
        std::size_t size() const { return entries_.size(); }

    private:
        using Entry = std::pair<std::string, Value>;
        std::list<Entry> entries_;
        std::unordered_map<std::string_view, typename std::list<Entry>::iterator> index_;
    };

    ClassifyConfig config_;
    Lru<std::shared_ptr<const Classification>> exact_;
    Lru<Template> shapes_;
    std::string shape_;  // scratch for the current text's shape
    // Results of recent shape hits. One that nobody holds any more (use_count() == 1:
    // then no other owner exists that could hand out a copy) is filled in place by a later
    // shape hit instead of a new classification with its strings and vectors. Sessions
    // hold theirs until the answer is in (throttles settle after it), so a thread with
    // several sessions waiting on the server needs several; they are tried oldest first,
    // the one most likely to have been let go.
    // A spare remembers the classification it was last filled from: filled again from the
    // same one, only the length and the log text change (its strings and vectors are
    // already equal). Holding that classification keeps the comparison honest: no other
    // can take its address while a spare remembers it.
    static constexpr std::size_t kSpares = 16;
    struct Spare {
        std::shared_ptr<Classification> classification;
        std::shared_ptr<const Classification> filled_from;
    };
    std::array<Spare, kSpares> spares_;
    std::size_t next_spare_ = 0;
    std::uint64_t hits_ = 0, misses_ = 0, shape_hits_ = 0;
};

// sqlcommenter tags of a comment body ("client='tenant:42',route='%2Fhome'"):
// key='value' pairs separated by commas, values URL-decoded and \' unescaped.
// Malformed pairs are skipped.
std::vector<std::pair<std::string, std::string>> parse_comment_tags(std::string_view comment);

}  // namespace pgwarden::policy
