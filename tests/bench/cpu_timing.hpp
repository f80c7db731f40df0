// Timing for the micro-benchmarks: thread CPU time (other processes on a busy machine
// count less) and the best of a few repeats (the minimum is the least noisy figure).
#pragma once
#include <time.h>

#include <algorithm>
#include <cstddef>
#include <functional>

namespace pgwarden::bench {

inline double thread_cpu_ns() {
    timespec now{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return static_cast<double>(now.tv_sec) * 1e9 + static_cast<double>(now.tv_nsec);
}

inline double best_ns_per_call(std::size_t calls, const std::function<void()>& run, int repeats = 5) {
    double best = 1e300;
    for (int repeat = 0; repeat < repeats; ++repeat) {
        const double start = thread_cpu_ns();
        run();
        best = std::min(best, (thread_cpu_ns() - start) / static_cast<double>(calls));
    }
    return best;
}

}  // namespace pgwarden::bench
