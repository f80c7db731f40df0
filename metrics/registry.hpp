// Counters, gauges and histograms, grouped in labelled families, rendered in the Prometheus
// text exposition format (version 0.0.4). Updates are lock-free and shard per thread.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pgwarden::metrics {

namespace detail {

// Why increments do not contend: every metric keeps one cell per shard, each cell on its
// own cache line, and each thread writes only to the shard it was given on first use.
// Threads take shards in turn, so pgwarden's io_context threads (one per core, fewer than
// the shard count) each own a cell outright: their relaxed atomic adds never bounce a cache
// line between cores. Threads beyond the shard count share cells, which stays exact (the
// adds are atomic) and merely costs some contention. Readers sum the cells without locks.
inline constexpr std::size_t kCacheLine = 64;

std::size_t shard_count() noexcept;  // a power of two, fixed for the process
std::size_t next_thread_shard() noexcept;

inline std::size_t this_thread_shard() noexcept {
    thread_local const std::size_t shard = next_thread_shard();
    return shard;
}

struct alignas(kCacheLine) DoubleCell {
    std::atomic<double> value{0.0};
};

struct alignas(kCacheLine) WordLine {
    static constexpr std::size_t kWords = kCacheLine / sizeof(std::atomic<std::uint64_t>);
    std::atomic<std::uint64_t> words[kWords]{};
};

// Orders label-value tuples; transparent so a lookup needs no std::string copies.
struct LabelValuesLess {
    using is_transparent = void;
    template <class A, class B>
    bool operator()(const A& a, const B& b) const {
        return std::lexicographical_compare(
            a.begin(), a.end(), b.begin(), b.end(),
            [](std::string_view x, std::string_view y) { return x < y; });
    }
};

}  // namespace detail

// Only goes up. Negative and NaN increments are ignored: Prometheus reads any decrease
// as a process restart.
class Counter {
public:
    Counter();
    void inc(double v = 1) noexcept {
        if (!(v >= 0)) return;
        cells_[detail::this_thread_shard()].value.fetch_add(v, std::memory_order_relaxed);
    }
    double value() const noexcept;

private:
    std::unique_ptr<detail::DoubleCell[]> cells_;
};

// Goes up and down. inc/dec are sharded like Counter. set() is meant for gauges with one
// writer (build info, sizes sampled at scrape time): inc/dec racing with it from other
// threads count as happening before or after it, and a concurrent reader may see a mix.
class Gauge {
public:
    Gauge();
    void inc(double v = 1) noexcept {
        cells_[detail::this_thread_shard()].value.fetch_add(v, std::memory_order_relaxed);
    }
    void dec(double v = 1) noexcept { inc(-v); }
    void set(double v) noexcept;
    double value() const noexcept;

private:
    std::unique_ptr<detail::DoubleCell[]> cells_;
};

// Counts observations into buckets with upper bounds `le` (inclusive), plus their sum.
// Each shard holds [bucket counts..., +Inf count, sum bits] in its own cache lines; the total
// count is the sum of the bucket counts, so a rendered _count always equals the +Inf bucket.
class Histogram {
public:
    // `upper_bounds` must be finite and strictly increasing; a trailing +Inf is implied.
    explicit Histogram(std::vector<double> upper_bounds);
    void observe(double v) noexcept;  // NaN is ignored

    struct Snapshot {
        std::vector<double> upper_bounds;       // without +Inf
        std::vector<std::uint64_t> cumulative;  // one per bound, then +Inf
        std::uint64_t count = 0;
        double sum = 0;
    };
    Snapshot snapshot() const;

private:
    std::atomic<std::uint64_t>& word(std::size_t shard, std::size_t index) const noexcept;

    std::vector<double> upper_bounds_;
    std::size_t lines_per_shard_ = 0;
    std::unique_ptr<detail::WordLine[]> lines_;
};

enum class MetricType { kCounter, kGauge, kHistogram };
const char* to_string(MetricType type);

// What every family shares; Registry renders families through it.
class FamilyBase {
public:
    FamilyBase(std::string name, std::string help, std::vector<std::string> label_names,
               MetricType type);
    virtual ~FamilyBase();
    FamilyBase(const FamilyBase&) = delete;
    FamilyBase& operator=(const FamilyBase&) = delete;

    const std::string& name() const { return name_; }
    const std::vector<std::string>& label_names() const { return label_names_; }
    MetricType type() const { return type_; }
    void render(std::string& out) const;  // # HELP, # TYPE, then every series

protected:
    virtual void render_series(std::string& out) const = 0;

private:
    std::string name_;
    std::string help_;
    std::vector<std::string> label_names_;
    MetricType type_;
};

// Series of one metric, one per distinct tuple of label values. A family without labels
// has exactly one series, created with it, so it is exported even while zero.
template <class M>
class Family final : public FamilyBase {
public:
    Family(std::string name, std::string help, std::vector<std::string> label_names,
           std::vector<double> buckets = {});

    // The series for these label values (one per label name, in order; throws
    // std::invalid_argument on a count mismatch). The reference stays valid as long as the
    // family, so callers on hot paths look it up once and keep it.
    M& labels(std::initializer_list<std::string_view> values) {
        return labels(std::span<const std::string_view>(values.begin(), values.size()));
    }
    M& labels(std::span<const std::string_view> values);

    const std::vector<double>& buckets() const { return buckets_; }

protected:
    void render_series(std::string& out) const override;

private:
    std::vector<double> buckets_;  // histograms only
    // Taken shared to find a series, exclusive to add one; updates never take it.
    mutable std::shared_mutex mutex_;
    std::map<std::vector<std::string>, std::unique_ptr<M>, detail::LabelValuesLess> series_;
};

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

enum class ProcessMetrics { kInclude, kExclude };

// Owns the families and renders the exposition page. Registering a name again returns the
// existing family when type, labels and buckets match, and throws std::invalid_argument
// otherwise (also for names and label names Prometheus does not accept).
class Registry {
public:
    explicit Registry(ProcessMetrics process = ProcessMetrics::kInclude);
    ~Registry();
    Registry(const Registry&) = delete;
    Registry& operator=(const Registry&) = delete;

    Family<Counter>& counter(std::string name, std::string help,
                             std::vector<std::string> label_names);
    Family<Gauge>& gauge(std::string name, std::string help, std::vector<std::string> label_names);
    Family<Histogram>& histogram(std::string name, std::string help,
                                 std::vector<std::string> label_names, std::vector<double> buckets);

    // Families in registration order, then process_* metrics. Only blocks registration.
    std::string render() const;

private:
    template <class M>
    Family<M>& add(std::string name, std::string help, std::vector<std::string> label_names,
                   std::vector<double> buckets, MetricType type);

    ProcessMetrics process_;
    mutable std::mutex mutex_;
    std::vector<std::unique_ptr<FamilyBase>> families_;
};

// Exposition-format helpers, public for the process metrics and for tests.
void append_escaped_label_value(std::string& out, std::string_view value);
void append_escaped_help(std::string& out, std::string_view help);
void append_value(std::string& out, double value);  // "+Inf", "NaN", integers without ".0"

}  // namespace pgwarden::metrics
