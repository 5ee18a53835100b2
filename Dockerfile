# berth in a container: built with cargo, run as a non-root user in a
# minimal runtime image (distroless: glibc and libgcc, no shell).
#
#   docker build -t berth --build-arg BERTH_COMMIT="$(git rev-parse --short=12 HEAD)" .
#   docker run --rm --stop-timeout 30 -p 8080:8080 -p 8443:8443 -p 9900:9900 \
#       -v "$PWD/berth.toml:/etc/berth/berth.toml:ro" berth
#
# The image's own /etc/berth/berth.toml (packaging/docker/berth.toml) is a
# starting point: mount your config over it. `docker kill -s HUP` reloads it;
# `docker stop` sends SIGTERM, and berth drains for up to shutdown_window +
# close_timeout (15 s with the defaults), longer than docker's default 10 s
# grace: hence --stop-timeout 30.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# Cargo.toml declares the load generator bench target; cargo wants its source
# present even when it builds only the binary.
COPY benches/loadgen ./benches/loadgen
# No .git is copied: the commit for `berth --version` comes from this build
# argument, or reads "unknown".
ARG BERTH_COMMIT=
ENV BERTH_GIT_COMMIT=${BERTH_COMMIT}
RUN cargo build --release --locked --bin berth \
    && strip --strip-debug target/release/berth

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/berth /usr/local/bin/berth
COPY packaging/docker/berth.toml /etc/berth/berth.toml
# The repository's self-signed example certificate, for a first try only:
# mount your own certificate and key and point the config at them.
COPY certs/example.crt certs/example.key /etc/berth/certs/
# distroless's "nonroot" user (uid 65532): the ports below are all above 1024.
USER nonroot:nonroot
WORKDIR /etc/berth
# Listeners (plain and TLS) and the admin API, as in packaging/docker/berth.toml.
EXPOSE 8080 8443 9900
STOPSIGNAL SIGTERM
# Exec form: berth is PID 1 and receives SIGTERM and SIGHUP itself.
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["run", "--config", "/etc/berth/berth.toml"]
