# syntax=docker/dockerfile:1

# Build stage: the Rust toolchain, with dependencies compiled in their own layer so that a change
# under src/ rebuilds only this crate.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /build

# Bench, test and example targets are not part of the image. Dropping their manifest sections lets
# both builds below run without those sources; the dependency set (and so Cargo.lock) is unchanged.
COPY Cargo.toml Cargo.lock ./
RUN awk '/^\[/ { skip = ($0 ~ /^\[\[(bench|test|example)\]\]/) } !skip' Cargo.toml > Cargo.image.toml \
    && mv Cargo.image.toml Cargo.toml \
    && mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# COPY keeps the sources' old timestamps; touching them makes cargo rebuild the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/openrouter-proxy /usr/local/bin/openrouter-proxy

# The example config listens on loopback, which suits a sidecar but not a container reached
# through a published port. The image ships the same file with both listeners on 0.0.0.0.
COPY proxy.toml ./proxy.toml
RUN sed -E 's/^(listen|admin_listen)([[:space:]]*=[[:space:]]*)"127\.0\.0\.1:/\1\2"0.0.0.0:/' proxy.toml > proxy.container.toml \
    && grep -Eq '^listen[[:space:]]*=[[:space:]]*"0\.0\.0\.0:' proxy.container.toml \
    && grep -Eq '^admin_listen[[:space:]]*=[[:space:]]*"0\.0\.0\.0:' proxy.container.toml

# Runtime stage: glibc and libgcc only, no shell, no package manager. TLS roots are compiled into
# the binary, so no CA bundle is needed. The nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/openrouter-proxy /usr/local/bin/openrouter-proxy
COPY --from=build /build/proxy.container.toml /etc/openrouter-proxy/proxy.toml
USER 65532:65532
# 8080: the OpenAI-compatible API under /v1. 9090: /metrics, /healthz, /readyz.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/openrouter-proxy"]
CMD ["--config", "/etc/openrouter-proxy/proxy.toml"]
