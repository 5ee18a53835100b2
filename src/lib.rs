//! berth: a WebSocket-aware, TLS-terminating reverse proxy and sticky load
//! balancer.
//!
//! # Layout
//! - `config`: the TOML file, validation, and every problem with file:line: key.
//! - `tls`: PEM loading and the rustls server configuration.
//! - `tls_stream`: the server side of a TLS connection on rustls's unbuffered API.
//! - `app`: binds sockets, runs accept loops, drains on shutdown.
//! - `listener`: accept loop and per-connection TLS + HTTP/1.1 serving.
//! - `proxy`: the request service: plain HTTP forwarding and WebSocket upgrades.
//! - `ws`: handshake checks, the frame-header parser and the frame-aware relay.
//! - `affinity`: pure sticky-routing functions (signed cookies, rendezvous hashing).
//! - `balancer`: pools, backends, backend choice, health checks, affinity at run time.
//! - `routing`: the live routing table swapped on reload.
//! - `reload`: read, validate, diff and swap a new config.
//! - `drain`: the registry of live relays and the spread-out closes of drains and shutdown.
//! - `metrics`: metric names and the registry.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`, `/admin/pools`.
//! - `demo`: `berth demo`, three in-process backends behind a TLS listener.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod affinity;
pub mod app;
pub mod balancer;
pub mod body;
pub mod config;
pub mod demo;
pub mod drain;
pub mod io;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod tls;
pub mod tls_stream;
pub mod ws;
