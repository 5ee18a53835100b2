//! Authentication end to end: tokens minted here with keys generated per
//! run, a JWKS and a forward-auth service served on 127.0.0.1:0, real
//! WebSocket and HTTP clients, and backends that report what they saw.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

const ISSUER: &str = "https://idp.example.test/";
const AUDIENCE: &str = "chat";

// ---------------------------------------------------------------------------
// Keys and tokens
// ---------------------------------------------------------------------------

/// A signing key generated for this run, and its public JWK.
struct Signer {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn es256(kid: &str) -> Signer {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        Signer {
            alg: Algorithm::ES256,
            kid: kid.into(),
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            }),
        }
    }

    fn ed25519(kid: &str) -> Signer {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Signer {
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            key: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            }),
        }
    }

    /// RSA key generation is not in ring: the openssl CLI makes the key
    /// (scripts/test.sh installs it).
    fn rs256(kid: &str) -> Signer {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("key.pem");
        let der = dir.path().join("key.der");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let (pem_s, der_s) = (pem.to_str().unwrap(), der.to_str().unwrap());
        openssl(&["genrsa", "-out", pem_s, "2048"]);
        // ring reads PKCS#1 (OpenSSL 3 writes PKCS#8 unless told).
        openssl(&[
            "rsa",
            "-in",
            pem_s,
            "-traditional",
            "-outform",
            "DER",
            "-out",
            der_s,
        ]);
        let modulus = openssl(&["rsa", "-in", pem_s, "-noout", "-modulus"]);
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        Signer {
            alg: Algorithm::RS256,
            kid: kid.into(),
            key: EncodingKey::from_rsa_der(&std::fs::read(&der).unwrap()),
            jwk: json!({
                "kty": "RSA", "alg": "RS256", "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB",
            }),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.key).unwrap()
    }

    /// A token for `sub` that expires `secs` from now.
    fn token(&self, sub: &str, secs: i64) -> String {
        self.sign(&claims(sub, unix_now() as i64 + secs))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, exp: i64) -> Value {
    json!({
        "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": exp,
        "scope": "chat:read chat:write",
    })
}

