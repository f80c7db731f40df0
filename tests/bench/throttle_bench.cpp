// What the throttle policy costs per statement with 1, 10 and 20 rules, when they all match
// and when none does. Prints ns/statement; not a test. Build with -DCMAKE_BUILD_TYPE=Release.
// Usage: bench_throttle [CLIENTS] (distinct client names, default 1000).
#include "tests/bench/cpu_timing.hpp"
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "policy/throttle.hpp"

namespace {

using namespace pgwarden::policy;

constexpr int kRepeats = 5;  // best of: the machine is shared, the minimum is the least noisy
constexpr std::size_t kStatements = 200'000;
// Distinct client names: with many, bucket lookups miss the CPU cache now and then.
int clients = 1000;

std::size_t sink = 0;  // keeps results observable so nothing is optimized away

// Rules shaped like a real config (a user, an application_name pattern, a client pattern),
// with rates so high that nothing is ever delayed: this measures the admission path.
std::vector<ThrottleRule> make_rules(int count, int matching, ThrottleBucket bucket = ThrottleBucket::kClient) {
    std::vector<ThrottleRule> rules;
    for (int i = 0; i < count; ++i) {
        ThrottleRule rule;
        rule.name = "rule-" + std::to_string(i);
        rule.match.user = {i < matching ? "app" : "reporting"};
        rule.match.application_name = {"web*"};
        rule.match.client = {"tenant:*"};
        rule.rate = 1e9;
        rule.burst = 1e9;
        rule.bucket = bucket;
        rule.action = ThrottleAction::kDelay;
        rules.push_back(rule);
    }
    return rules;
}

struct Workload {
    std::vector<ClientIdentity> identities;
    // Each simulated session keeps its match cache, as pgwarden's sessions do.
    mutable std::vector<ThrottleMatchCache> caches;
    std::vector<std::string> names;
    StatementInfo insert;
    StatementInfo select;
    Workload() {
        for (int i = 0; i < clients; ++i) {
            identities.emplace_back(std::vector<std::pair<std::string, std::string>>{
                                        {"user", "app"}, {"database", "shop"}, {"application_name", "web-1"}},
                                    "10.0.0.1");
            names.push_back("tenant:" + std::to_string(i));
        }
        caches.resize(identities.size());
        insert.kind = StatementKind::kInsert;
        insert.is_write = true;
        select.kind = StatementKind::kSelect;
        select.is_write = false;
    }
    bool cached = true;
    // pgwarden reads the clock once when a statement arrives (for its latency metric) and
    // hands that time to the throttles; a statement here "arrives" 1 ns after the last.
    bool arrival_given = true;
    void run(ThrottlePolicy& policy, std::size_t statements, std::size_t offset = 0, bool reads = false) const {
        const Clock::time_point start = Clock::now();
        for (std::size_t i = 0; i < statements; ++i) {
            const std::size_t c = (i * 7 + offset) % identities.size();
            StatementContext context{reads ? select : insert, "", identities[c], names[c]};
            if (cached) context.match_cache = &caches[c];
            if (arrival_given) context.arrived = start + std::chrono::nanoseconds(i);
            const Verdict verdict = policy.before(context);
            sink += verdict.delay_until.has_value() + verdict.rejects();
        }
    }
};

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1) clients = std::max(1, std::atoi(argv[1]));
    Workload workload;
    std::printf("throttle policy cost per statement (thread CPU time, best of %d runs, %zu statements,\n"
                "%d clients, bucket = client, arrival time given as pgwarden gives it)\n\n",
                kRepeats, kStatements, clients);
    for (const bool cached : {true, false}) {
    workload.cached = cached;
    std::printf("%s\n", cached ? "with the session's rule-match cache (as pgwarden runs):"
                                : "\nwithout it (every rule's match checked per statement):");
    std::printf("%-8s %16s %16s %16s %16s\n", "rules", "all match", "one matches", "none match", "reads");
    for (const int count : {1, 10, 20}) {
        double ns[4];
        const int matching[4] = {count, 1, 0, count};
        for (int m = 0; m < 4; ++m) {
            const bool reads = m == 3;  // SELECTs, which the rules (writes only) do not count
            ThrottlePolicy policy(make_rules(count, matching[m]), std::make_shared<ThrottleState>());
            workload.run(policy, kStatements, 0, reads);  // warm up: creates the buckets
            ns[m] = pgwarden::bench::best_ns_per_call(kStatements, [&] { workload.run(policy, kStatements, 0, reads); });
        }
        std::printf("%-8d %16.0f %16.0f %16.0f %16.0f\n", count, ns[0], ns[1], ns[2], ns[3]);
    }
    }

    // Every client in one bucket (bucket = "rule"), from two threads at once: the cost of
    // contention on the one lock that bucket has.
    for (const int threads : {1, 2}) {
        ThrottlePolicy policy(make_rules(1, 1, ThrottleBucket::kRule), std::make_shared<ThrottleState>());
        std::vector<double> per_thread(static_cast<std::size_t>(threads));
        std::vector<std::thread> running;
        for (int t = 0; t < threads; ++t)
            running.emplace_back([&, t] {
                per_thread[static_cast<std::size_t>(t)] = pgwarden::bench::best_ns_per_call(
                    kStatements, [&] { workload.run(policy, kStatements, static_cast<std::size_t>(t)); });
            });
        for (auto& thread : running) thread.join();
        std::printf("%s1 rule, bucket = rule, %d thread%s: %.0f ns/statement per thread\n", threads == 1 ? "\n" : "",
                    threads, threads == 1 ? "" : "s", *std::max_element(per_thread.begin(), per_thread.end()));
    }
    // The same, with the policy reading the clock itself (as it does when no arrival time
    // comes with the statement): what one clock read costs on this host.
    workload.cached = true;
    workload.arrival_given = false;
    {
        ThrottlePolicy policy(make_rules(20, 1), std::make_shared<ThrottleState>());
        workload.run(policy, kStatements);
        const double ns = pgwarden::bench::best_ns_per_call(kStatements, [&] { workload.run(policy, kStatements); });
        std::printf("\n20 rules, one matches, the policy reading the clock itself: %.0f ns/statement\n", ns);
    }
    std::printf("\n(%zu)\n", sink);
    return 0;
}
