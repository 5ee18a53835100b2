//! Table tests of the pure parts of authentication: where a token is
//! found, which query parameters leave the target, how claims become
//! header text, and what the JWT check accepts, with tokens minted here
//! (HS256, and ES256 with a key generated per run). No sockets.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, Uri};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::jwt::{claim_text, find_token, Failure, JwtAuth};
use super::strip_params;
use crate::config::{JwtConfig, JwtKeys, KeySet, OnExpiry, TokenSource};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

#[test]
fn the_token_comes_from_the_first_source_that_has_one() {
    let sources = [
        TokenSource::Header(http::header::AUTHORIZATION),
        TokenSource::Header(HeaderName::from_static("x-token")),
        TokenSource::Cookie("session".into()),
        TokenSource::Query("access_token".into()),
    ];
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<&'a str>);
    let cases: &[Case<'_>] = &[
        (&[("authorization", "Bearer abc")], "/", Some("abc")),
        (&[("authorization", "bearer  abc ")], "/", Some("abc")),
        // Another scheme, or an empty bearer, is no token: the next source.
        (
            &[("authorization", "Basic dXNlcg=="), ("x-token", "xyz")],
            "/",
            Some("xyz"),
        ),
        (
            &[("authorization", "Bearer ")],
            "/?access_token=q",
            Some("q"),
        ),
        (&[("x-token", "Bearer raw")], "/", Some("raw")),
        (&[("cookie", "a=1; session=\"c00k\"")], "/", Some("c00k")),
        // HTTP/2 may send each cookie in a field of its own.
        (
            &[
                ("cookie", "a=1"),
                ("cookie", "session=h2"),
                ("cookie", "b=2"),
            ],
            "/",
            Some("h2"),
        ),
        (&[], "/ws?x=1&access_token=a%2Eb%2Ec", Some("a.b.c")),
        (
            &[("cookie", "session=c"), ("authorization", "Bearer h")],
            "/?access_token=q",
            Some("h"),
        ),
        (&[("cookie", "session=")], "/?access_token=", None),
        (&[], "/", None),
    ];
    for (pairs, uri, want) in cases {
        let uri: Uri = uri.parse().unwrap();
        let h = headers(pairs);
        assert_eq!(
            find_token(&sources, &h, &uri).as_deref(),
            *want,
            "{pairs:?} {uri}"
        );
    }
}

#[test]
fn query_tokens_leave_the_target_and_nothing_else_does() {
    let names = ["access_token".to_string(), "t".to_string()];
    let cases = [
        ("/ws?access_token=abc", Some("/ws")),
        ("/ws?room=1&access_token=abc&x=2", Some("/ws?room=1&x=2")),
        ("/ws?access%5Ftoken=abc&t=1&t=2&room=3", Some("/ws?room=3")),
        ("/ws?access_token", Some("/ws")),
        ("/ws?room=1&tt=2", None),
        ("/ws", None),
        ("/ws?", None),
    ];
    for (target, want) in cases {
        assert_eq!(strip_params(target, &names).as_deref(), want, "{target}");
    }
    assert_eq!(strip_params("/ws?access_token=abc", &[]), None);
}

#[test]
fn claims_become_header_text() {
    let cases = [
        (json!("alice"), Some("alice")),
        (json!(42), Some("42")),
        (json!(1.5), Some("1.5")),
        (json!(true), Some("true")),
        (json!(["read", "write", 3, null]), Some("read,write,3")),
        (json!({"a": 1}), Some("{\"a\":1}")),
        (Value::Null, None),
    ];
    for (value, want) in cases {
        assert_eq!(claim_text(&value).as_deref(), want, "{value}");
    }
}

// ---- the JWT check ----

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn config(keys: JwtKeys) -> JwtConfig {
    JwtConfig {
        keys,
        issuer: Some("https://idp.example.com/".into()),
        audience: Some("chat".into()),
        token_from: vec![TokenSource::Header(http::header::AUTHORIZATION)],
        refresh: Duration::from_secs(600),
        leeway: Duration::from_secs(30),
        on_expiry: OnExpiry::Close,
        claims_to_headers: vec![(HeaderName::from_static("x-auth-subject"), "sub".into())],
    }
}

