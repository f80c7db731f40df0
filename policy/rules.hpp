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
    std::vector<Compiled> rules_;
};

}  // namespace pgwarden::policy
