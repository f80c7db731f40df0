// Metric storage and the text exposition format. The format is described in Prometheus'
// "Exposition formats" document (text-based format, version 0.0.4).
#include "metrics/registry.hpp"

#include <bit>
#include <charconv>
#include <cmath>
#include <stdexcept>
#include <thread>
#include <utility>

#include "metrics/process.hpp"

namespace pgwarden::metrics {

namespace detail {

// Twice the cores (rounded to a power of two) so the threads pgwarden starts, plus the
// main and admin threads, usually each get a shard of their own. Capped: every series pays
// a cache line per shard.
std::size_t shard_count() noexcept {
    static const std::size_t count = [] {
        const std::size_t cores = std::max(1u, std::thread::hardware_concurrency());
        return std::clamp<std::size_t>(std::bit_ceil(cores) * 2, 2, 64);
    }();
    return count;
}

std::size_t next_thread_shard() noexcept {
    static std::atomic<std::size_t> next{0};
    return next.fetch_add(1, std::memory_order_relaxed) & (shard_count() - 1);
}

}  // namespace detail

namespace {

double sum_cells(const detail::DoubleCell* cells) {
    double total = 0;
    for (std::size_t i = 0; i < detail::shard_count(); ++i) {
        total += cells[i].value.load(std::memory_order_relaxed);
    }
    return total;
}

bool is_metric_name(std::string_view name) {
    if (name.empty()) return false;
    for (std::size_t i = 0; i < name.size(); ++i) {
        const char c = name[i];
        const bool letter =
            (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        const bool digit = c >= '0' && c <= '9';
        if (!letter && !(digit && i > 0)) return false;
    }
    return true;
}

bool is_label_name(std::string_view name) {
    if (name.empty() || name.starts_with("__")) return false;
    for (std::size_t i = 0; i < name.size(); ++i) {
        const char c = name[i];
        const bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        const bool digit = c >= '0' && c <= '9';
        if (!letter && !(digit && i > 0)) return false;
    }
    return true;
}

std::vector<double> checked_buckets(std::vector<double> bounds) {
    if (!bounds.empty() && bounds.back() == HUGE_VAL) bounds.pop_back();
    for (std::size_t i = 0; i < bounds.size(); ++i) {
        if (!std::isfinite(bounds[i])) {
            throw std::invalid_argument("histogram bucket bounds must be finite");
        }
        if (i > 0 && !(bounds[i - 1] < bounds[i])) {
            throw std::invalid_argument("histogram bucket bounds must be strictly increasing");
        }
    }
    return bounds;
}

// `{a="x",b="y"` without the closing brace, so a histogram can append `le`; empty when
// the family has no labels.
std::string open_label_set(const std::vector<std::string>& names,
                           const std::vector<std::string>& values) {
    std::string out;
    for (std::size_t i = 0; i < names.size(); ++i) {
        out += i == 0 ? '{' : ',';
        out += names[i];
        out += "=\"";
        append_escaped_label_value(out, values[i]);
        out += '"';
    }
    return out;
}

void append_sample(std::string& out, std::string_view name, std::string_view suffix,
                   const std::string& open_labels, double value) {
    out += name;
    out += suffix;
    if (!open_labels.empty()) {
        out += open_labels;
        out += '}';
    }
    out += ' ';
    append_value(out, value);
    out += '\n';
}

}  // namespace

// --- exposition helpers ---

namespace {

// Length of the well-formed UTF-8 sequence at the start of `s`, or 0 when it is not one
// (stray continuation byte, overlong form, surrogate, beyond U+10FFFF, cut short).
std::size_t utf8_sequence_length(std::string_view s) {
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
    const unsigned char b0 = byte(0);
    if (b0 < 0x80) return 1;
    std::size_t n;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) n = 2;
    else if (b0 >= 0xE0 && b0 <= 0xEF) {
        n = 3;
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        n = 4;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (s.size() < n || byte(1) < lo || byte(1) > hi) return 0;
    for (std::size_t i = 2; i < n; ++i)
        if ((byte(i) & 0xC0) != 0x80) return 0;
    return n;
}

}  // namespace

void append_escaped_label_value(std::string& out, std::string_view value) {
    // Label values come from clients (names, application_name) and may be in any
    // encoding; the exposition format requires UTF-8, and one bad byte makes Prometheus
    // reject the whole scrape. Bytes that are not UTF-8 become U+FFFD.
    while (!value.empty()) {
        const char c = value.front();
        switch (c) {
            case '\\': out += "\\\\"; break;
            case '"': out += "\\\""; break;
            case '\n': out += "\\n"; break;
            default: {
                const std::size_t n = utf8_sequence_length(value);
                if (n == 0) {
                    out += "\xEF\xBF\xBD";
                    value.remove_prefix(1);
                } else {
                    out.append(value.substr(0, n));
                    value.remove_prefix(n);
                }
                continue;
            }
        }
        value.remove_prefix(1);
    }
}

void append_escaped_help(std::string& out, std::string_view help) {
    for (const char c : help) {
        switch (c) {
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            default: out += c;
        }
    }
}

void append_value(std::string& out, double value) {
    if (std::isnan(value)) {
        out += "NaN";
        return;
    }
    if (std::isinf(value)) {
        out += value > 0 ? "+Inf" : "-Inf";
        return;
    }
    char buffer[64];
    std::to_chars_result result;
    // Whole numbers (most counters) print as integers; 2^53 is where doubles stop holding
    // every integer.
    if (value == std::trunc(value) && std::fabs(value) < 9007199254740992.0) {
        result = std::to_chars(buffer, buffer + sizeof buffer, static_cast<std::int64_t>(value));
    } else if (std::fabs(value) >= 1e-6 && std::fabs(value) < 1e15) {
        // Plain decimals in the usual range ("0.0005", not "5e-04"): bucket bounds are read
        // by people in `le` labels.
        result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::fixed);
    } else {
        result = std::to_chars(buffer, buffer + sizeof buffer, value);
    }
    out.append(buffer, result.ptr);
}

const char* to_string(MetricType type) {
    switch (type) {
        case MetricType::kCounter: return "counter";
        case MetricType::kGauge: return "gauge";
        case MetricType::kHistogram: return "histogram";
    }
    return "untyped";
}

// --- Counter, Gauge ---

Counter::Counter() : cells_(new detail::DoubleCell[detail::shard_count()]) {}

double Counter::value() const noexcept { return sum_cells(cells_.get()); }

Gauge::Gauge() : cells_(new detail::DoubleCell[detail::shard_count()]) {}

void Gauge::set(double v) noexcept {
    const std::size_t own = detail::this_thread_shard();
    for (std::size_t i = 0; i < detail::shard_count(); ++i) {
        if (i != own) cells_[i].value.store(0, std::memory_order_relaxed);
    }
    cells_[own].value.store(v, std::memory_order_relaxed);
}

double Gauge::value() const noexcept { return sum_cells(cells_.get()); }

// --- Histogram ---

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(checked_buckets(std::move(upper_bounds))) {
    // Words per shard: one per bound, one for +Inf, one for the sum.
    const std::size_t words = upper_bounds_.size() + 2;
    lines_per_shard_ = (words + detail::WordLine::kWords - 1) / detail::WordLine::kWords;
    lines_.reset(new detail::WordLine[lines_per_shard_ * detail::shard_count()]);
}

std::atomic<std::uint64_t>& Histogram::word(std::size_t shard, std::size_t index) const noexcept {
    detail::WordLine& line = lines_[shard * lines_per_shard_ + index / detail::WordLine::kWords];
    return line.words[index % detail::WordLine::kWords];
}

void Histogram::observe(double v) noexcept {
    if (std::isnan(v)) return;
    const std::size_t shard = detail::this_thread_shard();
    const auto bucket = static_cast<std::size_t>(
        std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), v) - upper_bounds_.begin());
    word(shard, bucket).fetch_add(1, std::memory_order_relaxed);

    std::atomic<std::uint64_t>& sum = word(shard, upper_bounds_.size() + 1);
    std::uint64_t old_bits = sum.load(std::memory_order_relaxed);
    while (!sum.compare_exchange_weak(
        old_bits, std::bit_cast<std::uint64_t>(std::bit_cast<double>(old_bits) + v),
        std::memory_order_relaxed)) {
    }
}

