// The standard process_* metrics (CPU, memory, file descriptors, start time), read from
// /proc/self at scrape time, with the names Prometheus client libraries use.
#pragma once
#include <optional>
#include <string>

namespace pgwarden::metrics {

struct ProcessStats {
    double cpu_seconds = 0;  // user + system
    double resident_memory_bytes = 0;
    double virtual_memory_bytes = 0;
    double start_time_seconds = 0;  // since the Unix epoch
};

// From /proc/self/stat and /proc/stat; nullopt where /proc is missing or unreadable.
std::optional<ProcessStats> read_process_stats();
std::optional<double> count_open_fds();  // entries of /proc/self/fd
std::optional<double> max_fds();         // the soft RLIMIT_NOFILE

// Appends every process_* family it can read; leaves out the ones it cannot.
void render_process_metrics(std::string& out);

}  // namespace pgwarden::metrics
