# syntax=docker/dockerfile:1
# dualsync image: one binary, used by the relay and apply services in
# docker-compose.yml (`dualsync relay ...`, `dualsync apply ...`).

# ---- build ------------------------------------------------------------------
# Pinned: the toolchain the repository is tested with locally (rustc 1.95.0).
FROM rust:1.95.0-bookworm AS builder
WORKDIR /src
# rdkafka-sys builds librdkafka from source with its ./configure script
# (make, C/C++ compiler, pkg-config, zlib and OpenSSL headers: all already in
# the rust:bookworm image).
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dualsync \
    && install -D -m 0755 target/release/dualsync /out/dualsync

# ---- runtime ----------------------------------------------------------------
FROM debian:12.8-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin dualsync
WORKDIR /app
COPY --from=builder /out/dualsync /usr/local/bin/dualsync
COPY connectors/ /app/connectors/
COPY schemas/ /app/schemas/
USER dualsync
ENV RUST_LOG=info
# docker-compose.yml passes the full command, e.g. `dualsync relay --config
# connectors/demo.toml` (paths relative to /app).
CMD ["dualsync", "--help"]
