// Serializes writes to one socket between the two relay coroutines of a session (they
// run on one thread, but an async_write can be interleaved at its suspension points).
// The uncontended path is a flag test; waiters queue in arrival order.
#pragma once
#include <deque>
#include <memory>

#include "proxy/asio.hpp"

namespace pgwarden::proxy {

class AsyncMutex {
public:
    awaitable<void> lock() {
        while (locked_) {
            auto waiter = std::make_shared<asio::steady_timer>(co_await asio::this_coro::executor,
                                                               asio::steady_timer::time_point::max());
            waiters_.push_back(waiter);
            boost::system::error_code ec;
            co_await waiter->async_wait(asio::redirect_error(asio::use_awaitable, ec));
        }
        locked_ = true;
    }
    bool try_lock() {
        if (locked_) return false;
        locked_ = true;
        return true;
    }
    void unlock() {
        locked_ = false;
        if (!waiters_.empty()) {
            waiters_.front()->cancel();
            waiters_.pop_front();
        }
    }

private:
    bool locked_ = false;
    std::deque<std::shared_ptr<asio::steady_timer>> waiters_;
};

}  // namespace pgwarden::proxy
