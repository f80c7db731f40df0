// Client identity and setting tracking.
#include "policy/identity.hpp"

#include <algorithm>
#include <cctype>

namespace pgwarden::policy {
namespace {

std::string lower(std::string_view s) {
    std::string out(s);
    for (auto& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

// Startup parameters that are protocol fields, not settings.
bool is_protocol_parameter(std::string_view name) {
    return name == "user" || name == "database" || name == "options" || name == "replication";
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_startup_options(std::string_view options) {
    // Split on unescaped whitespace, as PostgreSQL's pg_split_opts does.
    std::vector<std::string> words;
    std::string word;
    bool have = false;
    for (std::size_t i = 0; i < options.size(); ++i) {
        char c = options[i];
        if (c == '\\' && i + 1 < options.size()) {
            word.push_back(options[++i]);
            have = true;
        } else if (std::isspace(static_cast<unsigned char>(c))) {
            if (have) words.push_back(std::move(word));
            word.clear();
            have = false;
        } else {
            word.push_back(c);
            have = true;
        }
    }
    if (have) words.push_back(std::move(word));

    std::vector<std::pair<std::string, std::string>> out;
    auto take = [&](std::string_view assignment) {
        auto eq = assignment.find('=');
        if (eq == std::string_view::npos || eq == 0) return;
        std::string name = lower(assignment.substr(0, eq));
        std::replace(name.begin(), name.end(), '-', '_');
        out.emplace_back(std::move(name), std::string(assignment.substr(eq + 1)));
    };
    for (std::size_t i = 0; i < words.size(); ++i) {
        std::string_view w = words[i];
        if (w == "-c" && i + 1 < words.size()) {
            take(words[++i]);
        } else if (w.starts_with("-c") && w.size() > 2) {
            take(w.substr(2));
        } else if (w.starts_with("--") && w.size() > 2) {
            take(w.substr(2));
        }
    }
    return out;
}

ClientIdentity::ClientIdentity(const std::vector<std::pair<std::string, std::string>>& startup, std::string address)
    : address_(std::move(address)) {
    // The server applies `options` first and the other parameters after it, wherever
    // `options` stands in the packet (process_startup_options), so those win.
    for (const auto& [name, value] : startup)
        if (name == "options")
            for (auto& [k, v] : parse_startup_options(value)) defaults_[k] = v;
    for (const auto& [name, value] : startup) {
        if (name == "user") user_ = value;
        else if (name == "database") database_ = value;
        else if (name == "application_name") application_name_ = value;
        if (!is_protocol_parameter(name)) defaults_[lower(name)] = value;
    }
    if (database_.empty()) database_ = user_;
}

std::string_view ClientIdentity::setting(std::string_view name) const {
    if (auto it = local_.find(name); it != local_.end()) return it->second;
    if (auto it = session_.find(name); it != session_.end()) return it->second;
    if (auto it = defaults_.find(name); it != defaults_.end()) return it->second;
    return {};
}

void ClientIdentity::apply_set(const StatementInfo& set, bool in_transaction_block) {
    changed();
    if (set.reset_all) {
        // RESET ALL / DISCARD ALL: back to the startup values.
        session_.clear();
        for (const auto& [k, v] : defaults_) session_[k] = v;
        local_.clear();
        return;
    }
    if (set.set_name.empty()) return;
    const std::string& name = set.set_name;
    std::string value;
    if (set.set_value) {
        value = *set.set_value;
    } else if (auto it = defaults_.find(name); it != defaults_.end()) {
        value = it->second;  // RESET / SET TO DEFAULT: the startup value
    }
    if (set.set_local) {
        // SET LOCAL outside a transaction block has no effect (PostgreSQL warns).
        if (in_transaction_block) local_[name] = value;
        return;
    }
    session_[name] = value;
    local_.erase(name);
}

void ClientIdentity::begin_transaction() {
    changed();
    session_at_begin_ = session_;
    savepoints_.clear();
    local_.clear();
}

void ClientIdentity::commit_transaction() {
    changed();
    session_at_begin_.reset();
    savepoints_.clear();
    local_.clear();
}

void ClientIdentity::rollback_transaction() {
    changed();
    if (session_at_begin_) session_ = std::move(*session_at_begin_);
    session_at_begin_.reset();
    savepoints_.clear();
    local_.clear();
}

void ClientIdentity::savepoint(const std::string& name) {
    changed();
    savepoints_.push_back({name, session_, local_});
}

void ClientIdentity::release_savepoint(const std::string& name) {
    changed();
    for (auto it = savepoints_.rbegin(); it != savepoints_.rend(); ++it) {
        if (it->name == name) {
            savepoints_.erase(std::next(it).base(), savepoints_.end());
            return;
        }
    }
}

void ClientIdentity::rollback_to_savepoint(const std::string& name) {
    changed();
    for (auto it = savepoints_.rbegin(); it != savepoints_.rend(); ++it) {
        if (it->name == name) {
            session_ = it->session;
            local_ = it->local;
            // The savepoint itself survives ROLLBACK TO; later ones do not.
            savepoints_.erase(it.base(), savepoints_.end());
            return;
        }
    }
}

std::string ClientIdentity::resolve(const IdentityConfig& config, const StatementInfo* statement) const {
    for (const auto& source : config.sources) {
        std::string_view s = source;
        std::string_view value;
        if (s.starts_with("comment:")) {
            if (statement) value = statement->tag(s.substr(8));
        } else if (s.starts_with("setting:")) {
            value = setting(s.substr(8));
        } else if (s == "application_name") {
            value = application_name_;
        } else if (s == "user") {
            value = user_;
        } else if (s == "database") {
            value = database_;
        } else if (s == "address") {
            value = address_;
        }
        if (!value.empty()) return std::string(value);
    }
    return "unknown";
}

}  // namespace pgwarden::policy
