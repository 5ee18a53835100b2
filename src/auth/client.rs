//! The HTTP client berth uses for its own calls to identity services (JWKS
//! fetches, forward-auth checks): `http://` or `https://`, rustls on berth's
//! one crypto provider (`tls::provider`: ring, or aws-lc-rs with
//! `--features aws-lc`) with Mozilla's root certificates (webpki-roots), so
//! it works the same in a minimal container without a system certificate
//! store.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A pooled HTTP/1.1 client for `http://` and `https://` URLs.
pub(crate) type ServiceClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// How long a connection to an identity service may take to open; the
/// callers' own timeouts bound the whole exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A new client, or `None` (logged) if rustls cannot be set up, in which
/// case every call fails and authentication fails closed.
pub(crate) fn service_client() -> Option<ServiceClient> {
    let provider = crate::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        Err(err) => {
            tracing::error!(error = %err, "cannot set up TLS for identity services; authentication will refuse every request");
            return None;
        }
    };
    let mut http = HttpConnector::new();
    // The https connector wraps this one and needs it to accept https URLs.
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Some(Client::builder(TokioExecutor::new()).build(https))
}
