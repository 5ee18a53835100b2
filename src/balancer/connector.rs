//! How berth's pooled HTTP clients connect to a backend: hyper-util's TCP
//! connector (Nagle off, the pool's connect timeout), plus, in a pool with
//! `send_proxy_protocol`, a PROXY v2 header written before anything else.
//!
//! A keep-alive connection that carried one client's address must never
//! carry another client's request, so in such a pool the client's address
//! is part of the connection pool's key: hyper-util keys its pool by the
//! request URI's scheme and authority, and berth writes the client's
//! address (and the address it connected to) into the authority's userinfo
//! (`http://203.0.113.7_51000_10.0.0.1_443@10.1.0.5:9000/path`, IPv6 with
//! `-` for `:`). The connector reads it back for the header; the request
//! line sent is origin-form and the `Host` header is the client's, so the
//! userinfo never reaches the backend. Requests without it (health checks)
//! get a `LOCAL` header. Nothing here starts a task.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::io::proxy_header::{self, Addresses};

/// The connector of every backend HTTP client.
#[derive(Clone, Debug)]
pub struct BackendConnector {
    http: HttpConnector,
    send_proxy: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl BackendConnector {
    pub fn new(connect_timeout: Duration, send_proxy: bool) -> BackendConnector {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        BackendConnector { http, send_proxy }
    }
}

impl tower_service::Service<Uri> for BackendConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let header = self
            .send_proxy
            .then(|| proxy_header::v2_header(client_of(&uri)));
        let connect = self.http.call(uri);
        Box::pin(async move {
            let mut io = connect.await?;
            if let Some(header) = header {
                io.inner_mut().write_all(&header).await?;
            }
            Ok(io)
        })
    }
}

/// The userinfo that puts a client's addresses in a request URI (see the
/// module docs).
pub fn client_tag(a: &Addresses) -> String {
    let ip = |ip: IpAddr| ip.to_string().replace(':', "-");
    format!(
        "{}_{}_{}_{}",
        ip(a.source.ip()),
        a.source.port(),
        ip(a.destination.ip()),
        a.destination.port()
    )
}

/// The addresses [`client_tag`] put in `uri`, if any.
fn client_of(uri: &Uri) -> Option<Addresses> {
    let authority = uri.authority()?.as_str();
    let (tag, _) = authority.split_once('@')?;
    let mut parts = tag.split('_');
    let mut addr = || -> Option<SocketAddr> {
        let ip: IpAddr = parts.next()?.replace('-', ":").parse().ok()?;
        let port: u16 = parts.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, port))
    };
    let source = addr()?;
    let destination = addr()?;
    Some(Addresses {
        source,
        destination,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_reads_back_from_the_uri() {
        for (src, dst) in [
            ("203.0.113.7:51000", "10.0.0.1:443"),
            ("[2001:db8::7]:51000", "[::1]:8443"),
        ] {
            let a = Addresses {
                source: src.parse().unwrap(),
                destination: dst.parse().unwrap(),
            };
            let uri: Uri = format!("http://{}@127.0.0.1:9000/x?y", client_tag(&a))
                .parse()
                .unwrap();
            assert_eq!(uri.host(), Some("127.0.0.1"));
            assert_eq!(uri.port_u16(), Some(9000));
            assert_eq!(client_of(&uri), Some(a));
        }
        let plain: Uri = "http://127.0.0.1:9000/".parse().unwrap();
        assert_eq!(client_of(&plain), None);
    }
}
