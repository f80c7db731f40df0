// The text exposition format: sample lines, escaping, histogram buckets and the registry's
// rules about names and shapes.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>

#include "metrics/registry.hpp"

using namespace pgwarden::metrics;

namespace {

bool has_line(const std::string& page, const std::string& line) {
    return page.find("\n" + line + "\n") != std::string::npos || page.starts_with(line + "\n");
}

}  // namespace

TEST_CASE("counter series render with their labels and values") {
    Registry registry(ProcessMetrics::kExclude);
    auto& family = registry.counter("app_requests_total", "Requests handled.", {"method", "code"});
    family.labels({"GET", "200"}).inc(3);
    family.labels({"POST", "500"}).inc();
    const std::string page = registry.render();
    CHECK(
        page.starts_with("# HELP app_requests_total Requests handled.\n"
                         "# TYPE app_requests_total counter\n"));
    CHECK(has_line(page, R"(app_requests_total{method="GET",code="200"} 3)"));
    CHECK(has_line(page, R"(app_requests_total{method="POST",code="500"} 1)"));
}

TEST_CASE("label values escape backslash, quote and newline") {
    Registry registry(ProcessMetrics::kExclude);
    registry.gauge("app_temperature", "t", {"room"}).labels({"a\\b\"c\nd"}).set(1.5);
    CHECK(has_line(registry.render(), R"(app_temperature{room="a\\b\"c\nd"} 1.5)"));
}

TEST_CASE("label values that are not UTF-8 become U+FFFD, valid UTF-8 stays") {
    Registry registry(ProcessMetrics::kExclude);
    auto& family = registry.gauge("app_names", "n", {"client"});
    family.labels({"bad\xFFname"}).set(1);         // stray byte (LATIN1 \u00ff)
    family.labels({"caf\xC3\xA9"}).set(2);          // "cafe" with e-acute, well formed
    family.labels({"cut\xE2\x82"}).set(3);          // three-byte sequence cut short
    family.labels({"over\xC0\xAF"}).set(4);         // overlong '/'
    family.labels({"sur\xED\xA0\x80"}).set(5);     // UTF-16 surrogate
    family.labels({"emoji\xF0\x9F\x98\x80"}).set(6);
    const std::string page = registry.render();
    CHECK(has_line(page, "app_names{client=\"bad\xEF\xBF\xBDname\"} 1"));
    CHECK(has_line(page, "app_names{client=\"caf\xC3\xA9\"} 2"));
    CHECK(has_line(page, "app_names{client=\"cut\xEF\xBF\xBD\xEF\xBF\xBD\"} 3"));
    CHECK(has_line(page, "app_names{client=\"over\xEF\xBF\xBD\xEF\xBF\xBD\"} 4"));
    CHECK(has_line(page, "app_names{client=\"sur\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\"} 5"));
    CHECK(has_line(page, "app_names{client=\"emoji\xF0\x9F\x98\x80\"} 6"));
}

TEST_CASE("help text escapes backslash and newline but not quotes") {
    Registry registry(ProcessMetrics::kExclude);
    registry.counter("app_x_total", "one\\two\nthree \"q\"", {});
    CHECK(has_line(registry.render(), R"(# HELP app_x_total one\\two\nthree "q")"));
}

TEST_CASE("a family without labels renders its one series at zero") {
    Registry registry(ProcessMetrics::kExclude);
    registry.counter("app_errors_total", "Errors.", {});
    registry.gauge("app_level", "Level.", {});
    const std::string page = registry.render();
    CHECK(has_line(page, "app_errors_total 0"));
    CHECK(has_line(page, "app_level 0"));
}

TEST_CASE("a labelled family without series renders only its header") {
    Registry registry(ProcessMetrics::kExclude);
    registry.counter("app_hits_total", "Hits.", {"rule"});
    CHECK(registry.render() == "# HELP app_hits_total Hits.\n# TYPE app_hits_total counter\n");
}

TEST_CASE("histograms render cumulative buckets, +Inf, _sum and _count") {
    Registry registry(ProcessMetrics::kExclude);
    auto& latency = registry.histogram("app_latency_seconds", "Latency.", {"kind"}, {1, 2, 5});
    auto& select = latency.labels({"select"});
    for (double v : {0.5, 1.0, 1.5, 7.0})
        select.observe(v);  // 1.0 lands in le="1"
    const std::string page = registry.render();
    CHECK(has_line(page, "# TYPE app_latency_seconds histogram"));
    CHECK(has_line(page, R"(app_latency_seconds_bucket{kind="select",le="1"} 2)"));
    CHECK(has_line(page, R"(app_latency_seconds_bucket{kind="select",le="2"} 3)"));
    CHECK(has_line(page, R"(app_latency_seconds_bucket{kind="select",le="5"} 3)"));
    CHECK(has_line(page, R"(app_latency_seconds_bucket{kind="select",le="+Inf"} 4)"));
    CHECK(has_line(page, R"(app_latency_seconds_sum{kind="select"} 10)"));
    CHECK(has_line(page, R"(app_latency_seconds_count{kind="select"} 4)"));
}

TEST_CASE("a histogram without labels renders le as its only label") {
    Registry registry(ProcessMetrics::kExclude);
    auto& h = registry.histogram("app_size_bytes", "Sizes.", {}, {0.25, 100}).labels({});
    h.observe(0.1);
    h.observe(std::nan(""));  // ignored
    const std::string page = registry.render();
    CHECK(has_line(page, R"(app_size_bytes_bucket{le="0.25"} 1)"));
    CHECK(has_line(page, R"(app_size_bytes_bucket{le="100"} 1)"));
    CHECK(has_line(page, R"(app_size_bytes_bucket{le="+Inf"} 1)"));
    CHECK(has_line(page, "app_size_bytes_sum 0.1"));
    CHECK(has_line(page, "app_size_bytes_count 1"));
}

