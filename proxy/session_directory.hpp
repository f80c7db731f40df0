// Every live session, for the admin API: listing clients and reaching one to doom its
// transaction. Sessions register at login and leave at close (not on the hot path);
// questions are posted to each session's own thread, so nothing reads session state
// from another thread.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxy/asio.hpp"

namespace pgwarden::proxy {

class ClientSession;

class SessionDirectory {
public:
    void add(std::uint64_t id, const std::shared_ptr<ClientSession>& session);
    void remove(std::uint64_t id);
    std::size_t size() const;

    // Describes every session (as JSON objects), waiting at most `timeout` for each
    // session's thread to answer.
    nlohmann::json describe_all(std::chrono::milliseconds timeout) const;
    // Runs `action` on session `id`'s thread and returns its answer; nullopt when no
    // such session exists (or it ended before answering).
    std::optional<std::string> run_on(std::uint64_t id, std::function<std::string(ClientSession&)> action,
                                      std::chrono::milliseconds timeout) const;

    // Posts `action` to every live session's thread (no waiting).
    void post_to_all(std::function<void(ClientSession&)> action) const;

private:
    mutable std::mutex mutex_;
    std::unordered_map<std::uint64_t, std::weak_ptr<ClientSession>> sessions_;
};

}  // namespace pgwarden::proxy
