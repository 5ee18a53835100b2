//! Validation of `[[listeners]]`: each listener's keys (bind address, TLS
//! files and ticket keys, handshake timeout, connection caps,
//! `max_header_bytes`, `http2`, `max_concurrent_streams`, the PROXY
//! protocol, `reuse_port`) with the
//! per-value rules of `rules.rs`, and the cross-listener rules (unique
//! names, binds that do not collide).

use std::collections::HashMap;
use std::net::SocketAddr;

use super::{path, Checker};
use crate::config::file::{FileListener, FileTls};
use crate::config::locate::Seg;
use crate::config::read;
use crate::config::rules;
use crate::config::{ListenerConfig, ProxyProtocolConfig, TlsConfig};
use crate::tls::TlsError;

impl Checker<'_, '_> {
    pub(super) fn listener(&mut self, i: usize, raw: &FileListener) -> Option<ListenerConfig> {
        let base = [Seg::Key("listeners"), Seg::Index(i)];
        let name_at = path(&base, &[Seg::Key("name")]);
        let bind_at = path(&base, &[Seg::Key("bind")]);
        let name = self.required(&name_at, raw.name.as_deref(), "name = \"public\"");
        if name.is_some_and(|n| n.trim().is_empty()) {
            self.push(&name_at, "listener name must not be empty");
        }
        let bind = self
            .required(&bind_at, raw.bind.as_deref(), "bind = \"0.0.0.0:8443\"")
            .and_then(|b| self.check(&bind_at, rules::bind_address(b)));
        let handshake_timeout = self.duration(
            &path(&base, &[Seg::Key("handshake_timeout")]),
            raw.handshake_timeout.as_deref(),
            rules::HANDSHAKE_TIMEOUT,
        );
        let max_connections = self.cap(
            &path(&base, &[Seg::Key("max_connections")]),
            raw.max_connections,
            rules::MAX_CONNECTIONS,
        );
        let max_connections_per_ip = self.cap(
            &path(&base, &[Seg::Key("max_connections_per_ip")]),
            raw.max_connections_per_ip,
            rules::MAX_CONNECTIONS_PER_IP,
        );
        let max_header_bytes = self.size(
            &path(&base, &[Seg::Key("max_header_bytes")]),
            raw.max_header_bytes.as_ref(),
            rules::MAX_HEADER_BYTES,
        );
        let http2 = raw.http2.unwrap_or(true);
        let max_concurrent_streams = self
            .int(
                &path(&base, &[Seg::Key("max_concurrent_streams")]),
                raw.max_concurrent_streams,
                rules::MAX_CONCURRENT_STREAMS_DEFAULT,
                rules::MAX_CONCURRENT_STREAMS,
            )
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(100);
        // A TLS failure is already a problem, so the (then unused) listener
        // is kept without TLS to let the uniqueness checks still see it.
        // With HTTP/2 off, ALPN offers only http/1.1.
        let tls = raw
            .tls
            .as_ref()
            .and_then(|tls| self.tls(&path(&base, &[Seg::Key("tls")]), tls))
            .map(|mut tls| {
                tls.server_config = crate::tls::for_listener(&tls.server_config, http2);
                tls
            });
        let proxy_protocol = self.proxy_protocol(&base, raw);
        Some(ListenerConfig {
            name: name?.to_string(),
            bind: bind?,
            tls,
            handshake_timeout,
            // A bad value is already a problem; the listener is kept (for
            // the uniqueness checks) without the cap.
            max_connections: max_connections.flatten(),
            max_connections_per_ip: max_connections_per_ip.flatten(),
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            // A bad value is already a problem; the listener is kept
            // without it.
            proxy_protocol: proxy_protocol.flatten(),
            reuse_port: raw.reuse_port.unwrap_or(false),
            http2,
            max_concurrent_streams,
        })
    }

