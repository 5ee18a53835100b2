//! berth: a WebSocket-aware, TLS-terminating reverse proxy and sticky load
//! balancer.
//!
//! # Layout
//! Layers from the top; a module uses its own layer (one way) or lower ones,
//! never higher (`cargo test --test layers` checks it; see ARCHITECTURE.md).
//! - 0 `demo`: `berth demo`, three in-process backends behind a TLS listener.
//! - 1 `app`: the wiring: binds sockets, builds each layer's context, runs,
//!   drains on shutdown. Only layer 0 uses it.
//! - 2 `admin`: the status page, `/admin/events`, `/metrics`, `/healthz`,
//!   `/readyz`, `/admin/pools`, reload and drains.
//! - 2 `status`: the status page's sampler (rates, close history) and snapshots.
//! - 2 `reload`: read, validate, diff and swap a new config; `run --watch`.
//! - 2 `drain`: the spread-out closes of drains and shutdown.
//! - 2 `rebalance`: moving live WebSockets off overloaded backends.
//! - 2 `listener`: accept loop and per-connection TLS + HTTP/1.1 serving.
//! - 3 `proxy`: the request service: one request path for plain HTTP
//!   forwarding and WebSocket upgrades, and the tunnel task.
//! - 4 `auth`: JWT and forward-auth checks of each request, JWKS refresh.
//! - 4 `balancer`: pools, backends, backend choice, health checks, the upgrade
//!   rate limit, affinity at run time.
//! - 4 `affinity`: pure sticky-routing functions (signed cookies, rendezvous hashing).
//! - 4 `ws`: handshake checks, the frame-header parser and the frame-aware relay.
//! - 4 `routing`: the live routing table and its handle, swapped on reload.
//! - 4 `lifecycle`: shutdown token, task tracker, readiness, registry of live relays.
//! - 5 `config`: the TOML file, validation, and every problem with file:line: key.
//! - 5 `metrics`: metric names and the registry.
//! - 5 `body`: the response body type and berth's own short responses.
//! - 5 `io`: the client stream type, plain or TLS, and the reading of a
//!   connection's first request head and of a PROXY protocol header.
//! - 5 `limits`: connection admission: listener and per-address caps, the
//!   file-descriptor reserve.
//! - 5 `tls`: PEM loading, the rustls server configuration, shared ticket keys.
//! - 5 `tls_stream`: the server side of a TLS connection on rustls's unbuffered API.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod affinity;
pub mod app;
pub mod auth;
pub mod balancer;
pub mod body;
pub mod config;
pub mod demo;
pub mod drain;
pub mod io;
pub mod lifecycle;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod rebalance;
pub mod reload;
pub mod routing;
pub mod status;
pub mod tls;
pub mod tls_stream;
pub mod ws;