TEST_CASE("histogram snapshot counts every observation once") {
    Histogram h({0.001, 0.01});
    h.observe(-3);     // below every bound: first bucket
    h.observe(0.001);  // on a bound: that bucket
    h.observe(100);    // above: +Inf only
    const auto snap = h.snapshot();
    REQUIRE(snap.cumulative.size() == 3);
    CHECK(snap.cumulative[0] == 2);
    CHECK(snap.cumulative[1] == 2);
    CHECK(snap.cumulative[2] == 3);
    CHECK(snap.count == 3);
    CHECK(snap.sum == Approx(97.001));
}

TEST_CASE("values print as Prometheus parses them") {
    auto text = [](double v) {
        std::string out;
        append_value(out, v);
        return out;
    };
    CHECK(text(0) == "0");
    CHECK(text(42) == "42");
    CHECK(text(-7) == "-7");
    CHECK(text(0.0005) == "0.0005");
    CHECK(text(2.5) == "2.5");
    CHECK(text(0.1) == "0.1");
    CHECK(text(1e-9) == "1e-09");
    CHECK(text(1e20) == "1e+20");
    CHECK(text(HUGE_VAL) == "+Inf");
    CHECK(text(-HUGE_VAL) == "-Inf");
    CHECK(text(std::nan("")) == "NaN");
}

TEST_CASE("counters only go up; gauges go both ways and can be set") {
    Counter counter;
    counter.inc(2);
    counter.inc(-5);
    counter.inc(std::nan(""));
    CHECK(counter.value() == 2);

    Gauge gauge;
    gauge.inc(5);
    gauge.dec(2);
    CHECK(gauge.value() == 3);
    gauge.set(-1.25);
    CHECK(gauge.value() == -1.25);
    gauge.inc();
    CHECK(gauge.value() == -0.25);
}

TEST_CASE("labels() returns the same series for the same values") {
    Registry registry(ProcessMetrics::kExclude);
    auto& family = registry.counter("app_stable_total", "s", {"k"});
    Counter& first = family.labels({"a"});
    for (int i = 0; i < 1000; ++i)
        family.labels({std::to_string(i)});
    CHECK(&family.labels({"a"}) == &first);
    CHECK(&family.labels({"b"}) != &first);
}

TEST_CASE("labels() refuses the wrong number of values") {
    Registry registry(ProcessMetrics::kExclude);
    auto& family = registry.counter("app_pairs_total", "p", {"a", "b"});
    CHECK_THROWS_AS(family.labels({"only"}), std::invalid_argument);
    CHECK_THROWS_AS(family.labels({"1", "2", "3"}), std::invalid_argument);
}

TEST_CASE("registering a name again returns the family only for the same shape") {
    Registry registry(ProcessMetrics::kExclude);
    auto& first = registry.counter("app_c_total", "c", {"a"});
    CHECK(&registry.counter("app_c_total", "other help", {"a"}) == &first);
    CHECK_THROWS_AS(registry.counter("app_c_total", "c", {"b"}), std::invalid_argument);
    CHECK_THROWS_AS(registry.gauge("app_c_total", "c", {"a"}), std::invalid_argument);

    auto& h = registry.histogram("app_h_seconds", "h", {}, {1, 2});
    CHECK(&registry.histogram("app_h_seconds", "h", {}, {1, 2}) == &h);
    CHECK_THROWS_AS(registry.histogram("app_h_seconds", "h", {}, {1, 3}), std::invalid_argument);
}

TEST_CASE("names, label names and buckets Prometheus would reject are refused") {
    Registry registry(ProcessMetrics::kExclude);
    CHECK_THROWS_AS(registry.counter("1starts_with_digit", "x", {}), std::invalid_argument);
    CHECK_THROWS_AS(registry.counter("has-dash", "x", {}), std::invalid_argument);
    CHECK_THROWS_AS(registry.counter("", "x", {}), std::invalid_argument);
    CHECK_THROWS_AS(registry.counter("ok_total", "x", {"__reserved"}), std::invalid_argument);
    CHECK_THROWS_AS(registry.counter("ok_total", "x", {"a:b"}), std::invalid_argument);
    CHECK_THROWS_AS(registry.counter("ok_total", "x", {"a", "a"}), std::invalid_argument);
    CHECK_THROWS_AS(registry.histogram("h1", "x", {"le"}, {1}), std::invalid_argument);
    CHECK_THROWS_AS(registry.histogram("h2", "x", {}, {2, 1}), std::invalid_argument);
    CHECK_THROWS_AS(registry.histogram("h3", "x", {}, {1, 1}), std::invalid_argument);
    CHECK_THROWS_AS(registry.histogram("h4", "x", {}, {std::nan("")}), std::invalid_argument);
    CHECK_NOTHROW(registry.counter("ns:ok_total", "x", {"_a1"}));
    CHECK_NOTHROW(registry.histogram("h5", "trailing +Inf is implied", {}, {1, HUGE_VAL}));
}

TEST_CASE("families render in registration order") {
    Registry registry(ProcessMetrics::kExclude);
    registry.counter("zz_total", "z", {});
    registry.counter("aa_total", "a", {});
    const std::string page = registry.render();
    CHECK(page.find("zz_total") < page.find("aa_total"));
}
