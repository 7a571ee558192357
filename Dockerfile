# syntax=docker/dockerfile:1
# sms-service image: `docker build -t sms-service .`
# The same image also runs the fake provider: `docker run sms-service fake-provider --bind 0.0.0.0:9000`.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build
# Only what the build reads: the manifest, the lock file, .cargo/, the
# sources, config/ (src/config.rs embeds config/default.toml with include_str!),
# docs/openapi.json (embedded the same way, served at GET /openapi.json),
# and build.rs with proto/ (the gRPC door's code is generated from them, in
# Rust: no protoc needed). Cargo.toml names no tests/ or benches/.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
# .cargo/config.toml: build flags of the allocator (lazy commit, lower RSS).
COPY .cargo ./.cargo
COPY config ./config
COPY docs/openapi.json ./docs/openapi.json
COPY src ./src
# The cache mounts keep downloaded crates and target/ between builds, so a
# source change recompiles only this crate. target/ is a cache mount and not
# part of the image, hence the copy of the binary in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin sms-service \
    && install -m 0755 target/release/sms-service /usr/local/bin/sms-service

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: the provider client verifies TLS against the system roots.
# Not pinned: the Debian security updates of the day are what we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 sms \
    && useradd --system --uid 10001 --gid sms --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sms
COPY --from=builder /usr/local/bin/sms-service /usr/local/bin/sms-service
# For reference only: these defaults are compiled into the binary. Override
# them with SMS__SECTION__KEY variables, or mount a file and pass --config PATH.
COPY config/default.toml /etc/sms-service/default.toml
ENV SMS__HTTP__BIND=0.0.0.0:8080
ENV SMS__GRPC__BIND=0.0.0.0:50051
# Numeric, so that Kubernetes' runAsNonRoot can check it (10001 is sms).
USER 10001:10001
EXPOSE 8080 50051
# No HEALTHCHECK here: the image has no curl, and the port to probe depends on
# the command (run: 8080, fake-provider: its --bind). docker-compose.yml has
# bash-based checks; use GET /healthz and GET /readyz from orchestrators.
ENTRYPOINT ["sms-service"]
CMD ["run"]
