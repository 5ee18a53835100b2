//! berth: a WebSocket-aware, TLS-terminating reverse proxy and sticky load balancer.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod config;
pub mod tls;
pub mod ws;
