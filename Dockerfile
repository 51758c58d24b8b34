# syntax=docker/dockerfile:1
# The `tandem` binary (coordinator and simulated engine) in a small non-root image.
#   docker build -t tandem:0.1.0 .
#   docker run --rm -p 8000:8000 -v $PWD/tandem.toml:/etc/tandem/tandem.toml:ro tandem:0.1.0
# Kubernetes manifests: deploy/README.md.

# Builder: the toolchain pinned in rust-toolchain.toml (1.95), on Debian trixie like the runtime.
FROM rust:1.95.0-trixie AS builder
# Use the image's toolchain as is: rust-toolchain.toml also lists clippy and rustfmt, which a
# release build does not need and rustup would otherwise download.
ENV RUSTUP_TOOLCHAIN=1.95.0 \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tandem-app \
    && install -D -m 0755 target/release/tandem /out/tandem

# Runtime: Debian slim (glibc, as the builder; `sleep` for preStop hooks). Runs as a numeric
# non-root user so Kubernetes' runAsNonRoot can verify it.
FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/tandem /usr/local/bin/tandem
USER 10001:10001
# 8000: the OpenAI API, /health and /ready (server.listen; /metrics and /admin too unless
# server.admin_listen is set); 9000: the admin listener deploy/ configures (server.admin_listen).
# `tandem sim` uses 8000 too. deploy/ mounts its config at /etc/tandem/config and passes --config.
EXPOSE 8000 9000
ENTRYPOINT ["tandem"]
CMD ["serve", "--config", "/etc/tandem/tandem.toml"]
