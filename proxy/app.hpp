// The running process: builds the listeners from a configuration, handles signals
// (SIGHUP reload, SIGTERM/SIGINT graceful shutdown) and owns everything until exit.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "policy/config.hpp"

namespace pgwarden::proxy {

// Command-line values that override the config file (empty = not given).
struct CommandLine {
    std::string listen, upstream, admin_listen, log_format, log_level;
};

// Loads `file` (defaults when empty) and applies `overrides`; nullopt with `problems`
// ("file:line: message") when invalid.
std::optional<policy::Config> load_configuration(const std::string& file, const CommandLine& overrides,
                                                 std::vector<std::string>& problems);

// Runs until shutdown; returns the process exit code.
int run(policy::Config config, const std::string& config_file, const CommandLine& overrides);

}  // namespace pgwarden::proxy
