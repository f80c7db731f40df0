// Routes CancelRequests. Clients get the server's real process id (applications compare
// it with pg_backend_pid()) but a secret of pgwarden's own; this table maps that pair back
// to the secret the server expects. Touched only at connect, disconnect and cancel.
#pragma once
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace pgwarden::proxy {

class CancelRegistry {
public:
    struct Target {
        std::int32_t process_id = 0;
        std::int32_t server_secret = 0;
    };

    // Registers a session's server key and returns the secret to give its client.
    std::int32_t add(std::int32_t process_id, std::int32_t server_secret);
    void remove(std::int32_t process_id, std::int32_t client_secret);
    std::optional<Target> find(std::int32_t process_id, std::int32_t client_secret) const;
    std::size_t size() const;

private:
    static std::uint64_t key(std::int32_t pid, std::int32_t secret) {
        return (std::uint64_t(std::uint32_t(pid)) << 32) | std::uint32_t(secret);
    }
    mutable std::mutex mutex_;
    std::unordered_map<std::uint64_t, Target> targets_;
};

}  // namespace pgwarden::proxy
