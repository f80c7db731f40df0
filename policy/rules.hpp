// [[rule]]: match a client and a statement, then reject it, doom the transaction, send
// a NOTICE, or only log. Rules are tried in file order; every matching rule counts a hit,
// and the first rule that rejects or dooms decides.
#pragma once
#include <memory>
#include <vector>

#include "policy/match.hpp"
#include "policy/pipeline.hpp"

namespace pgwarden::policy {

class RulePolicy : public Policy {
public:
    explicit RulePolicy(const std::vector<Rule>& rules);
    const char* name() const override { return "rule"; }
    Verdict before(const StatementContext& context) override;

    // The nesting mode the first matching rule with a `nesting` override sets, if any.
    std::optional<NestingMode> nesting_override(const ClientIdentity& identity, std::string_view client) const;

private:
    struct Compiled {
        Rule rule;
        Matcher matcher;
    };
    // A rule that only sets the nesting mode says nothing about statements.
    static bool nesting_only(const Rule& rule) {
        return rule.nesting && rule.match.statements.empty() && rule.match.tables.empty();
    }
    // The rules that may take this context's client: the session's cache, refilled when
    // stale, or nullptr when the context has none (then every rule is checked).
    const std::vector<std::uint32_t>* client_rules(const StatementContext& context) const;
    // Whether rule `index`'s table patterns take the statement's tables, remembered in
    // the session's cache for as long as its statements touch the same tables.
    bool tables_match(std::size_t index, const StatementContext& context) const;

    std::uint64_t serial_ = next_policy_serial();
    std::vector<Compiled> rules_;
};

}  // namespace pgwarden::policy
