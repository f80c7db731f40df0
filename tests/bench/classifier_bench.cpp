// What classifying one statement costs, cached and uncached, for a pgbench-like OLTP mix
// with varying literals. Prints ns/statement; not a test. Build with -DCMAKE_BUILD_TYPE=Release.
#include "tests/bench/cpu_timing.hpp"
#include <pg_query.h>

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

#include "policy/classifier.hpp"

namespace {

using pgwarden::policy::Classifier;
using pgwarden::policy::ClassifyConfig;

constexpr int kDistinctPerCategory = 4000;
constexpr int kRepeats = 5;  // best of: the machine is shared, the minimum is the least noisy

struct Category {
    const char* name;
    std::vector<std::string> texts;
};

std::string format(const char* pattern, auto... values) {
    char buffer[512];
    std::snprintf(buffer, sizeof buffer, pattern, values...);
    return buffer;
}

// pgbench's TPC-B-like transaction and its select-only variant, a join or two, and some
// statements tagged the sqlcommenter way, each with its own literals.
std::vector<Category> make_workload() {
    std::mt19937 random(42);
    const auto pick = [&](int low, int high) {
        return std::uniform_int_distribution<int>(low, high)(random);
    };
    std::vector<Category> categories = {
        {"BEGIN", {}},  {"END", {}},  {"select by key", {}}, {"update", {}},
        {"insert", {}}, {"join", {}}, {"tagged select", {}},
    };
    for (int i = 0; i < kDistinctPerCategory; ++i) {
        const int aid = pick(1, 10'000'000), bid = pick(1, 100), tid = pick(1, 1000);
        const int delta = pick(-5000, 5000);
        categories[0].texts.push_back("BEGIN");
        categories[1].texts.push_back("END");
        categories[2].texts.push_back(
            format("SELECT abalance FROM pgbench_accounts WHERE aid = %d", aid));
        categories[3].texts.push_back(format(
            "UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d", delta, aid));
        categories[4].texts.push_back(
            format("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                   "VALUES (%d, %d, %d, %d, CURRENT_TIMESTAMP)",
                   tid, bid, aid, delta));
        categories[5].texts.push_back(
            format("SELECT o.id, c.name, sum(l.qty * l.price) FROM orders o "
                   "JOIN customers c ON c.id = o.customer_id JOIN order_lines l ON l.order_id = "
                   "o.id WHERE o.customer_id = %d AND o.created_at > now() - interval '%d days' "
                   "GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 20",
                   aid, pick(1, 30)));
        categories[6].texts.push_back(
            format("SELECT abalance FROM pgbench_accounts WHERE aid = %d "
                   "/*client='tenant%%3A%d',route='%%2Faccounts'*/",
                   aid, pick(1, 500)));
    }
    return categories;
}

// The order a pgbench client sends them in: mostly the TPC-B transaction, some reads.
std::vector<const std::string*> make_mix(const std::vector<Category>& categories) {
    std::vector<const std::string*> mix;
    for (int i = 0; i < kDistinctPerCategory; ++i) {
        for (const int c : {0, 3, 2, 3, 3, 4, 1})
            mix.push_back(&categories[c].texts[i]);
        if (i % 4 == 0) mix.push_back(&categories[5].texts[i]);
        if (i % 4 == 1) mix.push_back(&categories[6].texts[i]);
    }
    return mix;
}

std::size_t sink = 0;  // keeps results observable so nothing is optimized away

}  // namespace

int main() {
    const std::vector<Category> categories = make_workload();
    const std::vector<const std::string*> mix = make_mix(categories);

    ClassifyConfig uncached_config;
    uncached_config.cache_entries = 0;
    Classifier uncached(uncached_config);

    std::printf("classifier cost per statement (thread CPU time, best of %d runs)\n\n", kRepeats);
    std::printf("%-34s %12s\n", "uncached (cache_entries = 0)", "ns/stmt");
    for (const Category& category : categories) {
        const double ns = pgwarden::bench::best_ns_per_call(category.texts.size(), [&] {
            for (const std::string& text : category.texts) {
                sink += uncached.classify(text)->statements.size();
            }
        });
        std::printf("  %-32s %12.0f\n", category.name, ns);
    }
    const double uncached_mix = pgwarden::bench::best_ns_per_call(mix.size(), [&] {
        for (const std::string* text : mix)
            sink += uncached.classify(*text)->statements.size();
    });
    std::printf("  %-32s %12.0f\n", "OLTP mix", uncached_mix);

    // Through the default cache: only the texts that repeat exactly (BEGIN/END) hit.
    const double default_mix = pgwarden::bench::best_ns_per_call(mix.size(), [&] {
        Classifier classifier{ClassifyConfig{}};
        for (const std::string* text : mix) {
            sink += classifier.classify(*text)->statements.size();
        }
    });
    std::printf("\n%-34s %12.0f\n", "OLTP mix, default cache", default_mix);

    // Prepared-statement style: a small set of texts seen again and again.
    std::vector<const std::string*> repeated;
    for (int i = 0; i < 200; ++i) {
        for (std::size_t c = 0; c < 7; ++c)
            repeated.push_back(&categories[c].texts[i % 50]);
    }
    Classifier cached{ClassifyConfig{}};
    for (const std::string* text : repeated)
        cached.classify(*text);
    const double hit = pgwarden::bench::best_ns_per_call(repeated.size(), [&] {
        for (const std::string* text : repeated)
            sink += cached.classify(*text)->statements.size();
    });
    std::printf("%-34s %12.0f   (hit rate %.3f)\n", "cache hits", hit,
                static_cast<double>(cached.cache_hits()) /
                    static_cast<double>(cached.cache_hits() + cached.cache_misses()));

    // Reference points for the design: the parser alone, and the parser with a general JSON
    // DOM (nlohmann) in place of the classifier's flat reader.
    const auto& selects = categories[2].texts;
    const double parse_only = pgwarden::bench::best_ns_per_call(selects.size(), [&] {
        for (const std::string& text : selects) {
            const PgQueryParseResult result = pg_query_parse(text.c_str());
            sink += result.parse_tree != nullptr;
            pg_query_free_parse_result(result);
        }
    });
    const double parse_dom = pgwarden::bench::best_ns_per_call(selects.size(), [&] {
        for (const std::string& text : selects) {
            const PgQueryParseResult result = pg_query_parse(text.c_str());
            sink += nlohmann::json::parse(result.parse_tree).size();
            pg_query_free_parse_result(result);
        }
    });
    const double parse_protobuf = pgwarden::bench::best_ns_per_call(selects.size(), [&] {
        for (const std::string& text : selects) {
            const PgQueryProtobufParseResult result = pg_query_parse_protobuf(text.c_str());
            sink += result.parse_tree.len;
            pg_query_free_protobuf_parse_result(result);
        }
    });
    std::printf("\nreference, select by key:\n");
    std::printf("  %-32s %12.0f\n", "pg_query_parse (JSON) alone", parse_only);
    std::printf("  %-32s %12.0f\n", "pg_query_parse + nlohmann DOM", parse_dom);
    std::printf("  %-32s %12.0f\n", "pg_query_parse_protobuf alone", parse_protobuf);
    std::printf("\n(%zu)\n", sink);
    return 0;
}