fn hs256_pool() -> JwtAuth {
    JwtAuth::new(
        &config(JwtKeys::Secret {
            path: "secret".into(),
            keys: KeySet::hs256(SECRET),
        }),
        None,
    )
}

/// Good claims, with `extra` merged over them (a null removes one).
fn claims(extra: Value) -> Value {
    let mut c = json!({
        "sub": "alice",
        "iss": "https://idp.example.com/",
        "aud": "chat",
        "exp": now() + 300,
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

async fn check(auth: &JwtAuth, token: &str) -> Result<String, Failure> {
    let h = headers(&[("authorization", &format!("Bearer {token}"))]);
    let uri: Uri = "/".parse().unwrap();
    let verified = auth.check(&h, &uri).await?;
    Ok(verified.claims["sub"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn hs256_tokens_are_checked_claim_by_claim() {
    let auth = hs256_pool();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
    );
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(b"another secret, just as long as the first"),
    )
    .unwrap();
    let t = now();
    let cases: Vec<(&str, String, Result<String, Failure>)> = vec![
        ("valid", hs256(&claims(json!({}))), Ok("alice".into())),
        (
            "expired",
            hs256(&claims(json!({"exp": t - 60}))),
            Err(Failure::Expired),
        ),
        (
            "expired within leeway",
            hs256(&claims(json!({"exp": t - 10}))),
            Ok("alice".into()),
        ),
        (
            "no exp",
            hs256(&claims(json!({"exp": null}))),
            Err(Failure::Invalid),
        ),
        (
            "not yet valid",
            hs256(&claims(json!({"nbf": t + 120}))),
            Err(Failure::Invalid),
        ),
        (
            "nbf within leeway",
            hs256(&claims(json!({"nbf": t + 10}))),
            Ok("alice".into()),
        ),
        (
            "wrong issuer",
            hs256(&claims(json!({"iss": "https://evil/"}))),
            Err(Failure::Invalid),
        ),
        (
            "no issuer",
            hs256(&claims(json!({"iss": null}))),
            Err(Failure::Invalid),
        ),
        (
            "wrong audience",
            hs256(&claims(json!({"aud": "billing"}))),
            Err(Failure::Invalid),
        ),
        (
            "audience list",
            hs256(&claims(json!({"aud": ["billing", "chat"]}))),
            Ok("alice".into()),
        ),
        (
            "no audience",
            hs256(&claims(json!({"aud": null}))),
            Err(Failure::Invalid),
        ),
        ("another key", other_secret, Err(Failure::Invalid)),
        ("alg none", unsigned, Err(Failure::Invalid)),
        ("not a token", "a.b.c".into(), Err(Failure::Invalid)),
    ];
    for (name, token, want) in cases {
        assert_eq!(check(&auth, &token).await, want, "{name}");
    }
    let none = auth
        .check(&HeaderMap::new(), &"/".parse().unwrap())
        .await
        .err();
    assert_eq!(none, Some(Failure::Missing));
}

#[tokio::test]
async fn the_expiry_and_claim_headers_of_a_good_token() {
    let auth = hs256_pool();
    let exp = now() + 300;
    let token = hs256(&claims(json!({"exp": exp})));
    let h = headers(&[("authorization", &format!("Bearer {token}"))]);
    let verified = auth.check(&h, &"/".parse().unwrap()).await.unwrap();
    assert_eq!(
        verified.close_at,
        Some(UNIX_EPOCH + Duration::from_secs(exp + 30))
    );
    let set = auth.headers(&verified.claims);
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].0, "x-auth-subject");
    assert_eq!(set[0].1, "alice");

    let mut ignore = config(JwtKeys::Secret {
        path: "secret".into(),
        keys: KeySet::hs256(SECRET),
    });
    ignore.on_expiry = OnExpiry::Ignore;
    ignore.audience = None;
    let auth = JwtAuth::new(&ignore, None);
    // Without an audience configured, a token naming one is refused.
    assert_eq!(check(&auth, &token).await, Err(Failure::Invalid));
    let token = hs256(&claims(json!({"aud": null})));
    let h = headers(&[("authorization", &format!("Bearer {token}"))]);
    let verified = auth.check(&h, &"/".parse().unwrap()).await.unwrap();
    assert_eq!(verified.close_at, None);
}

/// A fresh P-256 key: its PKCS#8 document (to sign) and its JWK (to verify).
fn es256_key(kid: &str) -> (Vec<u8>, Value) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    (pkcs8.as_ref().to_vec(), jwk)
}

fn es256(pkcs8: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &EncodingKey::from_ec_der(pkcs8)).unwrap()
}

