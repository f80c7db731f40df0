// Prometheus' own linter accepts the page pgwarden serves, awkward label values included.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>

#include "metrics/proxy_metrics.hpp"

using namespace pgwarden::metrics;

namespace {

constexpr const char* kPromtool = "/usr/bin/promtool";

struct CommandResult {
    int exit_code = -1;
    std::string output;
};

CommandResult run(const std::string& command) {
    CommandResult result;
    FILE* pipe = ::popen(command.c_str(), "r");
    REQUIRE(pipe != nullptr);
    std::array<char, 4096> buffer{};
    while (const std::size_t n = std::fread(buffer.data(), 1, buffer.size(), pipe)) {
        result.output.append(buffer.data(), n);
    }
    const int status = ::pclose(pipe);
    if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
    return result;
}

std::string write_temp(const std::string& text) {
    std::string path = "/tmp/pgwarden-metrics-XXXXXX";
    const int fd = ::mkstemp(path.data());
    REQUIRE(fd >= 0);
    ::close(fd);
    std::ofstream(path) << text;
    return path;
}

}  // namespace

TEST_CASE("promtool check metrics accepts the rendered page") {
    if (::access(kPromtool, X_OK) != 0) {
        WARN("promtool not found at " << kPromtool << "; skipping the exposition lint");
        return;
    }
    Registry registry;
    ProxyMetrics metrics(registry, 5);
    metrics.statements.labels({"insert", std::string(metrics.clients.label("we\"ird\\name\n"))})
        .inc(2);
    metrics.statement_duration.labels({"insert"}).observe(0.0123);
    metrics.throttle_delay.labels({"burst"}).observe(42);
    metrics.bytes_in(ByteDirection::kClientToServer).inc(123456789);
    metrics.client_connections.set(3);

    const std::string path = write_temp(registry.render());
    const CommandResult lint = run(std::string(kPromtool) + " check metrics < " + path + " 2>&1");
    ::unlink(path.c_str());
    INFO(lint.output);
    CHECK(lint.exit_code == 0);
    CHECK(lint.output.empty());
}

TEST_CASE("promtool rejects a page that breaks the conventions (the check can fail)") {
    if (::access(kPromtool, X_OK) != 0) {
        WARN("promtool not found at " << kPromtool << "; skipping the exposition lint");
        return;
    }
    Registry registry(ProcessMetrics::kExclude);
    registry.counter("app_requests", "A counter without _total.", {});
    const std::string path = write_temp(registry.render());
    const CommandResult lint = run(std::string(kPromtool) + " check metrics < " + path + " 2>&1");
    ::unlink(path.c_str());
    CHECK(lint.exit_code != 0);
}
