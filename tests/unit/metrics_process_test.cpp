// process_* metrics read from /proc/self.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "metrics/process.hpp"
#include "metrics/registry.hpp"

using namespace pgwarden::metrics;

TEST_CASE("process stats are plausible for this process") {
    const auto stats = read_process_stats();
    REQUIRE(stats.has_value());
    CHECK(stats->cpu_seconds >= 0);
    CHECK(stats->resident_memory_bytes > 1024 * 1024);  // a C++ test binary is bigger
    CHECK(stats->virtual_memory_bytes >= stats->resident_memory_bytes);
    const double now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    CHECK(stats->start_time_seconds <= now + 1);
    CHECK(stats->start_time_seconds > now - 24 * 3600);
}

TEST_CASE("open descriptors are counted and follow open and close") {
    const auto before = count_open_fds();
    REQUIRE(before.has_value());
    CHECK(*before >= 3);
    const int fd = ::open("/dev/null", O_RDONLY);
    REQUIRE(fd >= 0);
    CHECK(count_open_fds() == *before + 1);
    ::close(fd);
    CHECK(count_open_fds() == *before);
    REQUIRE(max_fds().has_value());
    CHECK(*max_fds() >= *before);
}

TEST_CASE("the registry page ends with the process families") {
    Registry registry;
    registry.counter("app_total", "a", {});
    const std::string page = registry.render();
    for (const char* name : {"process_cpu_seconds_total", "process_resident_memory_bytes",
                             "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
                             "process_start_time_seconds"}) {
        INFO(name);
        CHECK(page.find(std::string("\n") + name + " ") != std::string::npos);
        CHECK(page.find(std::string("# TYPE ") + name + " ") != std::string::npos);
    }
    CHECK(page.find("# TYPE process_cpu_seconds_total counter") != std::string::npos);
    CHECK(page.find("app_total") < page.find("process_cpu_seconds_total"));

    Registry bare(ProcessMetrics::kExclude);
    CHECK(bare.render().find("process_") == std::string::npos);
}
