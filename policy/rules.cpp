// Rule evaluation.
#include "policy/rules.hpp"

namespace pgwarden::policy {

RulePolicy::RulePolicy(const std::vector<Rule>& rules) {
    for (const auto& r : rules) rules_.push_back({r, Matcher(r.match)});
}

const std::vector<std::uint32_t>* RulePolicy::client_rules(const StatementContext& context) const {
    RuleMatchCache* cache = context.rule_matches;
    if (!cache) return nullptr;
    const bool refilled = cache->refresh(serial_, context.identity, context.client, rules_.size(), [&](std::size_t i) {
        return !nesting_only(rules_[i].rule) && rules_[i].matcher.matches_client(context.identity, context.client);
    });
    // Needed only when the policy changed; a refill is rare enough to clear it always.
    if (refilled) cache->table_matches.assign(rules_.size(), -1);
    return &cache->rules;
}

bool RulePolicy::tables_match(std::size_t index, const StatementContext& context) const {
    const Matcher& matcher = rules_[index].matcher;
    RuleMatchCache* cache = context.rule_matches;
    const StatementInfo& statement = context.statement;
    if (!cache || !matcher.has_tables() || statement.unknown) return matcher.matches_tables(statement);
    if (cache->tables != statement.tables || cache->table_matches.size() != rules_.size()) {
        cache->tables = statement.tables;
        cache->table_matches.assign(rules_.size(), -1);
    }
    std::int8_t& known = cache->table_matches[index];
    if (known < 0) known = matcher.matches_tables(statement) ? 1 : 0;
    return known == 1;
}

Verdict RulePolicy::before(const StatementContext& context) {
    Verdict verdict;
    const std::vector<std::uint32_t>* cached = client_rules(context);
    const std::size_t candidates = cached ? cached->size() : rules_.size();
    for (std::size_t n = 0; n < candidates; ++n) {
        const std::size_t index = cached ? (*cached)[n] : n;
        const auto& [rule, matcher] = rules_[index];
        if (!cached && (nesting_only(rule) || !matcher.matches_client(context.identity, context.client))) continue;
        if (!matcher.matches_kind(context.statement) || !tables_match(index, context)) continue;
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
