//! TLS material: PEM loading and the rustls server configuration used by TLS
//! listeners (TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`, or only
//! `http/1.1` on a listener with `http2 = false`). The crypto provider is
//! aws-lc-rs (the default `aws-lc` feature), which also offers the
//! post-quantum hybrid key exchange X25519MLKEM768, preferred when a client
//! sends its key share; or ring, built with `--no-default-features`. Nothing
//! else in berth names a provider.
//!
//! `tickets` holds the session-ticket keys a fleet shares (a listener's
//! `tls.ticket_keys` file); without one, every listener uses the process's
//! own ticketer below.
//!
//! Everything here is synchronous and runs at config load, so `berth check`
//! reports a bad certificate or a key that does not match it. The PEM files
//! themselves are read by config loading (regular files only, size-capped);
//! this module only parses them.

mod tickets;

pub use tickets::{SharedTicketer, TicketKeyError, TICKET_LIFETIME_SECS};

#[cfg(test)]
use std::path::Path;
use std::sync::{Arc, OnceLock};

// The provider module, chosen at build time (see the module docs).
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as provider_impl;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as provider_impl;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificate file: {source}")]
    ReadCert {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: String },
    #[error("{path}: cannot read private key: {source}")]
    ReadKey {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{key}: private key does not match the certificate in {cert}: {source}")]
    Mismatch {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("{key}: unusable private key: {source}")]
    BadKey { key: String, source: rustls::Error },
    /// The crypto provider refused TLS 1.2 and 1.3 (berth's own setup, not
    /// the certificate or key).
    #[error("the TLS provider does not support TLS 1.2 and 1.3: {source}")]
    Versions { source: rustls::Error },
    #[error("cannot create the TLS session ticket keys: {source}")]
    Ticketer { source: rustls::Error },
}

/// TLS 1.2 sessions resumable by session ID (TLS 1.3 and ticket-capable
/// TLS 1.2 clients use stateless tickets instead and need no entry).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Session resumption state: one per process, shared by every TLS listener
/// and every config load, so that a reload, which builds new server configs,
/// keeps the sessions clients already hold. rustls resumes a session only
/// under the SNI it was made for.
struct Resumption {
    cache: Arc<dyn StoresServerSessions>,
    /// Stateless tickets; rustls rotates the key every 6 hours and accepts
    /// tickets for 12.
    ticketer: Arc<dyn ProducesTickets>,
}

static RESUMPTION: OnceLock<Resumption> = OnceLock::new();

fn resumption() -> Result<&'static Resumption, TlsError> {
    if let Some(r) = RESUMPTION.get() {
        return Ok(r);
    }
    let ticketer =
        provider_impl::Ticketer::new().map_err(|source| TlsError::Ticketer { source })?;
    // A racing first load may win; either ticketer is as good.
    Ok(RESUMPTION.get_or_init(|| Resumption {
        cache: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
        ticketer,
    }))
}

/// The crypto provider berth uses everywhere (one, explicitly, so that no
/// process-wide default has to be installed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider_impl::default_provider())
}

/// Builds the server config from a PEM certificate chain and private key
/// already read into memory (config loading reads the files, with its caps
/// on type and size); `cert_name` and `key_name` name them in errors.
/// `tickets`: the fleet's shared ticket keys (`ticket_keys`), or `None` for
/// the process's own.
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
    tickets: Option<SharedTicketer>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::ReadCert {
            path: cert_name.to_string(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert_name.to_string(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::ReadKey {
        path: key_name.to_string(),
        source,
    })?;
    let mut config = build_server_config(chain, key_der, cert_name, key_name)?;
    if let Some(tickets) = tickets {
        config.ticketer = Arc::new(tickets);
    }
    Ok(Arc::new(config))
}

/// Reads a PEM certificate chain and private key (trusted test files) and
/// builds the server config.
#[cfg(test)]
pub(crate) fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    server_config_from_pem(
        &read(cert),
        &read(key),
        &cert.display().to_string(),
        &key.display().to_string(),
        None,
    )
}

/// Builds the server config from DER material (the demo uses this with an
/// in-memory rcgen certificate).
pub fn server_config_from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_name: &str,
    key_name: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(chain, key, cert_name, key_name).map(Arc::new)
}

fn build_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_name: &str,
    key_name: &str,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            key: key_name.to_string(),
            source,
        })?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|source| TlsError::Mismatch {
            cert: cert_name.to_string(),
            key: key_name.to_string(),
            source,
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Versions { source })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::new(
            certified,
        ))));
    // Both, in berth's order of preference; a client that offers neither
    // (or no ALPN at all) gets HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let resumption = resumption()?;
    config.session_storage = Arc::clone(&resumption.cache);
    config.ticketer = Arc::clone(&resumption.ticketer);
    Ok(config)
}

/// The server config of a listener: as built, or offering only `http/1.1`
/// in ALPN when the listener has HTTP/2 turned off.
pub fn for_listener(config: &Arc<ServerConfig>, http2: bool) -> Arc<ServerConfig> {
    if http2 {
        return Arc::clone(config);
    }
    let mut only_h1 = ServerConfig::clone(config);
    only_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(only_h1)
}

/// A client config that trusts the certificates in the PEM file `cert` (the
/// unit tests' TLS client).
#[cfg(test)]
pub(crate) fn test_client_config(cert: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}
