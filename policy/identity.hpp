// Who a client is: its startup parameters, address, and the custom settings it has made
// (startup options, SET, SET LOCAL, RESET), tracked with PostgreSQL's transactional
// rules so that a rolled-back SET no longer names the client.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"

namespace pgwarden::policy {

class ClientIdentity {
public:
    ClientIdentity() = default;
    // From the startup packet: user, database, application_name, options ("-c a=b",
    // "--a=b") and any other parameter (PostgreSQL treats those as settings too).
    ClientIdentity(const std::vector<std::pair<std::string, std::string>>& startup, std::string address);

    const std::string& user() const { return user_; }
    const std::string& database() const { return database_; }
    const std::string& application_name() const { return application_name_; }
    const std::string& address() const { return address_; }
    void set_application_name(std::string value) {
        application_name_ = std::move(value);
        match_version_ = next_match_version();
        version_ = match_version_;
    }
    // Changes whenever user, database, application_name or address may have changed, and
    // is never reused (copies share it until one of them changes): a rule-match result
    // cached with it stays right while it is the same.
    std::uint64_t match_version() const { return match_version_; }
    // Like match_version(), for everything resolve() reads: settings too. A name
    // resolved for a statement without tags stays right while it is the same.
    std::uint64_t version() const { return version_; }

    // The effective value of a setting ("" when unset), as the server would see it now.
    std::string_view setting(std::string_view name) const;

    // Statement effects, applied when the statement is sent (pgwarden's prediction).
    void apply_set(const StatementInfo& set, bool in_transaction_block);
    // Transaction boundaries.
    void begin_transaction();
    void commit_transaction();
    void rollback_transaction();
    void savepoint(const std::string& name);
    void release_savepoint(const std::string& name);
    void rollback_to_savepoint(const std::string& name);

    // The client name per `sources` (first with a value), for one statement's tags.
    std::string resolve(const IdentityConfig& config, const StatementInfo* statement) const;

private:
    using Settings = std::map<std::string, std::string, std::less<>>;
    struct Savepoint {
        std::string name;
        Settings session;
        Settings local;
    };
    static std::uint64_t next_match_version() {
        static std::atomic<std::uint64_t> counter{0};
        return counter.fetch_add(1, std::memory_order_relaxed) + 1;
    }
    std::string user_, database_, application_name_, address_;
    std::uint64_t match_version_ = next_match_version();
    std::uint64_t version_ = match_version_;
    void changed() { version_ = next_match_version(); }
    Settings defaults_;   // from startup
    Settings session_;    // SET (session level), overrides defaults
    Settings local_;      // SET LOCAL, until the transaction ends
    std::optional<Settings> session_at_begin_;
    std::vector<Savepoint> savepoints_;
};

// Parses a startup `options` string into setting pairs: "-c name=value", "--name=value",
// with backslash-escaped spaces as libpq writes them.
std::vector<std::pair<std::string, std::string>> parse_startup_options(std::string_view options);

}  // namespace pgwarden::policy
