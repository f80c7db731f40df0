// process_* metrics from /proc (see proc(5) for the field positions of /proc/self/stat).
#include "metrics/process.hpp"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <charconv>
#include <fstream>
#include <sstream>
#include <string_view>
#include <vector>

#include "metrics/registry.hpp"

namespace pgwarden::metrics {

namespace {

std::optional<std::string> read_file(const char* path) {
    std::ifstream in(path);
    if (!in) return std::nullopt;
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

std::optional<double> boot_time_seconds() {
    const auto stat = read_file("/proc/stat");
    if (!stat) return std::nullopt;
    std::istringstream lines(*stat);
    std::string line;
    while (std::getline(lines, line)) {
        if (line.starts_with("btime ")) {
            double seconds = 0;
            const char* first = line.data() + 6;
            const auto result = std::from_chars(first, line.data() + line.size(), seconds);
            if (result.ec == std::errc()) return seconds;
        }
    }
    return std::nullopt;
}

void append_family(std::string& out, std::string_view name, std::string_view type,
                   std::string_view help, double value) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
    out += name;
    out += ' ';
    append_value(out, value);
    out += '\n';
}

}  // namespace

std::optional<ProcessStats> read_process_stats() {
    const auto stat = read_file("/proc/self/stat");
    if (!stat) return std::nullopt;
    // The command name (field 2) is in parentheses and may hold spaces or ')', so fields
    // are counted from the last ')'.
    const std::size_t close = stat->rfind(')');
    if (close == std::string::npos) return std::nullopt;
    std::istringstream rest(stat->substr(close + 1));
    std::vector<std::string> fields;  // fields[0] is field 3 (state)
    for (std::string field; rest >> field;)
        fields.push_back(field);
    auto field = [&](int number) -> std::optional<double> {
        const std::size_t index = static_cast<std::size_t>(number - 3);
        if (index >= fields.size()) return std::nullopt;
        double value = 0;
        const std::string& text = fields[index];
        const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
        if (result.ec != std::errc()) return std::nullopt;
        return value;
    };
    const auto utime = field(14), stime = field(15), starttime = field(22), vsize = field(23),
               rss_pages = field(24);
    const auto boot = boot_time_seconds();
    if (!utime || !stime || !starttime || !vsize || !rss_pages || !boot) return std::nullopt;

    const auto ticks_per_second = static_cast<double>(sysconf(_SC_CLK_TCK));
    const auto page_size = static_cast<double>(sysconf(_SC_PAGESIZE));
    if (ticks_per_second <= 0 || page_size <= 0) return std::nullopt;
    ProcessStats stats;
    stats.cpu_seconds = (*utime + *stime) / ticks_per_second;
    stats.resident_memory_bytes = *rss_pages * page_size;
    stats.virtual_memory_bytes = *vsize;
    stats.start_time_seconds = *boot + *starttime / ticks_per_second;
    return stats;
}

std::optional<double> count_open_fds() {
    DIR* dir = opendir("/proc/self/fd");
    if (dir == nullptr) return std::nullopt;
    const int own_fd = dirfd(dir);
    double count = 0;
    while (const dirent* entry = readdir(dir)) {
        const std::string_view name = entry->d_name;
        if (name == "." || name == "..") continue;
        int fd = -1;
        std::from_chars(name.data(), name.data() + name.size(), fd);
        if (fd != own_fd) ++count;  // the listing's own descriptor is not the process's
    }
    closedir(dir);
    return count;
}

std::optional<double> max_fds() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return std::nullopt;
    if (limit.rlim_cur == RLIM_INFINITY) return std::nullopt;
    return static_cast<double>(limit.rlim_cur);
}

void render_process_metrics(std::string& out) {
    if (const auto stats = read_process_stats()) {
        append_family(out, "process_cpu_seconds_total", "counter",
                      "CPU time used by the process, user plus system, in seconds.",
                      stats->cpu_seconds);
        append_family(out, "process_resident_memory_bytes", "gauge",
                      "Memory the process holds in RAM, in bytes.", stats->resident_memory_bytes);
        append_family(out, "process_virtual_memory_bytes", "gauge",
                      "Address space the process has mapped, in bytes.",
                      stats->virtual_memory_bytes);
        append_family(out, "process_start_time_seconds", "gauge",
                      "When the process started, in seconds since the Unix epoch.",
                      stats->start_time_seconds);
    }
    if (const auto open = count_open_fds()) {
        append_family(out, "process_open_fds", "gauge", "File descriptors the process has open.",
                      *open);
    }
    if (const auto limit = max_fds()) {
        append_family(out, "process_max_fds", "gauge",
                      "Soft limit on open file descriptors (RLIMIT_NOFILE).", *limit);
    }
}

}  // namespace pgwarden::metrics
