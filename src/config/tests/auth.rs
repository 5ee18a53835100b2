//! `[pools.NAME.auth]`: the `jwt` and `forward` tables and `claim:NAME`
//! hash affinity, text in, values or exact problems out.

use std::time::Duration;

use super::{errors, load, problems, BASE};
use crate::config::{Affinity, ForwardAuthConfig, HashKey, JwtKeys, OnExpiry, TokenSource};

/// `BASE` with `tables` (TOML text) added to pool chat.
fn with(tables: &str) -> String {
    BASE.replace("[pools.chat]", &format!("[pools.chat]\n{tables}\n"))
}

const JWT: &str = "[pools.chat.auth.jwt]\njwks_url = \"https://idp.example.com/jwks.json\"";

#[test]
fn every_key_of_both_tables_is_read() {
    let config = load(&with(
        r#"
[pools.chat.auth.jwt]
jwks_url = "https://idp.example.com/.well-known/jwks.json"
issuer = "https://idp.example.com/"
audience = "chat"
token_from = ["header:Authorization", "cookie:session", "query:access_token"]
refresh = "5m"
leeway = "10s"
on_expiry = "ignore"
claims_to_headers = { "X-Auth-Subject" = "sub", "X-Auth-Scope" = "scope" }

[pools.chat.auth.forward]
url = "http://127.0.0.1:9000/verify"
timeout = "1500ms"
copy_headers = ["X-User-Id", "x-user-id", "X-Role"]
cache = "30s"
"#,
    ));
    let auth = &config.pools["chat"].auth;
    let jwt = auth.jwt.as_ref().unwrap();
    assert!(
        matches!(&jwt.keys, JwtKeys::Url(u) if u == "https://idp.example.com/.well-known/jwks.json")
    );
    assert_eq!(jwt.issuer.as_deref(), Some("https://idp.example.com/"));
    assert_eq!(jwt.audience.as_deref(), Some("chat"));
    assert_eq!(
        jwt.token_from,
        [
            TokenSource::Header(http::header::AUTHORIZATION),
            TokenSource::Cookie("session".into()),
            TokenSource::Query("access_token".into()),
        ]
    );
    assert_eq!(jwt.refresh, Duration::from_secs(300));
    assert_eq!(jwt.leeway, Duration::from_secs(10));
    assert_eq!(jwt.on_expiry, OnExpiry::Ignore);
    let headers: Vec<(&str, &str)> = jwt
        .claims_to_headers
        .iter()
        .map(|(h, c)| (h.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        headers,
        [("x-auth-scope", "scope"), ("x-auth-subject", "sub")]
    );
    assert_eq!(
        auth.forward.as_ref().unwrap(),
        &ForwardAuthConfig {
            url: "http://127.0.0.1:9000/verify".parse().unwrap(),
            timeout: Duration::from_millis(1500),
            copy_headers: vec![
                http::HeaderName::from_static("x-user-id"),
                http::HeaderName::from_static("x-role"),
            ],
            cache: Some(Duration::from_secs(30)),
        }
    );
}

#[test]
fn defaults_and_a_pool_without_auth() {
    assert_eq!(load(BASE).pools["chat"].auth, Default::default());
    let config = load(&with(&format!(
        "{JWT}\n\n[pools.chat.auth.forward]\nurl = \"https://auth.example.com/verify\""
    )));
    let auth = &config.pools["chat"].auth;
    let jwt = auth.jwt.as_ref().unwrap();
    assert_eq!(
        jwt.token_from,
        [TokenSource::Header(http::header::AUTHORIZATION)]
    );
    assert_eq!(jwt.refresh, Duration::from_secs(600));
    assert_eq!(jwt.leeway, Duration::from_secs(30));
    assert_eq!(jwt.on_expiry, OnExpiry::Close);
    assert_eq!((jwt.issuer.as_ref(), jwt.audience.as_ref()), (None, None));
    assert!(jwt.claims_to_headers.is_empty());
    let forward = auth.forward.as_ref().unwrap();
    assert_eq!(forward.timeout, Duration::from_secs(2));
    assert_eq!(forward.cache, None);
    assert!(forward.copy_headers.is_empty());
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            "[pools.chat.auth.jwt]",
            "pools.chat.auth.jwt: JWT auth needs its keys: set jwks_url, jwks_file or secret_file (HS256)",
        ),
        (
            "[pools.chat.auth.jwt]\njwks_url = \"https://a/\"\njwks_file = \"k.json\"",
            "pools.chat.auth.jwt.jwks_file: set one of jwks_url, jwks_file and secret_file, not jwks_url and jwks_file",
        ),
        (
            "[pools.chat.auth.jwt]\njwks_url = \"ftp://idp/jwks\"",
            "pools.chat.auth.jwt.jwks_url: invalid URL \"ftp://idp/jwks\": the scheme must be http or https (expected e.g. \"https://idp.example.com/.well-known/jwks.json\")",
        ),
        (
            "[pools.chat.auth.jwt]\njwks_url = \"/jwks.json\"",
            "pools.chat.auth.jwt.jwks_url: invalid URL \"/jwks.json\": the scheme must be http or https (expected e.g. \"https://idp.example.com/.well-known/jwks.json\")",
        ),
        (
            &format!("{JWT}\ntoken_from = []"),
            "pools.chat.auth.jwt.token_from: token_from must name at least one source (e.g. [\"header:Authorization\"])",
        ),
        (
            &format!("{JWT}\ntoken_from = [\"header:Authorization\", \"body:token\"]"),
            "pools.chat.auth.jwt.token_from[1]: invalid token source \"body:token\": unknown source kind (use \"header:NAME\", \"cookie:NAME\" or \"query:NAME\")",
        ),
        (
            &format!("{JWT}\ntoken_from = [\"cookie:\"]"),
            "pools.chat.auth.jwt.token_from[0]: invalid token source \"cookie:\": the name after ':' is empty (use \"header:NAME\", \"cookie:NAME\" or \"query:NAME\")",
        ),
        (
            &format!("{JWT}\non_expiry = \"kill\""),
            "pools.chat.auth.jwt.on_expiry: on_expiry must be \"close\" or \"ignore\", got \"kill\"",
        ),
        (
            &format!("{JWT}\nclaims_to_headers = {{ \"Host\" = \"sub\" }}"),
            "pools.chat.auth.jwt.claims_to_headers.Host: header \"Host\" cannot be set by authentication (berth or the protocol owns it)",
        ),
        (
            &format!("{JWT}\nclaims_to_headers = {{ \"X-Sub\" = \"\" }}"),
            "pools.chat.auth.jwt.claims_to_headers.X-Sub: claim name must not be empty",
        ),
        (
            &format!("{JWT}\nclaims_to_headers = {{ \"X-Sub\" = \"sub\", \"x-sub\" = \"email\" }}"),
            "pools.chat.auth.jwt.claims_to_headers.x-sub: header \"x-sub\" is listed twice (header names are case-insensitive)",
        ),
        (
            &format!("{JWT}\naudience = \" \""),
            "pools.chat.auth.jwt.audience: audience must not be empty (remove it to accept any)",
        ),
        (
            "[pools.chat.auth.jwt]\nsecret_file = \"/nonexistent/secret\"\nrefresh = \"1m\"",
            "pools.chat.auth.jwt.refresh: refresh applies only to jwks_url (a jwks_file or secret_file is read when the config is loaded)",
        ),
        (
            "[pools.chat.auth.forward]\ntimeout = \"1s\"",
            "pools.chat.auth.forward.url: required key is missing (add e.g. url = \"http://127.0.0.1:9000/verify\")",
        ),
        (
            "[pools.chat.auth.forward]\nurl = \"http://a/\"\ncopy_headers = [\"Cookie\"]",
            "pools.chat.auth.forward.copy_headers[0]: header \"Cookie\" cannot be set by authentication (berth or the protocol owns it)",
        ),
        (
            &format!("{JWT}\nclaims_to_headers = {{ \"X-User\" = \"sub\" }}\n\n[pools.chat.auth.forward]\nurl = \"http://a/\"\ncopy_headers = [\"x-user\"]"),
            "pools.chat.auth.forward.copy_headers: header \"x-user\" is also set by jwt.claims_to_headers (set each header in one place)",
        ),
        (
            "[pools.chat.auth.forward]\nurl = \"http://a/\"\nretries = 3",
            "pools.chat.auth.forward.retries: unknown field `retries`, expected one of `url`, `timeout`, `copy_headers`, `cache`",
        ),
        (
            "affinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"claim:sub\"",
            "pools.chat.hash.key: hash key claim:sub needs JWT auth in this pool (add a [pools.chat.auth.jwt] table): the claim comes from a verified token",
        ),
    ];
    for (tables, want) in cases {
        let found = problems(&with(tables));
        let rendered: Vec<String> = found
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        assert!(
            rendered.iter().any(|r| r == want),
            "{tables}\nwant: {want}\ngot: {rendered:#?}"
        );
        // Only the refresh case also fails to read its (missing) file.
        if !tables.contains("refresh") {
            assert_eq!(found.len(), 1, "{tables}: {rendered:#?}");
        }
    }
}

