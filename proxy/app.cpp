// Process lifetime: configuration loading with command-line overrides, signals, listeners.
#include "proxy/app.hpp"

#include <chrono>
#include <iostream>

#include "pgwarden_version.hpp"
#include "metrics/proxy_metrics.hpp"
#include "proxy/admin_http.hpp"
#include "proxy/asio.hpp"
#include "proxy/client_session.hpp"
#include "proxy/deadline.hpp"
#include "proxy/event_log.hpp"
#include "proxy/listener.hpp"
#include "proxy/runtime.hpp"
#include "proxy/systemd_notify.hpp"

namespace pgwarden::proxy {

std::optional<policy::Config> load_configuration(const std::string& file, const CommandLine& overrides,
                                                 std::vector<std::string>& problems) {
    policy::LoadResult loaded;
    if (file.empty())
        loaded = policy::load_config_text("", "<defaults>");
    else
        loaded = policy::load_config_file(file);
    for (const auto& e : loaded.errors) problems.push_back(e.to_string());
    if (!loaded.config) return std::nullopt;
    policy::Config config = std::move(*loaded.config);

    auto endpoint = [&](const std::string& text, const char* flag, policy::Endpoint& into) {
        if (text.empty()) return;
        auto parsed = policy::parse_endpoint(text);
        if (!parsed)
            problems.push_back(std::string("--") + flag + ": expected HOST:PORT, got '" + text + "'");
        else
            into = *parsed;
    };
    endpoint(overrides.listen, "listen", config.proxy.listen);
    endpoint(overrides.upstream, "upstream", config.proxy.upstream);
    endpoint(overrides.admin_listen, "admin-listen", config.admin.listen);
    if (!overrides.log_format.empty()) config.log.format = overrides.log_format;
    if (!overrides.log_level.empty()) config.log.level = overrides.log_level;
    if (!problems.empty()) return std::nullopt;
    return config;
}

int run(policy::Config config, const std::string& config_file, const CommandLine& overrides) {
    log::setup(config.log.format == "json" ? log::Format::kJson : log::Format::kText, config.log.level);
    std::unique_ptr<Runtime> runtime;
    try {
        runtime = std::make_unique<Runtime>(config);
    } catch (const std::exception& e) {
        log::error("startup_failed", {{"error", e.what()}});
        return 1;
    }

    asio::io_context main_context{1};
    std::unique_ptr<Listener> listener;
    try {
        listener = std::make_unique<Listener>(main_context, *runtime, config.proxy.listen, config.proxy.threads,
                                              config.proxy.io_uring);
    } catch (const std::exception& e) {
        log::error("listen_failed", {{"listen", config.proxy.listen.to_string()}, {"error", e.what()}});
        return 1;
    }
    auto& metrics = metrics::proxy_metrics();
    metrics.clients.set_max_clients(config.metrics.max_clients);

    std::unique_ptr<AdminServer> admin;
    // SIGHUP and POST /api/reload: validate first, swap whole, keep the old one on error.
    auto reload = [&]() -> std::pair<bool, std::string> {
        notify_service_manager(notify_reloading_message());
        struct Ready {
            ~Ready() { notify_service_manager(kNotifyReady); }
        } ready_again;
        std::vector<std::string> problems;
        auto fresh = load_configuration(config_file, overrides, problems);
        if (!fresh) {
            std::string all;
            for (const auto& p : problems) all += (all.empty() ? "" : "; ") + p;
            log::error("config_reload_failed", {{"file", config_file}, {"errors", all}});
            metrics.config_reload(metrics::ReloadResult::kFailure).inc();
            return {false, all};
        }
        log::set_level(fresh->log.level);
        metrics.clients.set_max_clients(fresh->metrics.max_clients);
        if (admin) admin->set_token(fresh->admin.token);
        runtime->set_config(std::move(*fresh));
        log::info("config_reloaded", {{"file", config_file}});
        metrics.config_reload(metrics::ReloadResult::kSuccess).inc();
        return {true, "configuration reloaded"};
    };

    // Readiness: can a TCP connection to the upstream be opened right now?
    std::atomic<bool> upstream_ready{false};
    auto probe_upstream = [&]() -> awaitable<void> {
        asio::steady_timer pause(main_context);
        for (;;) {
            auto upstream = runtime->config()->proxy.upstream;
            tcp::socket socket(main_context);
            boost::system::error_code ec;
            tcp::resolver resolver(main_context);
            auto endpoints = co_await resolver.async_resolve(upstream.host, std::to_string(upstream.port),
                                                             asio::redirect_error(asio::use_awaitable, ec));
            if (!ec) {
                Deadline deadline(main_context.get_executor(), std::chrono::seconds(1), [&socket] {
                    boost::system::error_code ignored;
                    socket.close(ignored);
                });
                co_await asio::async_connect(socket, endpoints, asio::redirect_error(asio::use_awaitable, ec));
                if (deadline.expired()) ec = asio::error::timed_out;
            }
            bool now_ready = !ec;
            if (now_ready != upstream_ready.exchange(now_ready))
                log::info(now_ready ? "upstream_reachable" : "upstream_unreachable",
                          {{"upstream", upstream.to_string()}, {"error", ec ? ec.message() : ""}});
            boost::system::error_code ignored;
            socket.close(ignored);
            pause.expires_after(std::chrono::seconds(1));
            co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
            if (ec) co_return;
        }
    };
    asio::co_spawn(main_context, probe_upstream(), asio::detached);

    if (config.admin.enabled) {
        AdminHandlers handlers;
        handlers.metrics = [&] { return metrics.registry.render(); };
        handlers.ready = [&] { return upstream_ready.load(); };
        handlers.clients = [&] { return runtime->sessions().describe_all(std::chrono::seconds(1)); };
        handlers.doom = [&](std::uint64_t id, const std::string& reason) -> std::optional<std::string> {
            auto answer = runtime->sessions().run_on(
                id, [reason](ClientSession& session) { return session.doom(reason); }, std::chrono::seconds(2));
            if (!answer) return std::string("no such client");
            if (!answer->empty()) return *answer;
            return std::nullopt;
        };
        handlers.reload = reload;
        handlers.throttles = [&] {
            auto policies = runtime->policies();
            return policies->throttle ? policies->throttle->describe() : nlohmann::json::array();
        };
        try {
            admin = std::make_unique<AdminServer>(main_context, config.admin, std::move(handlers));
            admin->start();
        } catch (const std::exception& e) {
            log::error("admin_listen_failed", {{"listen", config.admin.listen.to_string()}, {"error", e.what()}});
            return 1;
        }
        log::info("admin_listening", {{"listen", admin->local_endpoint().address().to_string() + ":" +
                                                     std::to_string(admin->local_endpoint().port())}});
    }
    listener->start();
    notify_service_manager(kNotifyReady);
    log::info("listening", {{"listen", config.proxy.listen.to_string()},
                            {"upstream", config.proxy.upstream.to_string()},
                            {"threads", std::to_string(listener->thread_count())},
                            {"io", listener->io_mode()},
                            {"version", PGWARDEN_VERSION}});

    asio::signal_set signals(main_context, SIGHUP, SIGTERM, SIGINT);
    auto drain = [&]() -> awaitable<void> {
        // Open sessions get shutdown_timeout to finish; then everything stops.
        auto deadline = std::chrono::steady_clock::now() + runtime->config()->proxy.shutdown_timeout;
        asio::steady_timer timer(main_context);
        // Sessions without an open transaction end now; the others when theirs ends.
        runtime->sessions().post_to_all([](ClientSession& session) { session.begin_shutdown(); });
        while (runtime->sessions().size() > 0 && std::chrono::steady_clock::now() < deadline) {
            timer.expires_after(std::chrono::milliseconds(50));
            co_await timer.async_wait(asio::use_awaitable);
        }
        main_context.stop();
    };
    auto handle_signals = [&]() -> awaitable<void> {
        bool shutting_down = false;
        for (;;) {
            int signo = co_await signals.async_wait(asio::use_awaitable);
            if (signo == SIGHUP) {
                reload();
                continue;
            }
            if (shutting_down) {
                log::warn("shutdown_forced", {});
                main_context.stop();
                co_return;
            }
            shutting_down = true;
            runtime->shutting_down = true;
            notify_service_manager(kNotifyStopping);
            listener->stop_accepting();
            log::info("shutdown_started", {{"signal", signo == SIGINT ? "SIGINT" : "SIGTERM"},
                                           {"open_sessions", std::to_string(runtime->client_connections.load())}});
            asio::co_spawn(main_context, drain(), asio::detached);
        }
    };
    asio::co_spawn(main_context, handle_signals(), asio::detached);
    main_context.run();
    if (admin) admin->stop();
    listener->stop_workers();
    log::info("shutdown_complete", {{"open_sessions", std::to_string(runtime->client_connections.load())}});
    return 0;
}

}  // namespace pgwarden::proxy
