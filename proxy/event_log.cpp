// Event log formatting: text key=value pairs (values quoted when needed) or JSON objects.
#include "proxy/event_log.hpp"

#include <atomic>

#include <nlohmann/json.hpp>
#include <spdlog/sinks/stdout_sinks.h>

namespace pgwarden::proxy::log {
namespace {

std::atomic<Format> g_format{Format::kText};

bool needs_quotes(std::string_view v) {
    if (v.empty()) return true;
    for (char c : v)
        if (c == ' ' || c == '"' || c == '=' || c == '\\' || static_cast<unsigned char>(c) < 0x20) return true;
    return false;
}

void append_text_value(std::string& out, std::string_view v) {
    if (!needs_quotes(v)) {
        out.append(v);
        return;
    }
    out.push_back('"');
    for (char c : v) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (static_cast<unsigned char>(c) < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
                    out += buf;
                } else {
                    out.push_back(c);
                }
        }
    }
    out.push_back('"');
}

}  // namespace

void setup(Format format, const std::string& level) {
    g_format = format;
    auto logger = std::make_shared<spdlog::logger>("pgwarden", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    if (format == Format::kJson)
        logger->set_pattern("{\"ts\":\"%Y-%m-%dT%H:%M:%S.%fZ\",\"level\":\"%l\",%v}", spdlog::pattern_time_type::utc);
    else
        logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %l %v", spdlog::pattern_time_type::utc);
    spdlog::set_default_logger(logger);
    set_level(level);
    spdlog::flush_on(spdlog::level::debug);
}

void set_level(const std::string& level) {
    spdlog::set_level(spdlog::level::from_str(level == "warning" ? "warn" : level));
}

Format format() { return g_format; }

void event(spdlog::level::level_enum level, std::string_view name, std::initializer_list<Field> fields) {
    if (!spdlog::should_log(level)) return;
    std::string line;
    if (g_format == Format::kJson) {
        nlohmann::json j;
        j["event"] = std::string(name);
        for (const auto& [k, v] : fields)
            j[std::string(k)] = std::string(v);
        line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        // The pattern already opened the object; drop our braces.
        line = line.substr(1, line.size() - 2);
    } else {
        line.append(name);
        for (const auto& [k, v] : fields) {
            line.push_back(' ');
            line.append(k);
            line.push_back('=');
            append_text_value(line, v);
        }
    }
    spdlog::log(level, "{}", line);
}

std::string truncate_statement(std::string_view sql, std::size_t max) {
    std::string out;
    out.reserve(std::min(sql.size(), max) + 3);
    bool space = false;
    for (char c : sql) {
        if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
            space = !out.empty();
            continue;
        }
        if (space) out.push_back(' ');
        space = false;
        if (out.size() >= max) {
            out += "...";
            break;
        }
        out.push_back(c);
    }
    return out;
}

}  // namespace pgwarden::proxy::log