fn jwks_doc(signers: &[&Signer]) -> String {
    json!({ "keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

// ---------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------

/// Serves `f(request headers, path)` on 127.0.0.1:0 until dropped: the
/// accept loop and every connection stop with it.
struct Service {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Answer = (u16, Vec<(&'static str, String)>, String);

impl Service {
    async fn start<F, Fut>(f: F) -> Service
    where
        F: Fn(HeaderMap, String) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Answer> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (hits.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (f, h, s) = (f.clone(), h.clone(), s.clone());
                connections.spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (f, h, s) = (f.clone(), h.clone(), s.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            s.lock().unwrap().push(req.headers().clone());
                            let path = req.uri().to_string();
                            let (status, headers, body) = f(req.headers().clone(), path).await;
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            for (k, v) in headers {
                                resp.headers_mut().append(k, v.parse().unwrap());
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Service {
            addr,
            hits,
            seen,
            task,
        }
    }

    /// A JWKS endpoint serving whatever `doc` holds.
    async fn jwks(doc: Arc<Mutex<String>>) -> Service {
        Service::start(move |_, _| {
            let doc = doc.clone();
            async move {
                let body = doc.lock().unwrap().clone();
                (200, vec![("content-type", "application/json".into())], body)
            }
        })
        .await
    }

    /// A forward-auth service that decides by the bearer token's text:
    /// `allow-NAME` passes as user NAME, `deny401` / `deny403` refuse,
    /// `login` redirects to a login page, `slow` answers after 3 s.
    async fn forward_auth() -> Service {
        Service::start(|headers: HeaderMap, _| async move {
            let auth = headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let token = auth.strip_prefix("Bearer ").unwrap_or("");
            let uri = headers
                .get("x-forwarded-uri")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            if let Some(user) = token.strip_prefix("allow-") {
                return (200, vec![("x-user-id", user.to_string())], String::new());
            }
            match token {
                "deny401" => (
                    401,
                    vec![("www-authenticate", "Bearer realm=\"sso\"".into())],
                    "please log in".into(),
                ),
                "deny403" => (
                    403,
                    vec![("x-reason", "banned".into())],
                    "forbidden here".into(),
                ),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    (200, vec![], String::new())
                }
                _ => (
                    302,
                    vec![("location", format!("https://login.example.test/?rd={uri}"))],
                    "see the login page".into(),
                ),
            }
        })
        .await
    }
}

/// What a WebSocket backend saw of one handshake.
#[derive(Clone, Debug)]
struct Seen {
    uri: String,
    headers: HeaderMap,
}

/// A WebSocket backend that records each handshake and each Close code it
/// receives, echoes data, and answers "whoami" with its id.
struct Backend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    closes: Arc<Mutex<Vec<u16>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(id: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closes = Arc::new(Mutex::new(Vec::new()));
        let (a, s, c) = (accepts.clone(), seen.clone(), closes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (s, c) = (s.clone(), c.clone());
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // tungstenite's callback signature
                    let cb = |req: &Request, resp: Response| {
                        s.lock().unwrap().push(Seen {
                            uri: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        let reply = match msg {
                            Message::Text(t) if t.as_str() == "whoami" => Message::text(id),
                            Message::Text(_) | Message::Binary(_) => msg,
                            Message::Close(frame) => {
                                let code = frame.map_or(1005, |f| u16::from(f.code));
                                c.lock().unwrap().push(code);
                                continue;
                            }
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            accepts,
            seen,
            closes,
            task,
        }
    }

    fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a handshake")
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A WebSocket handshake through berth: the socket on `101`, else the
/// refusal's status, headers and body.
async fn ws(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, (u16, HeaderMap, String)> {
    use tokio_tungstenite::tungstenite::Error;
    match try_ws_connect(addr, false, path, headers).await {
        Ok((ws, _)) => Ok(ws),
        Err(Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((resp.status().as_u16(), resp.headers().clone(), body))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// A plain GET through berth: status, headers, body.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn metrics(proxy: &Proxy) -> String {
    admin_request(proxy.admin.unwrap(), "GET", "/metrics", None)
        .await
        .1
}

/// The value of the series whose line starts with `series` (0 if absent).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn auth_count(metrics: &str, method: &str, result: &str) -> f64 {
    value(
        metrics,
        &format!("berth_auth_total{{method=\"{method}\",pool=\"main\",result=\"{result}\"}}"),
    )
}

/// A `[pools.main.auth.jwt]` table for a JWKS at `jwks`, plus `extra`.
fn jwt_table(jwks: SocketAddr, extra: &str) -> String {
    format!(
        "\n[pools.main.auth.jwt]\njwks_url = \"http://{jwks}/jwks.json\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n{extra}\n"
    )
}

/// A JWKS service with `signers`, the document it serves, and a backend.
async fn idp(signers: &[&Signer]) -> (Service, Arc<Mutex<String>>) {
    let doc = Arc::new(Mutex::new(jwks_doc(signers)));
    (Service::jwks(doc.clone()).await, doc)
}

// ---------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rejected_tokens_get_401_with_a_challenge_and_no_backend_connection() {
    let key = Signer::es256("k1");
    let stranger = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    let http = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[backend.addr], &jwt_table(jwks.addr, ""))).await;
    let plain_pool = config_for(&[http], &jwt_table(jwks.addr, ""));
    let plain = Proxy::start(&plain_pool).await;

    let expired = key.token("alice", -120);
    let forged = stranger.token("alice", 300);
    let wrong_audience =
        key.sign(&json!({"sub": "a", "iss": ISSUER, "aud": "billing", "exp": unix_now() + 300}));
    let invalid = "Bearer error=\"invalid_token\"";
    let (missing, bad, late) = (
        "authentication required\n",
        "invalid token\n",
        "token expired\n",
    );
    // (what, request headers, WWW-Authenticate, body)
    type Case = (
        &'static str,
        Vec<(&'static str, String)>,
        &'static str,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("no token", vec![], "Bearer", missing),
        (
            "Basic credentials",
            vec![("authorization", "Basic YTpi".into())],
            "Bearer",
            missing,
        ),
        (
            "garbage",
            vec![("authorization", bearer("not.a.jwt"))],
            invalid,
            bad,
        ),
        (
            "expired",
            vec![("authorization", bearer(&expired))],
            invalid,
            late,
        ),
        (
            "another key",
            vec![("authorization", bearer(&forged))],
            invalid,
            bad,
        ),
        (
            "wrong audience",
            vec![("authorization", bearer(&wrong_audience))],
            invalid,
            bad,
        ),
    ];
    for (name, headers, challenge, text) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, h, body) = ws(proxy.addr, "/ws", &headers).await.err().unwrap();
        assert_eq!(status, 401, "{name}");
        assert_eq!(h["www-authenticate"], *challenge, "{name}");
        assert_eq!(body, *text, "{name}");
        let (status, h, _) = get(plain.addr, "/echo", &headers).await;
        assert_eq!(status, 401, "plain {name}");
        assert_eq!(h["www-authenticate"], *challenge, "plain {name}");
    }
    assert_eq!(
        backend.accepts.load(Ordering::SeqCst),
        0,
        "a backend was contacted"
    );
    // The plain backend never saw a request either: its pool's metrics.
    let m = metrics(&plain).await;
    assert_eq!(
        value(
            &m,
            "berth_http_requests_total{backend=\"\",pool=\"main\",status_class=\"4xx\"}"
        ),
        6.0
    );
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "jwt", "missing"), 2.0);
    assert_eq!(auth_count(&m, "jwt", "invalid"), 3.0);
    assert_eq!(auth_count(&m, "jwt", "expired"), 1.0);
    assert_eq!(auth_count(&m, "jwt", "ok"), 0.0);
    assert_eq!(
        value(
            &m,
            "berth_websocket_upgrades_total{backend=\"\",pool=\"main\",result=\"auth_rejected\"}"
        ),
        6.0
    );
}

#[tokio::test]
async fn a_valid_token_opens_the_websocket_with_claims_and_without_forgeries() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    let table = jwt_table(
        jwks.addr,
        "token_from = [\"header:Authorization\", \"query:access_token\"]\nclaims_to_headers = { \"X-Auth-Subject\" = \"sub\", \"X-Auth-Scope\" = \"scope\" }",
    );
    let proxy = Proxy::start(&config_for(&[backend.addr], &table)).await;
    let token = key.token("alice", 300);

    let auth = bearer(&token);
    let mut ws1 = ws(
        proxy.addr,
        "/ws?room=1",
        &[("authorization", &auth), ("x-auth-subject", "mallory")],
    )
    .await
    .unwrap();
    ws1.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws1.next().await.unwrap().unwrap(), Message::text("hello"));
    let seen = backend.last();
    let subjects: Vec<_> = seen.headers.get_all("x-auth-subject").iter().collect();
    assert_eq!(subjects, ["alice"]);
    assert_eq!(seen.headers["x-auth-scope"], "chat:read chat:write");
    assert_eq!(seen.uri, "/ws?room=1");
    // The backend still gets the client's own credentials.
    assert_eq!(seen.headers["authorization"], auth.as_str());

    // From the query string: the token leaves the URI the backend sees.
    let path = format!("/ws?access_token={token}&room=2");
    let _ws2 = ws(proxy.addr, &path, &[]).await.unwrap();
    let seen = backend.last();
    assert_eq!(seen.uri, "/ws?room=2");
    assert!(!format!("{:?}", seen.headers).contains(&token));
    assert_eq!(seen.headers["x-auth-subject"], "alice");

    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "jwt", "ok"), 2.0);
    assert!(!m.contains(&token));
}

#[tokio::test]
async fn plain_http_requests_are_checked_alike() {
    let key = Signer::ed25519("ed1");
    let (jwks, _) = idp(&[&key]).await;
    let http = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let table = jwt_table(
        jwks.addr,
        "token_from = [\"cookie:session\", \"query:t\"]\nclaims_to_headers = { \"X-Auth-Subject\" = \"sub\" }",
    );
    let proxy = Proxy::start(&config_for(&[http], &table)).await;
    let token = key.token("bob", 300);

    let cookie = format!("theme=dark; session={token}");
    let (status, _, body) = get(
        proxy.addr,
        "/echo?x=1",
        &[("cookie", &cookie), ("x-auth-subject", "mallory")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-auth-subject: bob\n"), "{body}");
    assert!(!body.contains("mallory"), "{body}");

    let (status, _, body) = get(proxy.addr, &format!("/echo?t={token}&x=2"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("path=/echo?x=2\n"), "{body}");
    assert!(!body.contains(&token), "{body}");

    let (status, headers, _) = get(proxy.addr, "/echo", &[("cookie", "session=")]).await;
    assert_eq!(
        (status, &headers["www-authenticate"]),
        (401, &"Bearer".parse().unwrap())
    );
}

#[tokio::test]
async fn every_signing_algorithm_verifies_and_hs256_only_from_a_secret_file() {
    let signers = [
        Signer::es256("es"),
        Signer::ed25519("ed"),
        Signer::rs256("rs"),
    ];
    let refs: Vec<&Signer> = signers.iter().collect();
    let (jwks, _) = idp(&refs).await;
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], &jwt_table(jwks.addr, ""))).await;
    for signer in &signers {
        let auth = bearer(&signer.token("alice", 300));
        let result = ws(proxy.addr, "/", &[("authorization", &auth)]).await;
        assert!(result.is_ok(), "{:?}: {:?}", signer.alg, result.err());
    }

    // HS256 from secret_file; the same secret is no use against a JWKS.
    let secret = b"a secret of well over thirty-two bytes, for HS256";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, [&secret[..], b"\n"].concat()).unwrap();
    let table = format!(
        "\n[pools.main.auth.jwt]\nsecret_file = {:?}\naudience = \"{AUDIENCE}\"\n",
        file.display().to_string()
    );
    let hs = Proxy::start(&config_for(&[backend.addr], &table)).await;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims("alice", unix_now() as i64 + 300),
        &EncodingKey::from_secret(secret),
    )
    .unwrap();
    let auth = bearer(&token);
    assert!(ws(hs.addr, "/", &[("authorization", &auth)]).await.is_ok());
    let (status, ..) = ws(proxy.addr, "/", &[("authorization", &auth)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn an_expiring_token_gets_close_1008_on_both_sides_within_a_second() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[backend.addr],
        &jwt_table(jwks.addr, "leeway = \"0s\""),
    ))
    .await;
    // exp is in whole seconds: 2 to 3 s after the upgrade.
    let exp = unix_now() + 3;
    let auth = bearer(&key.sign(&claims("alice", exp as i64)));
    let mut client = ws(proxy.addr, "/", &[("authorization", &auth)])
        .await
        .unwrap();
    client.send(Message::text("before")).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("before")
    );

    let close = tokio::time::timeout(Duration::from_secs(10), next_close(&mut client))
        .await
        .expect("a Close before the timeout");
    let at = SystemTime::now();
    // Answer it (tungstenite replies while reading on) and see the end.
    while client.next().await.is_some() {}
    assert_eq!(close, Some(1008));
    let exp_at = UNIX_EPOCH + Duration::from_secs(exp);
    // Not before exp (allowing for the clock's granularity), and within 1 s.
    assert!(
        at + Duration::from_millis(50) >= exp_at,
        "{at:?} < {exp_at:?}"
    );
    assert!(
        at <= exp_at + Duration::from_secs(1),
        "closed {:?} after exp",
        at.duration_since(exp_at).unwrap()
    );
    // The backend got a (masked: tungstenite insists) Close 1008 too.
    let deadline = Instant::now() + Duration::from_secs(2);
    while backend.closes.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*backend.closes.lock().unwrap(), [1008]);
    let series = "berth_websocket_closes_total{code=\"1008\",initiator=\"proxy\",pool=\"main\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&metrics(&proxy).await, series) < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value(&metrics(&proxy).await, series), 1.0);
    // A token's expiry is not a maximum age.
    assert_eq!(
        value(
            &metrics(&proxy).await,
            "berth_websocket_max_age_closes_total{pool=\"main\"}"
        ),
        0.0
    );

    // on_expiry = "ignore" leaves it open.
    let ignoring = Proxy::start(&config_for(
        &[backend.addr],
        &jwt_table(jwks.addr, "leeway = \"0s\"\non_expiry = \"ignore\""),
    ))
    .await;
    let auth = bearer(&key.sign(&claims("alice", unix_now() as i64 + 1)));
    let mut client = ws(ignoring.addr, "/", &[("authorization", &auth)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
}

#[tokio::test]
async fn a_rotated_jwks_is_picked_up_without_a_reload() {
    let old = Signer::es256("2024");
    let new = Signer::es256("2025");
    let other = Signer::es256("2026");
    let (jwks, doc) = idp(&[&old]).await;
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], &jwt_table(jwks.addr, ""))).await;
    // The fetch at start (after which nothing fetches for 10 minutes).
    let deadline = Instant::now() + Duration::from_secs(5);
    while jwks.hits.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fetched = jwks.hits.load(Ordering::SeqCst);
    assert_eq!(fetched, 1);
    let old_token = bearer(&old.token("alice", 300));
    assert!(ws(proxy.addr, "/", &[("authorization", &old_token)])
        .await
        .is_ok());
    assert_eq!(jwks.hits.load(Ordering::SeqCst), fetched);

    // The identity provider rotates: the new kid is fetched at once.
    *doc.lock().unwrap() = jwks_doc(&[&new]);
    let new_token = bearer(&new.token("alice", 300));
    assert!(ws(proxy.addr, "/", &[("authorization", &new_token)])
        .await
        .is_ok());
    assert_eq!(jwks.hits.load(Ordering::SeqCst), fetched + 1);
    // The old key went with the old set.
    let (status, ..) = ws(proxy.addr, "/", &[("authorization", &old_token)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    // Another unknown kid within 30 s does not fetch again.
    *doc.lock().unwrap() = jwks_doc(&[&new, &other]);
    let other_token = bearer(&other.token("alice", 300));
    let (status, ..) = ws(proxy.addr, "/", &[("authorization", &other_token)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(jwks.hits.load(Ordering::SeqCst), fetched + 1);
    let m = metrics(&proxy).await;
    assert_eq!(
        value(
            &m,
            "berth_auth_jwks_refresh_total{pool=\"main\",result=\"success\"}"
        ),
        (fetched + 1) as f64
    );
}

#[tokio::test]
async fn the_last_good_keys_outlive_the_jwks_server() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[backend.addr],
        &jwt_table(jwks.addr, "refresh = \"1s\""),
    ))
    .await;
    let auth = bearer(&key.token("alice", 300));
    assert!(ws(proxy.addr, "/", &[("authorization", &auth)])
        .await
        .is_ok());
    drop(jwks);
    // At least one refresh fails...
    let deadline = Instant::now() + Duration::from_secs(10);
    let failures = loop {
        let m = metrics(&proxy).await;
        let n = value(
            &m,
            "berth_auth_jwks_refresh_total{pool=\"main\",result=\"failure\"}",
        );
        if n >= 1.0 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(failures >= 1.0, "no failed refresh counted");
    // ... and the keys fetched before still verify.
    assert!(ws(proxy.addr, "/", &[("authorization", &auth)])
        .await
        .is_ok());
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "jwt", "ok"), 2.0);
}

