//! Verification keys for JWT authentication: a JSON Web Key Set (RFC 7517)
//! or an HS256 secret, turned into the keys berth accepts tokens with.
//!
//! This module owns what a usable key is. Validation uses it for
//! `jwks_file` and `secret_file`, so that `berth check` rejects a file
//! without a single usable key; the `auth` module uses it for every key set
//! it fetches from a `jwks_url`. It knows no files, sockets or clocks.
//!
//! Accepted: RSA keys for RS256, P-256 keys for ES256, Ed25519 keys for
//! EdDSA (from a key set) and one HS256 secret (from `secret_file`). A key
//! whose `use` is not `sig`, whose `alg` names anything else, or that does
//! not parse is skipped: identity providers publish encryption keys and
//! keys for other algorithms in the same set. There is no `none`.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use sha2::{Digest, Sha256};

/// One key a token can be verified with.
#[derive(Clone)]
pub struct VerifyKey {
    /// The key id (`kid`); a key without one matches any token's `kid`.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// The keys of one key set (or one secret), with a digest of their source
/// so that two sets compare equal when they were read from the same bytes.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
    digest: [u8; 32],
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl std::fmt::Debug for KeySet {
    /// Key ids and algorithms only: never key material (an HS256 secret).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.kid.as_deref(), k.alg)))
            .finish()
    }
}

/// The most keys berth keeps from one set: a real identity provider
/// publishes a handful; a huge set would make kid-less tokens costly.
pub const MAX_KEYS: usize = 100;

impl KeySet {
    /// The usable keys of a JWKS document (`{"keys": [...]}`); an error
    /// when it is not one, or when it has no usable key.
    pub fn from_jwks(bytes: &[u8]) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let doc: Document = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a JSON Web Key Set ({{\"keys\": [...]}}): {e}"))?;
        let total = doc.keys.len();
        let keys: Vec<VerifyKey> = doc
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| usable(&jwk))
            .take(MAX_KEYS)
            .collect();
        if keys.is_empty() {
            return Err(format!(
                "the key set has no usable signing key ({total} keys; berth accepts RSA keys for RS256, P-256 keys for ES256 and Ed25519 keys for EdDSA)"
            ));
        }
        Ok(KeySet {
            keys,
            digest: Sha256::digest(bytes).into(),
        })
    }

    /// One HS256 secret.
    pub fn hs256(secret: &[u8]) -> KeySet {
        KeySet {
            keys: vec![VerifyKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            }],
            digest: Sha256::digest(secret).into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether some key carries this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The keys a token with this header may be verified with: same
    /// algorithm, and the same `kid` when both the token and the key have
    /// one.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.alg == alg
                && match (kid, k.kid.as_deref()) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        })
    }
}

/// The key and its algorithm, when berth can verify with it.
fn usable(jwk: &Jwk) -> Option<VerifyKey> {
    if let Some(purpose) = &jwk.common.public_key_use {
        if *purpose != PublicKeyUse::Signature {
            return None;
        }
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        // Other curves, and symmetric keys: HS256 only from secret_file.
        _ => return None,
    };
    if let Some(named) = jwk.common.key_algorithm {
        if format!("{named:?}") != format!("{alg:?}") {
            return None;
        }
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real public keys (values from RFC 7517 appendix A.1 and RFC 8037 §A.2).
    const EC: &str = r#"{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"sig","kid":"ec1"}"#;
    const RSA: &str = r#"{"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"rsa1"}"#;
    const OKP: &str = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed1"}"#;

    fn set(keys: &[&str]) -> String {
        format!("{{\"keys\":[{}]}}", keys.join(","))
    }

    #[test]
    fn each_supported_key_type_maps_to_its_one_algorithm() {
        let keys = KeySet::from_jwks(set(&[EC, RSA, OKP]).as_bytes()).unwrap();
        assert_eq!(keys.len(), 3);
        let alg_of = |kid| {
            keys.candidates(Some(kid), Algorithm::ES256)
                .chain(keys.candidates(Some(kid), Algorithm::RS256))
                .chain(keys.candidates(Some(kid), Algorithm::EdDSA))
                .map(|k| k.alg)
                .collect::<Vec<_>>()
        };
        assert_eq!(alg_of("ec1"), [Algorithm::ES256]);
        assert_eq!(alg_of("rsa1"), [Algorithm::RS256]);
        assert_eq!(alg_of("ed1"), [Algorithm::EdDSA]);
        assert!(keys.has_kid("rsa1"));
        assert!(!keys.has_kid("nope"));
        // A token naming an RSA key with another algorithm finds nothing.
        assert_eq!(keys.candidates(Some("rsa1"), Algorithm::HS256).count(), 0);
        // A token without kid may use any key of its algorithm.
        assert_eq!(keys.candidates(None, Algorithm::ES256).count(), 1);
    }

    #[test]
    fn unusable_keys_are_skipped_and_a_set_of_none_is_an_error() {
        let enc = RSA.replace("\"alg\":\"RS256\"", "\"use\":\"enc\"");
        let other_alg = RSA.replace("RS256", "PS256");
        let p384 = r#"{"kty":"EC","crv":"P-384","x":"AAAA","y":"AAAA"}"#;
        let oct = r#"{"kty":"oct","k":"c2VjcmV0"}"#;
        let junk = r#"{"kty":"nope"}"#;
        for bad in [enc.as_str(), &other_alg, p384, oct, junk] {
            let err = KeySet::from_jwks(set(&[bad]).as_bytes()).unwrap_err();
            assert!(err.contains("no usable signing key"), "{bad}: {err}");
            let keys = KeySet::from_jwks(set(&[bad, EC]).as_bytes()).unwrap();
            assert_eq!(keys.len(), 1, "{bad}");
        }
        for doc in ["", "[]", "{}", "{\"keys\": 3}", "not json"] {
            let err = KeySet::from_jwks(doc.as_bytes()).unwrap_err();
            assert!(err.starts_with("not a JSON Web Key Set"), "{doc}: {err}");
        }
    }

    #[test]
    fn sets_compare_by_their_source_and_never_print_secrets() {
        let a = KeySet::from_jwks(set(&[EC]).as_bytes()).unwrap();
        let b = KeySet::from_jwks(set(&[EC]).as_bytes()).unwrap();
        let c = KeySet::from_jwks(set(&[EC, OKP]).as_bytes()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let secret = KeySet::hs256(b"a secret of at least thirty-two bytes!!");
        assert_eq!(format!("{secret:?}"), "[(None, HS256)]");
        assert_eq!(format!("{a:?}"), "[(Some(\"ec1\"), ES256)]");
    }
}