    /// `proxy_protocol` and `proxy_protocol_from`: each needs the other.
    /// `None` when either is wrong (a problem was pushed).
    fn proxy_protocol(
        &mut self,
        base: &[Seg<'_>],
        raw: &FileListener,
    ) -> Option<Option<ProxyProtocolConfig>> {
        let versions_at = path(base, &[Seg::Key("proxy_protocol")]);
        let from_at = path(base, &[Seg::Key("proxy_protocol_from")]);
        let versions = match raw.proxy_protocol.as_deref() {
            Some(v) => Some(self.check(&versions_at, rules::proxy_versions(v))?),
            None => None,
        };
        let mut from = Some(Vec::new());
        for (i, cidr) in raw.proxy_protocol_from.iter().flatten().enumerate() {
            let at = path(&from_at, &[Seg::Index(i)]);
            match (self.check(&at, rules::cidr(cidr)), from.as_mut()) {
                (Some(net), Some(nets)) => nets.push(net),
                _ => from = None,
            }
        }
        let from = from?;
        match (versions, raw.proxy_protocol_from.is_some()) {
            (None, false) => Some(None),
            (None, true) => {
                self.push(
                    &from_at,
                    "proxy_protocol_from needs proxy_protocol (\"v1\", \"v2\" or \"any\")",
                );
                None
            }
            (Some(_), false) => {
                self.push(
                    &versions_at,
                    "proxy_protocol needs proxy_protocol_from: the addresses of the balancers allowed to send the header (e.g. proxy_protocol_from = [\"10.0.0.0/8\"])",
                );
                None
            }
            (Some(versions), true) => {
                let from = self.check(&from_at, rules::proxy_protocol_from(from))?;
                Some(Some(ProxyProtocolConfig { versions, from }))
            }
        }
    }

    fn tls(&mut self, base: &[Seg<'_>], raw: &FileTls) -> Option<TlsConfig> {
        let cert_at = path(base, &[Seg::Key("cert")]);
        let key_at = path(base, &[Seg::Key("key")]);
        let cert = self.required(
            &cert_at,
            raw.cert.as_deref(),
            "cert = \"certs/example.crt\"",
        );
        let key = self.required(&key_at, raw.key.as_deref(), "key = \"certs/example.key\"");
        let tickets = raw.ticket_keys.as_deref().map(|name| {
            let at = path(base, &[Seg::Key("ticket_keys")]);
            let bytes = self.file(&at, name, "ticket key file", read::TICKET_KEYS_LIMIT);
            let keys = bytes.and_then(|b| self.check(&at, rules::ticket_keys(&b).map(|()| b)));
            (read::resolve(self.base, name), keys)
        });
        // With both keys given, both files are read, so that a problem with
        // each is reported.
        let (cert, key) = (cert?, key?);
        let cert_pem = self.file(&cert_at, cert, "certificate file", read::PEM_LIMIT);
        let key_pem = self.file(&key_at, key, "private key", read::PEM_LIMIT);
        let (cert, key) = (
            read::resolve(self.base, cert),
            read::resolve(self.base, key),
        );
        let (cert_name, key_name) = (cert.display().to_string(), key.display().to_string());
        let (ticket_keys, ticketer) = match tickets {
            None => (None, None),
            Some((path, keys)) => {
                let built = crate::tls::SharedTicketer::from_file_bytes(&keys?);
                let ticketer =
                    self.check(&path_ticket_keys(base), built.map_err(|e| e.to_string()))?;
                (Some(path), Some(ticketer))
            }
        };
        let (cert_pem, key_pem) = (cert_pem?, key_pem?);
        match crate::tls::server_config_from_pem(
            &cert_pem, &key_pem, &cert_name, &key_name, ticketer,
        ) {
            Ok(server_config) => Some(TlsConfig {
                cert,
                key,
                ticket_keys,
                server_config,
            }),
            Err(err) => {
                let at = match tls_error_key(&err) {
                    Some(key) => path(base, &[Seg::Key(key)]),
                    None => base.to_vec(),
                };
                self.push(&at, err.to_string());
                None
            }
        }
    }

    pub(super) fn check_listener_uniqueness(&mut self, listeners: &[(usize, ListenerConfig)]) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (n, (i, listener)) in listeners.iter().enumerate() {
            let base = [Seg::Key("listeners"), Seg::Index(*i)];
            if names.insert(listener.name.as_str(), *i).is_some() {
                self.push(
                    &path(&base, &[Seg::Key("name")]),
                    format!(
                        "duplicate listener name {:?} (names must be unique)",
                        listener.name
                    ),
                );
            }
            if let Some((j, earlier)) = listeners[..n]
                .iter()
                .find(|(_, earlier)| binds_collide(earlier.bind, listener.bind))
            {
                self.push(
                    &path(&base, &[Seg::Key("bind")]),
                    format!(
                        "bind address {} is already used by listeners[{j}] ({:?}); each listener needs its own address",
                        listener.bind, earlier.name
                    ),
                );
            }
        }
    }
}

/// How a TLS failure maps onto the `tls` keys (None: the table itself).
fn tls_error_key(err: &TlsError) -> Option<&'static str> {
    match err {
        TlsError::ReadCert { .. } | TlsError::NoCert { .. } => Some("cert"),
        TlsError::ReadKey { .. } | TlsError::Mismatch { .. } | TlsError::BadKey { .. } => {
            Some("key")
        }
        TlsError::Ticketer { .. } | TlsError::Versions { .. } => None,
    }
}

fn path_ticket_keys<'a>(base: &[Seg<'a>]) -> Vec<Seg<'a>> {
    path(base, &[Seg::Key("ticket_keys")])
}

/// Whether two listen addresses would fight over the same socket. Port 0
/// asks the OS for a fresh port, so it never collides; an unspecified IP
/// (`0.0.0.0`, `::`) overlaps every address of its family.
pub(super) fn binds_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    a.ip() == b.ip()
        || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
}
