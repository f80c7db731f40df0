// Cancel key table; secrets come from OpenSSL's CSPRNG so they cannot be guessed.
#include "proxy/cancel_registry.hpp"

#include <openssl/rand.h>

namespace pgwarden::proxy {

std::int32_t CancelRegistry::add(std::int32_t process_id, std::int32_t server_secret) {
    std::lock_guard lock(mutex_);
    for (;;) {
        std::int32_t secret = 0;
        if (RAND_bytes(reinterpret_cast<unsigned char*>(&secret), sizeof secret) != 1) secret = server_secret ^ 0x5a5a5a5a;
        if (targets_.emplace(key(process_id, secret), Target{process_id, server_secret}).second) return secret;
    }
}

void CancelRegistry::remove(std::int32_t process_id, std::int32_t client_secret) {
    std::lock_guard lock(mutex_);
    targets_.erase(key(process_id, client_secret));
}

std::optional<CancelRegistry::Target> CancelRegistry::find(std::int32_t process_id,
                                                           std::int32_t client_secret) const {
    std::lock_guard lock(mutex_);
    auto it = targets_.find(key(process_id, client_secret));
    if (it == targets_.end()) return std::nullopt;
    return it->second;
}

std::size_t CancelRegistry::size() const {
    std::lock_guard lock(mutex_);
    return targets_.size();
}

}  // namespace pgwarden::proxy
