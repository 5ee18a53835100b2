//! `berth demo` (placeholder until the demo lands).
use std::future::Future;
use std::net::SocketAddr;

pub async fn run(_bind: SocketAddr, _shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
