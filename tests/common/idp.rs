//! An in-test OIDC identity provider on 127.0.0.1: discovery, JWKS (RSA
//! and EC keys, rotatable), and a client-credentials token endpoint.
//! Every endpoint counts its calls; the JWKS and token endpoints can be
//! made slow (to overlap concurrent callers with one answer) and the token
//! endpoint can fail, and both report how many calls are in flight.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// One signing key of the IdP.
#[derive(Clone)]
pub struct Key {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
    /// SPKI PEM of the public key (for key-confusion attacks).
    pub public_pem: String,
}

impl Key {
    pub fn generate(kid: &str, alg: Algorithm) -> Key {
        let pair = match alg {
            Algorithm::RS256 | Algorithm::PS256 => {
                rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
            }
            Algorithm::ES256 => rcgen::KeyPair::generate().unwrap(),
            Algorithm::ES384 => {
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap()
            }
            other => panic!("no test key for {other:?}"),
        };
        let pem = pair.serialize_pem();
        let encoding = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()
            }
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        };
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Key {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
            public_pem: pair.public_key_pem(),
        }
    }
}

/// What the token endpoint saw.
#[derive(Debug, Clone)]
pub struct TokenCall {
    pub form: HashMap<String, String>,
    pub basic_auth: Option<String>,
    /// When the call arrived.
    pub at: Instant,
}

/// Counts a call in flight while alive, and the most ever in flight at
/// once; a call whose connection goes away mid-answer is uncounted too.
struct InFlight<'a> {
    now: &'a AtomicUsize,
}

