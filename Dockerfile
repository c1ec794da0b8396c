# syntax=docker/dockerfile:1
# Build:  docker build -t pgsluice .
# Run:    docker run --rm -p 6432:6432 -p 9930:9930 pgsluice --listen 0.0.0.0:6432 ...
# A non-loopback --listen requires an explicit --auth method (and --users).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and incremental artefacts between builds; the binary is
# copied out because the target mount does not persist into the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pgsluice \
    && cp target/release/pgsluice /usr/local/bin/pgsluice

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgsluice
COPY --from=build /usr/local/bin/pgsluice /usr/local/bin/pgsluice
USER 10001:10001
# 6432: PostgreSQL clients; 9930: admin HTTP and Prometheus /metrics.
EXPOSE 6432 9930
ENTRYPOINT ["pgsluice"]