#[tokio::test]
async fn jwks_keys_verify_only_their_own_algorithm_and_kid() {
    let (k1, jwk1) = es256_key("k1");
    let (k2, jwk2) = es256_key("k2");
    let (stranger, _) = es256_key("k1");
    let doc = json!({ "keys": [jwk1.clone(), jwk2] }).to_string();
    let keys = KeySet::from_jwks(doc.as_bytes()).unwrap();
    let auth = JwtAuth::new(
        &config(JwtKeys::File {
            path: "jwks.json".into(),
            keys,
        }),
        None,
    );
    let good = claims(json!({}));
    // Algorithm confusion: an HS256 token keyed with the public key.
    let public_point = URL_SAFE_NO_PAD.decode(jwk1["x"].as_str().unwrap()).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(&public_point),
    )
    .unwrap();
    let cases = [
        (
            "kid k1",
            es256(&k1, Some("k1"), &good),
            Ok("alice".to_string()),
        ),
        ("kid k2", es256(&k2, Some("k2"), &good), Ok("alice".into())),
        ("no kid", es256(&k2, None, &good), Ok("alice".into())),
        (
            "k2 signed, k1 named",
            es256(&k2, Some("k1"), &good),
            Err(Failure::Invalid),
        ),
        (
            "unknown kid",
            es256(&k1, Some("k9"), &good),
            Err(Failure::Invalid),
        ),
        (
            "another key",
            es256(&stranger, Some("k1"), &good),
            Err(Failure::Invalid),
        ),
        ("HS256 with the public key", confused, Err(Failure::Invalid)),
        ("HS256 at all", hs256(&good), Err(Failure::Invalid)),
        (
            "expired",
            es256(&k1, Some("k1"), &claims(json!({"exp": now() - 120}))),
            Err(Failure::Expired),
        ),
    ];
    for (name, token, want) in cases {
        assert_eq!(check(&auth, &token).await, want, "{name}");
    }
    // The key set is shared, not copied per check.
    let super::keys::Keys::Fixed(set) = &auth.keys else {
        panic!("fixed keys");
    };
    assert_eq!(Arc::strong_count(set), 1);
}

#[test]
fn a_reload_with_the_same_jwks_url_keeps_the_key_store() {
    let toml = |url: &str| {
        format!(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\npool = \"p\"\n\n[pools.p]\n\n[pools.p.auth.jwt]\njwks_url = \"{url}\"\n\n[[pools.p.backends]]\nid = \"b\"\naddress = \"127.0.0.1:1\"\n"
        )
    };
    let pool = |url: &str| {
        crate::config::Config::from_toml_str(&toml(url), "t")
            .unwrap()
            .pools["p"]
            .clone()
    };
    let metrics = crate::metrics::Metrics::new().unwrap();
    let first = super::PoolAuth::new(&pool("https://a/jwks"), &metrics, None).unwrap();
    let same = super::PoolAuth::new(&pool("https://a/jwks"), &metrics, Some(&first)).unwrap();
    let other = super::PoolAuth::new(&pool("https://b/jwks"), &metrics, Some(&first)).unwrap();
    let store = |a: &super::PoolAuth| a.key_store().unwrap();
    assert!(Arc::ptr_eq(&store(&first), &store(&same)));
    assert!(!Arc::ptr_eq(&store(&first), &store(&other)));
    // A pool without auth has none.
    let mut plain = pool("https://a/jwks");
    plain.auth = Default::default();
    assert!(super::PoolAuth::new(&plain, &metrics, Some(&first)).is_none());
}