#[tokio::test]
async fn without_any_key_set_berth_refuses_with_503_never_accepts() {
    let key = Signer::es256("k1");
    // Nothing listens there.
    let nowhere = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], &jwt_table(nowhere, ""))).await;
    let auth = bearer(&key.token("alice", 300));
    let (status, _, body) = ws(proxy.addr, "/", &[("authorization", &auth)])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "authentication unavailable\n")
    );
    let (status, ..) = get(proxy.addr, "/", &[("authorization", &auth)]).await;
    assert_eq!(status, 503);
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 0);
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "jwt", "error"), 2.0);
}

// ---------------------------------------------------------------------------
// Forward-auth
// ---------------------------------------------------------------------------

fn forward_table(service: SocketAddr, extra: &str) -> String {
    format!(
        "\n[pools.main.auth.forward]\nurl = \"http://{service}/verify\"\ncopy_headers = [\"X-User-Id\"]\n{extra}\n"
    )
}

/// One backend behind berth, whose pool asks the forward-auth service at
/// `service` (`extra`: more keys of the `forward` table).
async fn forward_proxy(service: SocketAddr, extra: &str) -> (Backend, Proxy) {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], &forward_table(service, extra))).await;
    (backend, proxy)
}

#[tokio::test]
async fn forward_auth_allows_with_copied_headers_and_passes_denials_back() {
    let service = Service::forward_auth().await;
    let (backend, proxy) = forward_proxy(service.addr, "timeout = \"1s\"").await;
    let allow = bearer("allow-u1");
    let _ws = ws(
        proxy.addr,
        "/ws?room=7",
        &[
            ("authorization", &allow),
            ("cookie", "sid=abc"),
            ("x-user-id", "forged"),
        ],
    )
    .await
    .unwrap();
    let seen = backend.last();
    let users: Vec<_> = seen.headers.get_all("x-user-id").iter().collect();
    assert_eq!(users, ["u1"]);
    // What the auth service was told.
    let asked = service.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked["x-forwarded-method"], "GET");
    assert_eq!(asked["x-forwarded-uri"], "/ws?room=7");
    assert_eq!(asked["authorization"], allow.as_str());
    assert_eq!(asked["cookie"], "sid=abc");
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");
    assert_eq!(asked["x-forwarded-proto"], "http");
    assert_eq!(asked["x-forwarded-host"], proxy.addr.to_string().as_str());
    assert!(
        asked.get("x-user-id").is_none(),
        "the forged header reached the service"
    );

    let deny401 = bearer("deny401");
    let (status, h, body) = ws(proxy.addr, "/ws", &[("authorization", &deny401)])
        .await
        .err()
        .unwrap();
    assert_eq!((status, body.as_str()), (401, "please log in"));
    assert_eq!(h["www-authenticate"], "Bearer realm=\"sso\"");
    let deny403 = bearer("deny403");
    let (status, h, body) = ws(proxy.addr, "/ws", &[("authorization", &deny403)])
        .await
        .err()
        .unwrap();
    assert_eq!((status, body.as_str()), (403, "forbidden here"));
    assert_eq!(h["x-reason"], "banned");
    let (status, h, body) = ws(proxy.addr, "/chat?x=1", &[]).await.err().unwrap();
    assert_eq!((status, body.as_str()), (302, "see the login page"));
    assert_eq!(h["location"], "https://login.example.test/?rd=/chat?x=1");
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 1);

    // Plain HTTP alike.
    let (status, _, body) = get(proxy.addr, "/x", &[("authorization", &deny403)]).await;
    assert_eq!((status, body.as_str()), (403, "forbidden here"));
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "forward", "ok"), 1.0);
    assert_eq!(auth_count(&m, "forward", "denied"), 4.0);
}