Histogram::Snapshot Histogram::snapshot() const {
    Snapshot snap;
    snap.upper_bounds = upper_bounds_;
    snap.cumulative.assign(upper_bounds_.size() + 1, 0);
    for (std::size_t shard = 0; shard < detail::shard_count(); ++shard) {
        for (std::size_t i = 0; i <= upper_bounds_.size(); ++i) {
            snap.cumulative[i] += word(shard, i).load(std::memory_order_relaxed);
        }
        snap.sum += std::bit_cast<double>(
            word(shard, upper_bounds_.size() + 1).load(std::memory_order_relaxed));
    }
    for (std::size_t i = 1; i < snap.cumulative.size(); ++i) {
        snap.cumulative[i] += snap.cumulative[i - 1];
    }
    snap.count = snap.cumulative.back();
    return snap;
}

// --- families ---

FamilyBase::FamilyBase(std::string name, std::string help, std::vector<std::string> label_names,
                       MetricType type)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      type_(type) {
    if (!is_metric_name(name_)) throw std::invalid_argument("invalid metric name: " + name_);
    for (std::size_t i = 0; i < label_names_.size(); ++i) {
        const std::string& label = label_names_[i];
        if (!is_label_name(label)) {
            throw std::invalid_argument("invalid label name for " + name_ + ": " + label);
        }
        if (type_ == MetricType::kHistogram && label == "le") {
            throw std::invalid_argument("histogram " + name_ + " may not use the label le");
        }
        for (std::size_t j = 0; j < i; ++j) {
            if (label_names_[j] == label) {
                throw std::invalid_argument("duplicate label name for " + name_ + ": " + label);
            }
        }
    }
}

FamilyBase::~FamilyBase() = default;

