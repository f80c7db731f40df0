# pgwarden image: compiled from source on Debian bookworm, runs as an unprivileged user.
# Dependencies come from scripts/install-deps in both stages, as everywhere else.
#   docker build -t pgwarden .
#   docker run -p 6432:6432 -p 9187:9187 \
#       -v $PWD/my.toml:/etc/pgwarden/pgwarden.toml:ro pgwarden
# Arguments after the image name replace the default CMD below (the listen addresses);
# keep --listen 0.0.0.0:6432 --admin-listen 0.0.0.0:9187 among them to stay reachable.

FROM debian:bookworm AS build
WORKDIR /src
# Dependencies in a layer of their own, so editing the source does not reinstall them.
COPY scripts/install-deps scripts/install-deps
RUN scripts/install-deps --build && rm -rf /var/lib/apt/lists/*
COPY . .
# Only the proxy binary: the image needs no tests. Debug info stays in the build stage.
RUN scripts/build --release pgwarden \
    && strip --strip-debug -o /pgwarden build/proxy/pgwarden

FROM debian:bookworm-slim
COPY scripts/install-deps /usr/local/lib/pgwarden/install-deps
RUN /usr/local/lib/pgwarden/install-deps --runtime \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgwarden
COPY --from=build /pgwarden /usr/local/bin/pgwarden
COPY configs/ /etc/pgwarden/
USER pgwarden
EXPOSE 6432 9187
# The admin listener's /healthz over bash's /dev/tcp: the runtime stage has no curl.
# Set PGWARDEN_HEALTH_PORT when the admin listener is moved to another port.
ENV PGWARDEN_HEALTH_PORT=9187
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PGWARDEN_HEALTH_PORT} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $status == HTTP/*' 200'* ]]"]
ENTRYPOINT ["/usr/local/bin/pgwarden", "-c", "/etc/pgwarden/pgwarden.toml"]
# Inside a container the listeners must face the container's network, not its loopback.
CMD ["--listen", "0.0.0.0:6432", "--admin-listen", "0.0.0.0:9187"]
