// A time limit on an operation that cannot be cancelled any other way than by closing
// its socket: when the deadline passes first, `expire` runs (and typically closes the
// socket, which fails the pending operation). Boost 1.74 has no awaitable operators,
// so this is how pgwarden bounds connects, handshakes and farewells.
#pragma once
#include <chrono>
#include <functional>
#include <memory>

#include "proxy/asio.hpp"

namespace pgwarden::proxy {

class Deadline {
public:
    Deadline(const asio::any_io_executor& executor, std::chrono::steady_clock::duration after,
             std::function<void()> expire)
        : state_(std::make_shared<State>(executor, std::move(expire))) {
        state_->timer.expires_after(after);
        state_->timer.async_wait([state = state_](const boost::system::error_code& ec) {
            if (ec || state->disarmed) return;
            state->expired = true;
            state->expire();
        });
    }
    ~Deadline() { disarm(); }
    Deadline(const Deadline&) = delete;
    Deadline& operator=(const Deadline&) = delete;

    // After this, `expire` will not run.
    void disarm() {
        if (state_->disarmed) return;
        state_->disarmed = true;
        state_->timer.cancel();
    }
    bool expired() const { return state_->expired; }

private:
    struct State {
        State(const asio::any_io_executor& executor, std::function<void()> fn)
            : timer(executor), expire(std::move(fn)) {}
        asio::steady_timer timer;
        std::function<void()> expire;
        bool disarmed = false;
        bool expired = false;
    };
    std::shared_ptr<State> state_;
};

}  // namespace pgwarden::proxy