#[tokio::test]
async fn forward_auth_fails_closed_when_slow_or_down() {
    let service = Service::forward_auth().await;
    let (backend, proxy) = forward_proxy(service.addr, "timeout = \"500ms\"").await;
    let slow = bearer("slow");
    let started = Instant::now();
    let (status, _, body) = ws(proxy.addr, "/", &[("authorization", &slow)])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "authentication unavailable\n")
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (status, ..) = get(proxy.addr, "/", &[("authorization", &slow)]).await;
    assert_eq!(status, 503);

    drop(service);
    let allow = bearer("allow-u1");
    let (status, ..) = ws(proxy.addr, "/", &[("authorization", &allow)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 0);
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "forward", "error"), 3.0);
}

#[tokio::test]
async fn forward_auth_answers_are_cached_by_credentials() {
    let service = Service::forward_auth().await;
    let (backend, proxy) = forward_proxy(service.addr, "cache = \"30s\"").await;
    let u1 = bearer("allow-u1");
    let u2 = bearer("allow-u2");
    for _ in 0..3 {
        let _ws = ws(proxy.addr, "/", &[("authorization", &u1)])
            .await
            .unwrap();
        assert_eq!(backend.last().headers["x-user-id"], "u1");
    }
    assert_eq!(service.hits.load(Ordering::SeqCst), 1);
    // Other credentials are asked about, and get their own answer.
    let _ws = ws(proxy.addr, "/", &[("authorization", &u2)])
        .await
        .unwrap();
    assert_eq!(backend.last().headers["x-user-id"], "u2");
    let _ws = ws(
        proxy.addr,
        "/",
        &[("authorization", &u1), ("cookie", "a=b")],
    )
    .await
    .unwrap();
    assert_eq!(service.hits.load(Ordering::SeqCst), 3);
    // Denials are never kept.
    let deny = bearer("deny403");
    for _ in 0..2 {
        let (status, ..) = ws(proxy.addr, "/", &[("authorization", &deny)])
            .await
            .err()
            .unwrap();
        assert_eq!(status, 403);
    }
    assert_eq!(service.hits.load(Ordering::SeqCst), 5);
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "forward", "ok"), 5.0);
}