#[test]
fn claim_affinity_is_accepted_with_jwt() {
    let config = load(&with(&format!(
        "affinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"claim:sub\"\n\n{JWT}"
    )));
    let Affinity::Hash(hash) = &config.pools["chat"].affinity else {
        panic!("hash affinity");
    };
    assert_eq!(hash.key, HashKey::Claim("sub".into()));
    assert_eq!(hash.key.to_string(), "claim:sub");
}

#[test]
fn key_files_are_read_and_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let jwks = write(
        "jwks.json",
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed1"}]}"#,
    );
    let empty = write("empty.json", r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
    let secret = write("secret", &format!("{}\n", "s".repeat(32)));
    let short = write("short", "too short\n");

    let table = |k: &str, v: &str| with(&format!("[pools.chat.auth.jwt]\n{k} = {v:?}"));
    let config = load(&table("jwks_file", &jwks));
    let JwtKeys::File { keys, path } = &config.pools["chat"].auth.jwt.as_ref().unwrap().keys else {
        panic!("a jwks_file");
    };
    assert_eq!((keys.len(), path.display().to_string()), (1, jwks.clone()));
    let config = load(&table("secret_file", &secret));
    let JwtKeys::Secret { keys, .. } = &config.pools["chat"].auth.jwt.as_ref().unwrap().keys else {
        panic!("a secret_file");
    };
    assert_eq!(format!("{keys:?}"), "[(None, HS256)]");

    assert!(errors(&table("jwks_file", &empty))
        .contains("pools.chat.auth.jwt.jwks_file: the key set has no usable signing key (1 keys;"));
    assert!(errors(&table("secret_file", &short))
        .contains("pools.chat.auth.jwt.secret_file: HS256 secret is 9 bytes; use at least 32"));
    let missing = dir.path().join("missing.json").display().to_string();
    assert!(errors(&table("jwks_file", &missing)).contains(&format!(
        "pools.chat.auth.jwt.jwks_file: {missing}: cannot read JWKS file:"
    )));
    // A directory is not read (the size-capped reader of every key file).
    let dir_name = dir.path().display().to_string();
    assert!(errors(&table("jwks_file", &dir_name))
        .contains("JWKS file must be a regular file, not a directory"));
}

#[test]
fn the_example_config_shows_both_tables_and_check_fetches_nothing() {
    // Loading it (as `berth check` does) needs no network: the jwks_url is
    // fetched only by a running berth.
    let config = super::shipped("berth.toml");
    let pool = &config.pools["account"];
    let jwt = pool.auth.jwt.as_ref().unwrap();
    assert!(matches!(&jwt.keys, JwtKeys::Url(_)));
    assert_eq!(jwt.token_from.len(), 3);
    assert_eq!(jwt.claims_to_headers.len(), 2);
    let forward = pool.auth.forward.as_ref().unwrap();
    assert_eq!(forward.cache, Some(Duration::from_secs(30)));
    let Affinity::Hash(hash) = &pool.affinity else {
        panic!("hash affinity");
    };
    assert_eq!(hash.key, HashKey::Claim("sub".into()));
}
