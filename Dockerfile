# syntax=docker/dockerfile:1
# Multi-stage build: compile with the full Rust toolchain (librdkafka is built from source by
# the rdkafka crate: it needs a C toolchain, OpenSSL's headers and libcurl's for OIDC), run on a
# slim base as non-root.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev libcurl4-openssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Everything the manifest names must be here: it declares a [[bench]] (benches/), and cargo
# refuses a manifest whose targets are missing. scripts/docker-replay replays this stage in CI.
COPY Cargo.toml Cargo.lock build.rs ./
COPY benches ./benches
# The dependencies (librdkafka among them) in a layer of their own, built against stub sources:
# a change to src/ does not rebuild them.
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --locked --release --bin im-relay \
 && rm -rf src
# The commit, for im_relay_build_info (there is no .git in the build context). After the
# dependency layer: an argument changes every layer below it, and a new commit must not
# rebuild librdkafka.
ARG GIT_SHA=unknown
ENV IM_RELAY_GIT_SHA=$GIT_SHA
COPY src ./src
# The records' JSON Schemas are compiled in (normalize::SCHEMAS).
COPY schema ./schema
# COPY keeps the context's mtimes, older than the stub build: touch so cargo rebuilds the crate.
RUN touch src/main.rs src/lib.rs \
 && cargo build --locked --release --bin im-relay \
 && cp target/release/im-relay /src/im-relay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay \
 && mkdir -p /var/lib/im-relay/spool \
 && chown 10001 /var/lib/im-relay/spool
COPY --from=build /src/im-relay /usr/local/bin/im-relay
USER 10001
# No transparent huge pages for the process (mimalloc turns them off with prctl), also on
# hosts where THP is `always`; the build only stops mimalloc asking for them: ~13 MiB less
# RSS, same CPU (BENCHMARKS.md).
ENV MIMALLOC_ALLOW_THP=0 \
    IM_RELAY_LISTEN=0.0.0.0:8080 \
    IM_RELAY_ADMIN_LISTEN=0.0.0.0:8081 \
    IM_RELAY_SPOOL_DIR=/var/lib/im-relay/spool
# The durable spool: acknowledged callbacks not yet in Kafka. Keep it on a persistent volume.
VOLUME ["/var/lib/im-relay/spool"]
EXPOSE 8080 8081
# Ready = serving and not draining; bash's /dev/tcp avoids shipping curl. The port is the one
# IM_RELAY_ADMIN_LISTEN names (its default here, or what the container is given).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${IM_RELAY_ADMIN_LISTEN##*:} && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
ENTRYPOINT ["im-relay"]
CMD ["serve"]
