// One client connection from accept to close: startup (TLS, cancel, the startup packet),
// connecting to PostgreSQL, relaying authentication, then two relay loops (client to
// server and server to client) that frame messages and forward them, batched, without
// copying the bodies they need not read.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "proxy/asio.hpp"
#include "proxy/async_mutex.hpp"
#include "proxy/interceptor.hpp"
#include "proxy/buffer.hpp"
#include "proxy/runtime.hpp"
#include "proxy/server_connection.hpp"
#include "proxy/stream.hpp"
#include "wire/builder.hpp"
#include "wire/frame.hpp"
#include "wire/messages.hpp"

namespace pgwarden::proxy {

// Where a session is; transitions happen in client_session.cpp only.
enum class SessionState {
    kStartup,        // reading the startup packet, TLS negotiation
    kConnecting,     // opening the server connection
    kAuthenticating, // relaying authentication
    kIdle,           // ReadyForQuery 'I' sent to the client
    kInTransaction,  // ReadyForQuery 'T'
    kFailedTransaction,  // ReadyForQuery 'E'
    kClosing,
};
const char* to_string(SessionState state);

class ClientSession : public std::enable_shared_from_this<ClientSession> {
public:
    ClientSession(Runtime& runtime, tcp::socket socket);
    ~ClientSession();

    awaitable<void> run();

    std::uint64_t id() const { return id_; }
    asio::any_io_executor executor() { return client_.socket().get_executor(); }
    // A JSON description for GET /api/clients; call on the session's thread.
    nlohmann::json describe() const;
    // Dooms the current transaction (POST /api/clients/{id}/doom); "" on success, else why not.
    std::string doom(const std::string& reason);
    // pgwarden is stopping: end the session as soon as no transaction is open.
    void begin_shutdown();

private:
    // Result of a relay loop: why it ended.
    enum class End { kClientClosed, kServerClosed, kClientProtocolError, kServerProtocolError, kTerminated, kShutdown };

    awaitable<bool> startup();
    awaitable<std::optional<wire::StartupPacket>> read_startup_packet();
    awaitable<void> handle_cancel(const wire::StartupPacket& packet);
    awaitable<bool> authenticate();
    awaitable<End> relay();
    awaitable<End> relay_client_to_server();
    awaitable<End> relay_server_to_client();

    // Reads until one whole message is at the front of `buffer`; nullopt on EOF/error or
    // a message over `max_length` (then `violation` is set).
    awaitable<std::optional<wire::FrameHeader>> read_message(Stream& stream, Buffer& buffer, std::size_t max_length,
                                                             bool& violation);
    awaitable<void> send_to_client(const std::string& bytes);
    // Writes to the client from a relay loop, serialized with the other loop.
    template <class Buffers>
    awaitable<void> write_client(const Buffers& buffers, error_code& ec) {
        if (!client_write_.try_lock()) co_await client_write_.lock();
        co_await client_.write(buffers, ec);
        client_write_.unlock();
    }
    awaitable<void> send_fatal(const std::string& sqlstate, const std::string& message,
                               const std::string& detail = {});
    // A client broke the protocol before the relay began: logged, counted, told (08P01).
    awaitable<void> reject_client_violation(const std::string& reason, const std::string& detail);
    void set_state(SessionState state);
    // idle_timeout: armed whenever the client sits idle inside a transaction block.
    void arm_idle_timer();
    void note_client_activity();
    // Holds a throttled statement until `until`; false when the client left meanwhile.
    awaitable<bool> wait_for_throttle(std::chrono::steady_clock::time_point until);
    awaitable<void> roll_back_idle_transaction(std::uint64_t activity);
    // Holds a client message while the interceptor says it must wait for the server's
    // answers (Interceptor::must_wait_for_server); false when the relay is stopping.
    awaitable<bool> wait_for_server(char type, std::string_view message);
    void close_all();

    Runtime& runtime_;
    std::shared_ptr<const policy::Config> config_;
    std::uint64_t id_;
    Stream client_;
    Buffer client_buffer_;
    std::unique_ptr<ServerConnection> server_;
    SessionState state_ = SessionState::kStartup;
    bool counted_unauthenticated_ = false;
    bool server_said_goodbye_ = false;  // a FATAL from the server was relayed
    bool relay_stopping_ = false;       // one relay direction ended; the other must stop too
    bool shutting_down_ = false;
    void end_if_quiet_for_shutdown();
    std::int32_t client_secret_ = 0;
    std::string peer_address_;
    std::string user_, database_, application_name_;
    std::vector<std::pair<std::string, std::string>> startup_parameters_;
    std::vector<std::pair<std::string, std::string>> reported_parameters_;  // by the server, at startup
    std::unique_ptr<Interceptor> interceptor_;
    AsyncMutex client_write_;  // both relay loops write to the client
    AsyncMutex server_write_;  // the client loop and the idle-timeout rollback write to the server
    std::unique_ptr<asio::steady_timer> idle_timer_;
    // wait_for_server() sleeps on it; the server loop cancels it after each batch it relays.
    std::unique_ptr<asio::steady_timer> server_answered_;
    std::uint64_t client_activity_ = 0;  // bumped by every read from the client
    std::chrono::steady_clock::time_point started_;
    std::chrono::steady_clock::time_point transaction_started_{};  // when the current block began
};

// Starts a session on the socket's executor; it owns itself until it ends.
void start_session(Runtime& runtime, tcp::socket socket);

}  // namespace pgwarden::proxy
