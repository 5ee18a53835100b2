//! Validation of `[pools.NAME.auth]`: the cross-key rules of the `jwt` and
//! `forward` tables (one key source, what goes with what, headers set at
//! most once) and of `claim:NAME` hash affinity, with the per-value rules
//! of `rules.rs`. Key files are read here (with the size-capped reader) so
//! that `check` rejects a `jwks_file` or `secret_file` berth could not use;
//! a `jwks_url` is never fetched here.

use super::{path, Checker};
use crate::config::file::{FileAuth, FileForward, FileJwt};
use crate::config::locate::Seg;
use crate::config::read;
use crate::config::rules;
use crate::config::{
    Affinity, AuthConfig, ForwardAuthConfig, HashKey, JwtConfig, JwtKeys, KeySet, OnExpiry,
    TokenSource,
};

impl Checker<'_, '_> {
    pub(super) fn auth(&mut self, pool: &str, raw: Option<&FileAuth>) -> AuthConfig {
        let Some(raw) = raw else {
            return AuthConfig::default();
        };
        let base = [Seg::Key("pools"), Seg::Key(pool), Seg::Key("auth")];
        let jwt = raw
            .jwt
            .as_ref()
            .and_then(|j| self.jwt(&path(&base, &[Seg::Key("jwt")]), j));
        let forward = raw
            .forward
            .as_ref()
            .and_then(|f| self.forward(&path(&base, &[Seg::Key("forward")]), f));
        if let (Some(jwt), Some(forward)) = (&jwt, &forward) {
            for name in &forward.copy_headers {
                if jwt.claims_to_headers.iter().any(|(h, _)| h == name) {
                    self.push(
                        &path(&base, &[Seg::Key("forward"), Seg::Key("copy_headers")]),
                        format!("header {name:?} is also set by jwt.claims_to_headers (set each header in one place)"),
                    );
                }
            }
        }
        AuthConfig { jwt, forward }
    }

    fn jwt(&mut self, base: &[Seg<'_>], raw: &FileJwt) -> Option<JwtConfig> {
        let key = |k: &'static str| path(base, &[Seg::Key(k)]);
        let keys = self.jwt_keys(base, raw);
        if raw.refresh.is_some() && raw.jwks_url.is_none() {
            self.push(
                &key("refresh"),
                "refresh applies only to jwks_url (a jwks_file or secret_file is read when the config is loaded)",
            );
        }
        let refresh = self.duration(&key("refresh"), raw.refresh.as_deref(), rules::JWT_REFRESH);
        let leeway = self.duration(&key("leeway"), raw.leeway.as_deref(), rules::JWT_LEEWAY);
        let on_expiry = match raw.on_expiry.as_deref() {
            None => OnExpiry::Close,
            Some(v) => self
                .check(&key("on_expiry"), rules::on_expiry(v))
                .unwrap_or(OnExpiry::Close),
        };
        for (k, value) in [("issuer", &raw.issuer), ("audience", &raw.audience)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                self.push(
                    &key(k),
                    format!("{k} must not be empty (remove it to accept any)"),
                );
            }
        }
        let token_from = self.token_from(base, raw.token_from.as_deref());
        let claims_to_headers = self.claims_to_headers(base, raw);
        Some(JwtConfig {
            keys: keys?,
            issuer: raw.issuer.clone(),
            audience: raw.audience.clone(),
            token_from: token_from?,
            refresh,
            leeway,
            on_expiry,
            claims_to_headers: claims_to_headers?,
        })
    }

    /// Exactly one of `jwks_url`, `jwks_file` and `secret_file`; files are
    /// read and their keys checked now.
    fn jwt_keys(&mut self, base: &[Seg<'_>], raw: &FileJwt) -> Option<JwtKeys> {
        let key = |k: &'static str| path(base, &[Seg::Key(k)]);
        let given: Vec<&'static str> = [
            ("jwks_url", &raw.jwks_url),
            ("jwks_file", &raw.jwks_file),
            ("secret_file", &raw.secret_file),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k)
        .collect();
        match given.as_slice() {
            [] => {
                self.push(
                    base,
                    "JWT auth needs its keys: set jwks_url, jwks_file or secret_file (HS256)",
                );
                return None;
            }
            [_] => {}
            [_, second, ..] => {
                self.push(
                    &key(second),
                    format!(
                        "set one of jwks_url, jwks_file and secret_file, not {}",
                        given.join(" and ")
                    ),
                );
                return None;
            }
        }
        if let Some(url) = &raw.jwks_url {
            return self
                .check(&key("jwks_url"), rules::service_url(url))
                .map(JwtKeys::Url);
        }
        if let Some(file) = &raw.jwks_file {
            let at = key("jwks_file");
            let bytes = self.file(&at, file, "JWKS file", read::JWKS_LIMIT)?;
            let keys = self.check(&at, KeySet::from_jwks(&bytes))?;
            let path = read::resolve(self.base, file);
            return Some(JwtKeys::File { path, keys });
        }
        let file = raw.secret_file.as_deref()?;
        let at = key("secret_file");
        let mut bytes = self.file(&at, file, "secret file", read::SECRET_LIMIT)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        self.check(&at, rules::jwt_secret(&bytes))?;
        Some(JwtKeys::Secret {
            path: read::resolve(self.base, file),
            keys: KeySet::hs256(&bytes),
        })
    }

