// Session directory: cross-thread questions answered by posting to the session's thread.
#include "proxy/session_directory.hpp"

#include <future>

#include "proxy/client_session.hpp"

namespace pgwarden::proxy {

void SessionDirectory::add(std::uint64_t id, const std::shared_ptr<ClientSession>& session) {
    std::lock_guard lock(mutex_);
    sessions_[id] = session;
}

void SessionDirectory::remove(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    sessions_.erase(id);
}

std::size_t SessionDirectory::size() const {
    std::lock_guard lock(mutex_);
    return sessions_.size();
}

nlohmann::json SessionDirectory::describe_all(std::chrono::milliseconds timeout) const {
    std::vector<std::shared_ptr<ClientSession>> live;
    {
        std::lock_guard lock(mutex_);
        for (const auto& [id, weak] : sessions_)
            if (auto s = weak.lock()) live.push_back(std::move(s));
    }
    std::vector<std::future<nlohmann::json>> answers;
    for (auto& session : live) {
        auto promise = std::make_shared<std::promise<nlohmann::json>>();
        answers.push_back(promise->get_future());
        asio::post(session->executor(), [session, promise] { promise->set_value(session->describe()); });
    }
    nlohmann::json out = nlohmann::json::array();
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (auto& answer : answers)
        if (answer.wait_until(deadline) == std::future_status::ready) out.push_back(answer.get());
    return out;
}

void SessionDirectory::post_to_all(std::function<void(ClientSession&)> action) const {
    std::vector<std::shared_ptr<ClientSession>> live;
    {
        std::lock_guard lock(mutex_);
        for (const auto& [id, weak] : sessions_)
            if (auto s = weak.lock()) live.push_back(std::move(s));
    }
    for (auto& session : live) asio::post(session->executor(), [session, action] { action(*session); });
}

std::optional<std::string> SessionDirectory::run_on(std::uint64_t id,
                                                    std::function<std::string(ClientSession&)> action,
                                                    std::chrono::milliseconds timeout) const {
    std::shared_ptr<ClientSession> session;
    {
        std::lock_guard lock(mutex_);
        auto it = sessions_.find(id);
        if (it == sessions_.end()) return std::nullopt;
        session = it->second.lock();
    }
    if (!session) return std::nullopt;
    auto promise = std::make_shared<std::promise<std::string>>();
    auto answer = promise->get_future();
    asio::post(session->executor(), [session, promise, action = std::move(action)] {
        promise->set_value(action(*session));
    });
    if (answer.wait_for(timeout) != std::future_status::ready) return std::nullopt;
    return answer.get();
}

}  // namespace pgwarden::proxy
