// Rule evaluation.
#include "policy/rules.hpp"

namespace pgwarden::policy {

RulePolicy::RulePolicy(const std::vector<Rule>& rules) {
    for (const auto& r : rules) rules_.push_back({r, Matcher(r.match)});
}

const std::vector<std::uint32_t>* RulePolicy::client_rules(const StatementContext& context) const {
    ClientMatchCache* cache = context.rule_matches;
    if (!cache) return nullptr;
    if (!cache->holds(serial_, context.identity, context.client)) {
        cache->rules.clear();
        for (std::size_t i = 0; i < rules_.size(); ++i)
            if (!nesting_only(rules_[i].rule) && rules_[i].matcher.matches_client(context.identity, context.client))
                cache->rules.push_back(static_cast<std::uint32_t>(i));
        cache->filled(serial_, context.identity, context.client);
    }
    return &cache->rules;
}

Verdict RulePolicy::before(const StatementContext& context) {
    Verdict verdict;
    const std::vector<std::uint32_t>* cached = client_rules(context);
    const std::size_t candidates = cached ? cached->size() : rules_.size();
    for (std::size_t n = 0; n < candidates; ++n) {
        const auto& [rule, matcher] = rules_[cached ? (*cached)[n] : n];
        if (!cached && (nesting_only(rule) || !matcher.matches_client(context.identity, context.client))) continue;
        if (!matcher.matches_statement(context.statement)) continue;
        std::string message = rule.message.empty() ? "pgwarden: rule " + rule.name : rule.message;
        RuleHit hit{rule.name, rule.action};
        verdict.hits.push_back(hit);
        switch (rule.action) {
            case RuleAction::kReject:
                verdict.action = Verdict::Action::kReject;
                verdict.error = Message{rule.sqlstate, message, "", ""};
                verdict.policy = "rule";
                verdict.rule = rule.name;
                return verdict;
            case RuleAction::kDoom:
                if (context.tx == TxState::kInBlock && !verdict.doom_reason) {
                    verdict.doom_reason = "rule";
                    verdict.rule = rule.name;
                }
                break;
            case RuleAction::kNotice:
                verdict.notices.push_back(Message{"00000", message, "", ""});  // as RAISE NOTICE sends
                break;
            case RuleAction::kLog:
                break;
        }
    }
    return verdict;
}

std::optional<NestingMode> RulePolicy::nesting_override(const ClientIdentity& identity,
                                                        std::string_view client) const {
    for (const auto& [rule, matcher] : rules_)
        if (rule.nesting && matcher.matches_client(identity, client)) return rule.nesting;
    return std::nullopt;
}

}  // namespace pgwarden::policy