    /// `token_from`: by default the `Authorization` header.
    fn token_from(&mut self, base: &[Seg<'_>], raw: Option<&[String]>) -> Option<Vec<TokenSource>> {
        let Some(raw) = raw else {
            return Some(vec![TokenSource::Header(http::header::AUTHORIZATION)]);
        };
        let at = path(base, &[Seg::Key("token_from")]);
        if raw.is_empty() {
            self.push(
                &at,
                "token_from must name at least one source (e.g. [\"header:Authorization\"])",
            );
            return None;
        }
        let mut out = Some(Vec::new());
        for (i, entry) in raw.iter().enumerate() {
            let source = self.check(&path(&at, &[Seg::Index(i)]), rules::token_source(entry));
            match (source, out.as_mut()) {
                (Some(s), Some(list)) => list.push(s),
                _ => out = None,
            }
        }
        out
    }

    fn claims_to_headers(
        &mut self,
        base: &[Seg<'_>],
        raw: &FileJwt,
    ) -> Option<Vec<(http::HeaderName, String)>> {
        let mut out = Some(Vec::new());
        for (header, claim) in raw.claims_to_headers.iter().flatten() {
            let at = path(base, &[Seg::Key("claims_to_headers"), Seg::Key(header)]);
            let name = self.check(&at, rules::auth_header(header));
            let claim_ok = self.check(&at, rules::claim_name(claim)).is_some();
            match (name, out.as_mut()) {
                (Some(name), Some(list)) if claim_ok => {
                    if list.iter().any(|(h, _)| *h == name) {
                        self.push(
                            &at,
                            format!("header {header:?} is listed twice (header names are case-insensitive)"),
                        );
                        out = None;
                    } else {
                        list.push((name, claim.clone()));
                    }
                }
                _ => out = None,
            }
        }
        out
    }

    fn forward(&mut self, base: &[Seg<'_>], raw: &FileForward) -> Option<ForwardAuthConfig> {
        let key = |k: &'static str| path(base, &[Seg::Key(k)]);
        let url = self
            .required(
                &key("url"),
                raw.url.as_deref(),
                "url = \"http://127.0.0.1:9000/verify\"",
            )
            .and_then(|u| self.check(&key("url"), rules::service_url(u)));
        let timeout = self.duration(
            &key("timeout"),
            raw.timeout.as_deref(),
            rules::FORWARD_TIMEOUT,
        );
        let cache =
            self.optional_duration(&key("cache"), raw.cache.as_deref(), rules::FORWARD_CACHE);
        let mut copy_headers = Some(Vec::new());
        for (i, header) in raw.copy_headers.iter().flatten().enumerate() {
            let at = path(base, &[Seg::Key("copy_headers"), Seg::Index(i)]);
            match (
                self.check(&at, rules::auth_header(header)),
                copy_headers.as_mut(),
            ) {
                (Some(name), Some(list)) => {
                    if !list.contains(&name) {
                        list.push(name);
                    }
                }
                _ => copy_headers = None,
            }
        }
        Some(ForwardAuthConfig {
            url: url?,
            timeout,
            copy_headers: copy_headers?,
            cache,
        })
    }

    /// `claim:NAME` hash affinity hashes a verified claim: the pool must
    /// verify tokens.
    pub(super) fn check_claim_affinity(
        &mut self,
        pool: &str,
        affinity: &Affinity,
        auth: &AuthConfig,
    ) {
        if let Affinity::Hash(hash) = affinity {
            if let (HashKey::Claim(_), None) = (&hash.key, &auth.jwt) {
                self.push(
                    &[Seg::Key("pools"), Seg::Key(pool), Seg::Key("hash"), Seg::Key("key")],
                    format!(
                        "hash key {} needs JWT auth in this pool (add a [pools.{pool}.auth.jwt] table): the claim comes from a verified token",
                        hash.key
                    ),
                );
            }
        }
    }
}