void FamilyBase::render(std::string& out) const {
    out += "# HELP ";
    out += name_;
    out += ' ';
    append_escaped_help(out, help_);
    out += "\n# TYPE ";
    out += name_;
    out += ' ';
    out += to_string(type_);
    out += '\n';
    render_series(out);
}

namespace {

template <class M>
constexpr MetricType type_of() {
    if constexpr (std::is_same_v<M, Counter>) return MetricType::kCounter;
    if constexpr (std::is_same_v<M, Gauge>) return MetricType::kGauge;
    return MetricType::kHistogram;
}

void render_one(std::string& out, const std::string& name, const std::string& open_labels,
                const Counter& counter) {
    append_sample(out, name, "", open_labels, counter.value());
}

void render_one(std::string& out, const std::string& name, const std::string& open_labels,
                const Gauge& gauge) {
    append_sample(out, name, "", open_labels, gauge.value());
}

void render_one(std::string& out, const std::string& name, const std::string& open_labels,
                const Histogram& histogram) {
    const Histogram::Snapshot snap = histogram.snapshot();
    for (std::size_t i = 0; i < snap.cumulative.size(); ++i) {
        std::string labels = open_labels.empty() ? std::string("{") : open_labels + ',';
        labels += "le=\"";
        append_value(labels, i < snap.upper_bounds.size() ? snap.upper_bounds[i] : HUGE_VAL);
        labels += '"';
        append_sample(out, name, "_bucket", labels, static_cast<double>(snap.cumulative[i]));
    }
    append_sample(out, name, "_sum", open_labels, snap.sum);
    append_sample(out, name, "_count", open_labels, static_cast<double>(snap.count));
}

}  // namespace

template <class M>
Family<M>::Family(std::string name, std::string help, std::vector<std::string> names,
                  std::vector<double> buckets)
    : FamilyBase(std::move(name), std::move(help), std::move(names), type_of<M>()),
      buckets_(std::is_same_v<M, Histogram> ? checked_buckets(std::move(buckets))
                                            : std::vector<double>{}) {
    if (label_names().empty()) labels(std::span<const std::string_view>{});
}

template <class M>
M& Family<M>::labels(std::span<const std::string_view> values) {
    if (values.size() != label_names().size()) {
        throw std::invalid_argument(name() + " takes " + std::to_string(label_names().size()) +
                                    " label values, got " + std::to_string(values.size()));
    }
    {
        std::shared_lock lock(mutex_);
        if (auto it = series_.find(values); it != series_.end()) return *it->second;
    }
    std::unique_lock lock(mutex_);
    if (auto it = series_.find(values); it != series_.end()) return *it->second;
    std::unique_ptr<M> series;
    if constexpr (std::is_same_v<M, Histogram>) {
        series = std::make_unique<Histogram>(buckets_);
    } else {
        series = std::make_unique<M>();
    }
    M& ref = *series;
    series_.emplace(std::vector<std::string>(values.begin(), values.end()), std::move(series));
    return ref;
}

template <class M>
void Family<M>::render_series(std::string& out) const {
    std::shared_lock lock(mutex_);
    for (const auto& [values, series] : series_) {
        render_one(out, name(), open_label_set(label_names(), values), *series);
    }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// --- Registry ---

Registry::Registry(ProcessMetrics process) : process_(process) {}

Registry::~Registry() = default;

template <class M>
Family<M>& Registry::add(std::string name, std::string help, std::vector<std::string> label_names,
                         std::vector<double> buckets, MetricType type) {
    std::lock_guard lock(mutex_);
    for (const auto& family : families_) {
        if (family->name() != name) continue;
        auto* same = dynamic_cast<Family<M>*>(family.get());
        if (same == nullptr || family->type() != type || same->label_names() != label_names ||
            (type == MetricType::kHistogram && same->buckets() != checked_buckets(buckets))) {
            throw std::invalid_argument("metric " + name +
                                        " is already registered with another shape");
        }
        return *same;
    }
    auto family = std::make_unique<Family<M>>(std::move(name), std::move(help),
                                              std::move(label_names), std::move(buckets));
    Family<M>& ref = *family;
    families_.push_back(std::move(family));
    return ref;
}

Family<Counter>& Registry::counter(std::string name, std::string help,
                                   std::vector<std::string> label_names) {
    return add<Counter>(std::move(name), std::move(help), std::move(label_names), {},
                        MetricType::kCounter);
}

Family<Gauge>& Registry::gauge(std::string name, std::string help,
                               std::vector<std::string> label_names) {
    return add<Gauge>(std::move(name), std::move(help), std::move(label_names), {},
                      MetricType::kGauge);
}

Family<Histogram>& Registry::histogram(std::string name, std::string help,
                                       std::vector<std::string> label_names,
                                       std::vector<double> buckets) {
    return add<Histogram>(std::move(name), std::move(help), std::move(label_names),
                          std::move(buckets), MetricType::kHistogram);
}

std::string Registry::render() const {
    std::string out;
    {
        std::lock_guard lock(mutex_);
        for (const auto& family : families_)
            family->render(out);
    }
    if (process_ == ProcessMetrics::kInclude) render_process_metrics(out);
    return out;
}

}  // namespace pgwarden::metrics
