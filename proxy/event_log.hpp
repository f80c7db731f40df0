// One log line per event, as text ("event key=value ...") or JSON, through spdlog.
// Fields are given as (key, value) pairs so that both formats come from one call site.
#pragma once
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include <spdlog/spdlog.h>

namespace pgwarden::proxy::log {

using Field = std::pair<std::string_view, std::string_view>;

enum class Format { kText, kJson };
// Sets up the default spdlog logger on stderr. Level names as in the config.
void setup(Format format, const std::string& level);
void set_level(const std::string& level);
Format format();

void event(spdlog::level::level_enum level, std::string_view name, std::initializer_list<Field> fields);
inline void debug(std::string_view name, std::initializer_list<Field> fields = {}) {
    if (spdlog::should_log(spdlog::level::debug)) event(spdlog::level::debug, name, fields);
}
inline void info(std::string_view name, std::initializer_list<Field> fields = {}) {
    event(spdlog::level::info, name, fields);
}
inline void warn(std::string_view name, std::initializer_list<Field> fields = {}) {
    event(spdlog::level::warn, name, fields);
}
inline void error(std::string_view name, std::initializer_list<Field> fields = {}) {
    event(spdlog::level::err, name, fields);
}

// A statement shortened for logs: at most `max` bytes, whitespace runs folded.
std::string truncate_statement(std::string_view sql, std::size_t max = 200);

}  // namespace pgwarden::proxy::log
