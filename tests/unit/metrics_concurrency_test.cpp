// Many threads updating the same series lose no updates, and scrapes run alongside them.
#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "metrics/registry.hpp"

using namespace pgwarden::metrics;

namespace {

// More threads than shards, so some threads share cells: sharing must stay exact too.
constexpr int kThreads = 16;
constexpr int kPerThread = 100000;

template <class Body>
void run_threads(int count, Body body) {
    std::vector<std::thread> threads;
    for (int t = 0; t < count; ++t)
        threads.emplace_back(body, t);
    for (auto& thread : threads)
        thread.join();
}

}  // namespace

TEST_CASE("concurrent counter increments add up exactly") {
    Registry registry(ProcessMetrics::kExclude);
    Counter& counter = registry.counter("app_ops_total", "ops", {}).labels({});
    run_threads(kThreads, [&](int) {
        for (int i = 0; i < kPerThread; ++i)
            counter.inc();
    });
    CHECK(counter.value() == double(kThreads) * kPerThread);
}

TEST_CASE("concurrent gauge inc and dec balance out") {
    Gauge gauge;
    run_threads(kThreads, [&](int t) {
        for (int i = 0; i < kPerThread; ++i) {
            gauge.inc(2);
            gauge.dec(t % 2 == 0 ? 2 : 1);
        }
    });
    CHECK(gauge.value() == double(kThreads / 2) * kPerThread);
}

TEST_CASE("concurrent histogram observations are all counted") {
    Histogram histogram({1, 10});
    run_threads(kThreads, [&](int t) {
        for (int i = 0; i < kPerThread; ++i)
            histogram.observe(t % 2 == 0 ? 0.5 : 20);
    });
    const auto snap = histogram.snapshot();
    const auto half = std::uint64_t(kThreads / 2) * kPerThread;
    CHECK(snap.cumulative[0] == half);
    CHECK(snap.cumulative[1] == half);
    CHECK(snap.count == 2 * half);
    CHECK(snap.sum == double(half) * 0.5 + double(half) * 20);
}

TEST_CASE("label lookups, increments and scrapes can all run at once") {
    Registry registry(ProcessMetrics::kExclude);
    auto& family = registry.counter("app_by_client_total", "per client", {"client"});
    std::atomic<bool> done{false};
    std::atomic<int> scrapes{0};
    std::atomic<int> bad_pages{0};
    std::thread scraper([&] {
        while (!done.load()) {
            const std::string page = registry.render();
            // Catch2 assertions are not thread-safe: count here, check on the main thread.
            if (!page.starts_with("# HELP app_by_client_total")) ++bad_pages;
            scrapes.fetch_add(1);
        }
    });
    run_threads(8, [&](int t) {
        for (int i = 0; i < 20000; ++i) {
            // Half the lookups hit a shared series, half create or find a per-thread one.
            family.labels({i % 2 == 0 ? "shared" : "client" + std::to_string(t)}).inc();
        }
    });
    done = true;
    scraper.join();
    CHECK(scrapes.load() > 0);
    CHECK(bad_pages.load() == 0);
    CHECK(family.labels({"shared"}).value() == 8 * 10000);
    for (int t = 0; t < 8; ++t) {
        CHECK(family.labels({"client" + std::to_string(t)}).value() == 10000);
    }
}
