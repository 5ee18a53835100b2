//! The HTTP body type berth answers with, and berth's own short responses.
//!
//! A bottom-layer module: the proxy, the balancer's HTTP clients and the
//! admin API all speak [`ProxyBody`], and none of them has to import another
//! to do so. It owns no tasks.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Bodies berth sends: a backend's streamed body or a short text of its own.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// A complete body as a [`ProxyBody`].
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An empty [`ProxyBody`].
pub fn empty() -> ProxyBody {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A short plain-text response from berth itself.
pub fn text_response(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