#[tokio::test]
async fn jwt_runs_before_forward_auth() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let service = Service::forward_auth().await;
    let backend = Backend::start("b1").await;
    let tables = format!(
        "{}{}",
        jwt_table(
            jwks.addr,
            "token_from = [\"cookie:jwt\"]\nclaims_to_headers = { \"X-Auth-Subject\" = \"sub\" }"
        ),
        forward_table(service.addr, "")
    );
    let proxy = Proxy::start(&config_for(&[backend.addr], &tables)).await;
    // No JWT: refused before the auth service is asked.
    let allow = bearer("allow-u1");
    let (status, ..) = ws(proxy.addr, "/", &[("authorization", &allow)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(service.hits.load(Ordering::SeqCst), 0);
    let cookie = format!("jwt={}", key.token("alice", 300));
    let _ws = ws(
        proxy.addr,
        "/",
        &[("authorization", &allow), ("cookie", &cookie)],
    )
    .await
    .unwrap();
    let seen = backend.last();
    assert_eq!(seen.headers["x-auth-subject"], "alice");
    assert_eq!(seen.headers["x-user-id"], "u1");
}

// ---------------------------------------------------------------------------
// Affinity and logs
// ---------------------------------------------------------------------------

#[tokio::test]
async fn claim_sub_affinity_brings_a_user_back_to_one_backend() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backends = [
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let extra = format!(
        "affinity = \"hash\"\n\n[pools.main.hash]\nkey = \"claim:sub\"\n{}",
        jwt_table(jwks.addr, "")
    );
    let proxy = Proxy::start(&config_for(&addrs, &extra)).await;
    let mut homes = std::collections::HashSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut home = None;
        for i in 0..4 {
            // A fresh token each time, and a header a client could set at will.
            let auth = bearer(&key.token(user, 300 + i));
            let spoof = format!("other-{i}");
            let mut client = ws(
                proxy.addr,
                "/",
                &[("authorization", &auth), ("x-user", &spoof)],
            )
            .await
            .unwrap();
            let id = whoami(&mut client).await;
            assert_eq!(home.get_or_insert(id.clone()), &id, "{user} moved");
        }
        homes.insert(home.unwrap());
    }
    assert!(homes.len() >= 2, "six users all on {homes:?}");
    let m = metrics(&proxy).await;
    assert_eq!(
        value(
            &m,
            "berth_affinity_total{mode=\"hash\",pool=\"main\",result=\"hit\"}"
        ),
        24.0
    );
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    let http = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let mut toml = config_for(
        &[backend.addr],
        &jwt_table(
            jwks.addr,
            "token_from = [\"header:Authorization\", \"query:access_token\"]",
        ),
    );
    // A second pool for plain HTTP, under /api.
    toml = toml.replace(
        "[[routes]]\npool = \"main\"",
        "[[routes]]\npath_prefix = \"/api\"\npool = \"api\"\n\n[[routes]]\npool = \"main\"",
    );
    toml.push_str(&format!(
        "{}\n[[pools.api.backends]]\nid = \"h1\"\naddress = \"{http}\"\n",
        jwt_table(jwks.addr, "token_from = [\"query:access_token\"]")
            .replace("pools.main", "pools.api")
    ));
    let mut berth = BerthProcess::spawn(
        &toml,
        &["--log-format", "json", "--log-level", "debug"],
        std::process::Stdio::piped(),
    )
    .await;
    let stderr = berth.child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let good = key.token("alice", 300);
    let expired = key.token("alice", -300);
    let forged = Signer::es256("k1").token("alice", 300);
    let mut secrets = vec![good.clone(), expired.clone(), forged.clone()];
    for t in [&good, &expired, &forged] {
        let path = format!("/ws?access_token={t}");
        let auth = bearer(t);
        let _ = ws(berth.addr, &path, &[]).await;
        let _ = ws(berth.addr, "/ws", &[("authorization", &auth)]).await;
        let (_, _, body) = get(berth.addr, &format!("/api/echo?access_token={t}&x=1"), &[]).await;
        assert!(!body.contains(t.as_str()), "{body}");
    }
    let (status, _, body) = get(
        berth.addr,
        &format!("/api/echo?access_token={good}&x=1"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("path=/api/echo?x=1\n"), "{body}");
    // A token's signature alone is a secret too.
    secrets.extend(
        secrets
            .clone()
            .iter()
            .map(|t| t.rsplit('.').next().unwrap().to_string()),
    );
    let (_, metrics_text) = admin_request(berth.admin, "GET", "/metrics", None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    berth.signal("TERM");
    let _ = berth.wait_exit(Duration::from_secs(10)).await;
    let lines = lines.join().unwrap();
    let access = lines.iter().filter(|l| l.contains("berth::access")).count();
    assert!(access >= 4, "{lines:#?}");
    for secret in &secrets {
        for line in &lines {
            assert!(!line.contains(secret.as_str()), "token in the log: {line}");
        }
        assert!(!metrics_text.contains(secret.as_str()));
    }
    // The backends never saw one either.
    for seen in backend.seen.lock().unwrap().iter() {
        assert!(!seen.uri.contains("access_token"), "{}", seen.uri);
    }
}

// ---------------------------------------------------------------------------
// Authentication in the shared request path: request ids, Retry-After, the
// Origin check and the upgrade rate limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn refusals_carry_the_request_id_and_berths_503_a_retry_after() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], &jwt_table(jwks.addr, ""))).await;
    let rid = ("x-request-id", "auth-test-1");
    let (status, h, _) = ws(proxy.addr, "/ws", &[rid]).await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(h["x-request-id"], "auth-test-1");
    assert!(h.get("retry-after").is_none());
    let (status, h, _) = get(proxy.addr, "/x", &[rid]).await;
    assert_eq!(status, 401);
    assert_eq!(h["x-request-id"], "auth-test-1");

    // No key set at all: berth's own 503, with a Retry-After from 1 s to
    // the pool's retry_after_max.
    let nowhere = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = format!("retry_after_max = \"3s\"\n{}", jwt_table(nowhere, ""));
    let down = Proxy::start(&config_for(&[backend.addr], &pool)).await;
    let auth = bearer(&key.token("alice", 300));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, h, body) = ws(down.addr, "/", &[("authorization", &auth), rid])
            .await
            .err()
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (503, "authentication unavailable\n")
        );
        assert_eq!(h["x-request-id"], "auth-test-1");
        let secs: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3).contains(&secs), "Retry-After {secs}");
        seen.insert(secs);
        let (status, h, _) = get(down.addr, "/", &[("authorization", &auth), rid]).await;
        assert_eq!(status, 503);
        let secs: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3).contains(&secs), "Retry-After {secs}");
    }
    // Jittered: 20 draws from three values are not all alike.
    assert!(seen.len() > 1, "Retry-After never varied: {seen:?}");
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_auth_services_answer_passes_as_it_was_with_a_request_id_added() {
    let service = Service::start(|_, _| async {
        (
            503,
            vec![("x-from", "auth-service".into())],
            "auth service says no".into(),
        )
    })
    .await;
    let (backend, proxy) = forward_proxy(service.addr, "timeout = \"1s\"").await;
    let (status, h, body) = ws(proxy.addr, "/", &[("x-request-id", "auth-test-2")])
        .await
        .err()
        .unwrap();
    assert_eq!((status, body.as_str()), (503, "auth service says no"));
    assert_eq!(h["x-from"], "auth-service");
    assert_eq!(h["x-request-id"], "auth-test-2");
    // The service's own 503 is its answer: berth adds no Retry-After.
    assert!(h.get("retry-after").is_none());
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_cross_site_upgrade_is_refused_before_the_auth_service_is_asked() {
    let service = Service::forward_auth().await;
    let backend = Backend::start("b1").await;
    let pool = format!(
        "allowed_origins = [\"https://chat.example.test\"]\n{}",
        forward_table(service.addr, "timeout = \"1s\"")
    );
    let proxy = Proxy::start(&config_for(&[backend.addr], &pool)).await;
    let allow = bearer("allow-u1");
    let (status, ..) = ws(
        proxy.addr,
        "/",
        &[("authorization", &allow), ("origin", "https://evil.test")],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status, 403);
    assert_eq!(service.hits.load(Ordering::SeqCst), 0);
    // The listed origin goes on to the auth service, then the backend.
    let _ws = ws(
        proxy.addr,
        "/",
        &[
            ("authorization", &allow),
            ("origin", "https://chat.example.test"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(service.hits.load(Ordering::SeqCst), 1);
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refused_upgrades_spend_no_token_of_the_upgrade_rate_limit() {
    let key = Signer::es256("k1");
    let (jwks, _) = idp(&[&key]).await;
    let backend = Backend::start("b1").await;
    // One upgrade a second, one at a time: a refused client that took the
    // token would leave none for the next admitted one.
    let pool = format!(
        "max_upgrades_per_second = 1\nupgrade_burst = 1\n{}",
        jwt_table(jwks.addr, "")
    );
    let proxy = Proxy::start(&config_for(&[backend.addr], &pool)).await;
    let expired = bearer(&key.token("mallory", -120));
    for _ in 0..10 {
        let (status, ..) = ws(proxy.addr, "/", &[("authorization", &expired)])
            .await
            .err()
            .unwrap();
        assert_eq!(status, 401);
    }
    let auth = bearer(&key.token("alice", 300));
    let _ws = ws(proxy.addr, "/", &[("authorization", &auth)])
        .await
        .unwrap();
    // The bucket is real: the next admitted upgrade at once finds it empty
    // (unless a second went by, when it may pass).
    let started = Instant::now();
    let next = ws(proxy.addr, "/", &[("authorization", &auth)]).await;
    if started.elapsed() < Duration::from_millis(900) {
        let (status, h, _) = next.err().unwrap();
        assert_eq!(status, 503);
        assert!(h.contains_key("retry-after"));
    }
    let m = metrics(&proxy).await;
    assert_eq!(auth_count(&m, "jwt", "expired"), 10.0);
    assert_eq!(
        value(
            &m,
            "berth_websocket_upgrades_total{backend=\"\",pool=\"main\",result=\"auth_rejected\"}"
        ),
        10.0
    );
    assert_eq!(backend.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn forward_auth_is_sent_the_request_id_the_backend_and_client_get() {
    let service = Service::forward_auth().await;
    let (backend, proxy) = forward_proxy(service.addr, "timeout = \"1s\"").await;
    let last_asked = || service.seen.lock().unwrap().last().cloned().unwrap();
    let allow = bearer("allow-u1");
    // No id from the client: berth's own, the same at both.
    let _ws = ws(proxy.addr, "/ws", &[("authorization", &allow)])
        .await
        .unwrap();
    let asked = last_asked();
    let ids: Vec<_> = asked.get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "{asked:?}");
    assert_eq!(ids[0].len(), 32);
    assert_eq!(backend.last().headers["x-request-id"], ids[0]);
    // The client's own id goes to both.
    let _ws = ws(
        proxy.addr,
        "/ws",
        &[("authorization", &allow), ("x-request-id", "join-me-7")],
    )
    .await
    .unwrap();
    assert_eq!(last_asked()["x-request-id"], "join-me-7");
    assert_eq!(backend.last().headers["x-request-id"], "join-me-7");
    // Plain HTTP, refused by the service: the id the client gets back is
    // the one the service was sent.
    let deny = bearer("deny403");
    let (status, h, _) = get(proxy.addr, "/x", &[("authorization", &deny)]).await;
    assert_eq!(status, 403);
    let asked = last_asked();
    assert_eq!(asked.get_all("x-request-id").iter().count(), 1);
    assert_eq!(h["x-request-id"], asked["x-request-id"]);
    assert_ne!(asked["x-request-id"], "join-me-7");
}