impl<'a> InFlight<'a> {
    fn enter(now: &'a AtomicUsize, max: &AtomicUsize) -> Self {
        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(n, Ordering::SeqCst);
        InFlight { now }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Shared {
    url: String,
    keys: Mutex<Vec<Key>>,
    up: AtomicBool,
    jwks_fetches: AtomicUsize,
    jwks_delay: Mutex<Duration>,
    jwks_in_flight: AtomicUsize,
    jwks_max_in_flight: AtomicUsize,
    discovery_calls: AtomicUsize,
    cache_control: Mutex<Option<String>>,
    clients: Mutex<HashMap<String, String>>,
    token_calls: Mutex<Vec<TokenCall>>,
    token_ttl: Mutex<u64>,
    token_delay: Mutex<Duration>,
    token_fail: AtomicBool,
    token_redirect: AtomicBool,
    elsewhere_calls: AtomicUsize,
    tokens_issued: AtomicUsize,
    token_in_flight: AtomicUsize,
    token_max_in_flight: AtomicUsize,
}

/// A running test IdP.
pub struct Idp {
    pub url: String,
    shared: Arc<Shared>,
    _task: tokio::task::JoinHandle<()>,
}

impl Idp {
    /// Starts with an RSA key `rsa-1` (RS256) and an EC key `ec-1` (ES256).
    pub async fn start() -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let shared = Arc::new(Shared {
            url: url.clone(),
            keys: Mutex::new(vec![
                Key::generate("rsa-1", Algorithm::RS256),
                Key::generate("ec-1", Algorithm::ES256),
            ]),
            up: AtomicBool::new(true),
            jwks_fetches: AtomicUsize::new(0),
            jwks_delay: Mutex::new(Duration::ZERO),
            jwks_in_flight: AtomicUsize::new(0),
            jwks_max_in_flight: AtomicUsize::new(0),
            discovery_calls: AtomicUsize::new(0),
            cache_control: Mutex::new(None),
            clients: Mutex::new(HashMap::new()),
            token_calls: Mutex::new(Vec::new()),
            token_ttl: Mutex::new(3600),
            token_delay: Mutex::new(Duration::ZERO),
            token_fail: AtomicBool::new(false),
            token_redirect: AtomicBool::new(false),
            elsewhere_calls: AtomicUsize::new(0),
            tokens_issued: AtomicUsize::new(0),
            token_in_flight: AtomicUsize::new(0),
            token_max_in_flight: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if !s.up.load(Ordering::SeqCst) {
                    drop(tcp); // unreachable: the connection just closes
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Idp {
            url,
            shared,
            _task: task,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
    }

    /// JWKS requests received (counted on arrival).
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// JWKS answers wait this long (default none).
    pub fn set_jwks_delay(&self, delay: Duration) {
        *self.shared.jwks_delay.lock().unwrap() = delay;
    }

    /// JWKS requests being answered right now.
    pub fn jwks_in_flight(&self) -> usize {
        self.shared.jwks_in_flight.load(Ordering::SeqCst)
    }

    /// The most JWKS requests ever answered at the same time.
    pub fn jwks_max_in_flight(&self) -> usize {
        self.shared.jwks_max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests for the OIDC discovery document.
    pub fn discovery_calls(&self) -> usize {
        self.shared.discovery_calls.load(Ordering::SeqCst)
    }

    pub fn set_max_age(&self, secs: Option<u64>) {
        self.set_cache_control(secs.map(|s| format!("max-age={s}")).as_deref());
    }

    /// The `Cache-Control` of JWKS answers (none by default).
    pub fn set_cache_control(&self, value: Option<&str>) {
        *self.shared.cache_control.lock().unwrap() = value.map(str::to_owned);
    }

    pub fn key(&self, kid: &str) -> Key {
        self.shared
            .keys
            .lock()
            .unwrap()
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
            .unwrap()
    }

    /// Publishes a new key.
    pub fn add_key(&self, key: Key) {
        self.shared.keys.lock().unwrap().push(key);
    }

    /// Stops publishing a key.
    pub fn remove_key(&self, kid: &str) {
        self.shared.keys.lock().unwrap().retain(|k| k.kid != kid);
    }

    /// Signs `claims` with key `kid` (which need not be published).
    pub fn sign_with(key: &Key, claims: &Value) -> String {
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
    }

    /// Signs `claims` with the published key `kid`.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        Self::sign_with(&self.key(kid), claims)
    }

    /// Standard claims: this issuer, `aud`, valid for an hour from now.
    pub fn claims(&self, aud: &str, sub: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({"iss": self.url, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + 3600})
    }

    /// Registers a client-credentials client.
    pub fn add_client(&self, id: &str, secret: &str) {
        self.shared
            .clients
            .lock()
            .unwrap()
            .insert(id.to_owned(), secret.to_owned());
    }

    /// Lifetime (`expires_in`) of issued tokens. Their `exp` is rounded
    /// up, so a token stays valid for at least this long.
    pub fn set_token_ttl(&self, secs: u64) {
        *self.shared.token_ttl.lock().unwrap() = secs;
    }

    /// Token answers wait this long (default none).
    pub fn set_token_delay(&self, delay: Duration) {
        *self.shared.token_delay.lock().unwrap() = delay;
    }

    /// While set, the token endpoint answers 500.
    pub fn set_token_failing(&self, failing: bool) {
        self.shared.token_fail.store(failing, Ordering::SeqCst);
    }

    /// Every call of the token endpoint, answered or not, in arrival order.
    /// The token endpoint answers `307` to `/elsewhere` (after recording
    /// the call), as a misconfigured front end might.
    pub fn set_token_redirect(&self, redirect: bool) {
        self.shared.token_redirect.store(redirect, Ordering::SeqCst);
    }

    /// Requests that reached `/elsewhere`.
    pub fn elsewhere_calls(&self) -> usize {
        self.shared.elsewhere_calls.load(Ordering::SeqCst)
    }

    pub fn token_calls(&self) -> Vec<TokenCall> {
        self.shared.token_calls.lock().unwrap().clone()
    }

    /// Tokens handed out (calls answered 200).
    pub fn tokens_issued(&self) -> usize {
        self.shared.tokens_issued.load(Ordering::SeqCst)
    }

    /// Token calls being answered right now.
    pub fn token_in_flight(&self) -> usize {
        self.shared.token_in_flight.load(Ordering::SeqCst)
    }

    /// The most token calls ever answered at the same time.
    pub fn token_max_in_flight(&self) -> usize {
        self.shared.token_max_in_flight.load(Ordering::SeqCst)
    }
}

fn json_response(v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

fn status(code: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
    *r.status_mut() = code;
    r
}

async fn handle(
    s: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/.well-known/openid-configuration" => {
            s.discovery_calls.fetch_add(1, Ordering::SeqCst);
            json_response(json!({
                "issuer": s.url,
                "jwks_uri": format!("{}/jwks", s.url),
                "token_endpoint": format!("{}/token", s.url),
            }))
        }
        "/jwks" => {
            s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let _in_flight = InFlight::enter(&s.jwks_in_flight, &s.jwks_max_in_flight);
            let delay = *s.jwks_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let set = JwkSet {
                keys: s
                    .keys
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|k| k.jwk.clone())
                    .collect(),
            };
            let mut resp = json_response(serde_json::to_value(&set).unwrap());
            if let Some(value) = s.cache_control.lock().unwrap().as_deref() {
                resp.headers_mut()
                    .insert("cache-control", value.parse().unwrap());
            }
            resp
        }
        "/token" => {
            let _in_flight = InFlight::enter(&s.token_in_flight, &s.token_max_in_flight);
            let basic = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Basic "))
                .map(str::to_owned);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let form: HashMap<String, String> =
                form_urlencoded::parse(&body).into_owned().collect();
            s.token_calls.lock().unwrap().push(TokenCall {
                form: form.clone(),
                basic_auth: basic.clone(),
                at: Instant::now(),
            });
            if s.token_redirect.load(Ordering::SeqCst) {
                let mut r = status(StatusCode::TEMPORARY_REDIRECT, "");
                let to = format!("{}/elsewhere", s.url);
                r.headers_mut().insert("location", to.parse().unwrap());
                return Ok(r);
            }
            let delay = *s.token_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if s.token_fail.load(Ordering::SeqCst) {
                return Ok(status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "{\"error\":\"temporarily_unavailable\"}",
                ));
            }
            use base64::Engine as _;
            let (id, secret) = match basic {
                Some(b) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .unwrap_or_default();
                    let text = String::from_utf8(decoded).unwrap_or_default();
                    let (i, p) = text.split_once(':').unwrap_or_default();
                    // RFC 6749 2.3.1: both parts are form-urlencoded.
                    let decode = |s: &str| {
                        form_urlencoded::parse(format!("x={s}").as_bytes())
                            .next()
                            .unwrap()
                            .1
                            .into_owned()
                    };
                    (decode(i), decode(p))
                }
                None => (
                    form.get("client_id").cloned().unwrap_or_default(),
                    form.get("client_secret").cloned().unwrap_or_default(),
                ),
            };
            let known = s.clients.lock().unwrap().get(&id) == Some(&secret);
            if !known || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
                return Ok(status(
                    StatusCode::UNAUTHORIZED,
                    "{\"error\":\"invalid_client\"}",
                ));
            }
            let aud = form.get("resource").cloned().unwrap_or_default();
            let ttl = *s.token_ttl.lock().unwrap();
            let now = jsonwebtoken::get_current_timestamp();
            // `now` is rounded down: one more second keeps the token valid
            // for at least `expires_in`.
            let claims =
                json!({"iss": s.url, "aud": aud, "sub": id, "iat": now, "exp": now + ttl + 1});
            let key = s
                .keys
                .lock()
                .unwrap()
                .iter()
                .find(|k| k.alg == Algorithm::ES256)
                .cloned()
                .unwrap();
            s.tokens_issued.fetch_add(1, Ordering::SeqCst);
            json_response(json!({
                "access_token": Idp::sign_with(&key, &claims),
                "token_type": "Bearer",
                "expires_in": ttl,
            }))
        }
        "/elsewhere" => {
            s.elsewhere_calls.fetch_add(1, Ordering::SeqCst);
            status(StatusCode::NOT_FOUND, "not found")
        }
        _ => status(StatusCode::NOT_FOUND, "not found"),
    })
}
