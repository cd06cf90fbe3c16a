# deriva-server in a container: the nodes of docker-compose.monitoring.yml's `cluster` profile
# (`docker compose -f docker-compose.monitoring.yml --profile cluster up -d --build`).
#
#   docker build -t deriva-server:dev .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9090:9090 deriva-server:dev
#
# The container listens on every interface (DERIVA_LISTEN, DERIVA_METRICS_ADDR below): publish
# its ports on 127.0.0.1, or behind something that authenticates, as the README says of
# --listen and --metrics-addr. Flags after the image name go to deriva-server.

# The toolchain the workspace is checked with (rust-version in Cargo.toml is the minimum).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# deriva-proto compiles its .proto with a vendored protoc: no system package needed.
# (No BuildKit cache mounts: the classic builder of docker-compose v1 builds this file too.)
RUN cargo build --release --locked -p deriva-server --bin deriva-server \
    && cp target/release/deriva-server /usr/local/bin/deriva-server

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/deriva --create-home deriva
COPY --from=build /usr/local/bin/deriva-server /usr/local/bin/deriva-server
USER deriva
WORKDIR /var/lib/deriva
ENV DERIVA_DATA_DIR=/var/lib/deriva \
    DERIVA_LISTEN=0.0.0.0:50051 \
    DERIVA_METRICS_ADDR=0.0.0.0:9090
VOLUME /var/lib/deriva
# gRPC, then /metrics and the health endpoints.
EXPOSE 50051 9090
ENTRYPOINT ["deriva-server"]
