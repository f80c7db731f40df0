// pgwarden's entry point: command line, configuration, logging, signals, and the
// listeners (PostgreSQL clients and the admin HTTP API).
#include <csignal>
#include <cstdio>
#include <iostream>
#include <optional>

#include <CLI/CLI.hpp>

#include "pgwarden_version.hpp"
#include "policy/config.hpp"
#include "proxy/app.hpp"
#include "proxy/event_log.hpp"

using namespace pgwarden;

int main(int argc, char** argv) {
    CLI::App cli{"pgwarden: a PostgreSQL proxy that enforces statement policies"};
    std::string config_file, listen, upstream, admin_listen, log_format, log_level;
    bool check = false, version = false;
    cli.add_option("-c,--config", config_file, "configuration file (TOML)");
    cli.add_option("--listen", listen, "HOST:PORT for PostgreSQL clients (default 127.0.0.1:6432)");
    cli.add_option("--upstream", upstream, "HOST:PORT of the PostgreSQL server (default 127.0.0.1:5432)");
    cli.add_option("--admin-listen", admin_listen, "HOST:PORT for metrics and the admin API (default 127.0.0.1:9187)");
    cli.add_option("--log-format", log_format, "text or json")->check(CLI::IsMember({"text", "json"}));
    cli.add_option("--log-level", log_level, "debug, info, warn or error")
        ->check(CLI::IsMember({"debug", "info", "warn", "error"}));
    cli.add_flag("--check", check, "validate the configuration file and exit (0 valid, 1 not)");
    cli.add_flag("--version", version, "print the version and exit");
    CLI11_PARSE(cli, argc, argv);

    if (version) {
        std::cout << "pgwarden " << PGWARDEN_VERSION << "\n";
        return 0;
    }

    proxy::CommandLine overrides{listen, upstream, admin_listen, log_format, log_level};
    std::vector<std::string> problems;
    auto config = proxy::load_configuration(config_file, overrides, problems);
    if (check) {
        if (config_file.empty()) {
            std::cerr << "pgwarden: --check needs -c FILE\n";
            return 1;
        }
        for (const auto& p : problems) std::cerr << p << "\n";
        if (!config) return 1;
        std::cout << config_file << ": configuration is valid\n";
        return 0;
    }
    if (!config) {
        for (const auto& p : problems) std::cerr << p << "\n";
        return 1;
    }
    return proxy::run(std::move(*config), config_file, overrides);
}
