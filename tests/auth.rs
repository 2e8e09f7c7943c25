//! Authentication against a real in-test OIDC issuer (discovery and JWKS
//! over HTTP, RSA and EC keys): valid tokens, every attack case, key
//! rotation, the unknown-kid flood, an IdP that is down at start, and the
//! relay-client's token sources.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::backend::Backend;
use common::idp::{Idp, Key};
use common::{Relay, RelayClient, bounded, client_config, eventually};
use http_relay::config::{AuthMode, BackendAuth, ClientAuthMethod, IssuerConfig, ServerConfig};
use http_relay::proto::{HttpRequest, HttpResponse};
use jsonwebtoken::Algorithm;
use prost::Message as _;
use serde_json::json;

const USER_AUD: &str = "https://relay.test/client/{backend}";
const RELAY_AUD: &str = "https://relay.test/backend/{backend}";

fn user_aud(b: &str) -> String {
    USER_AUD.replace("{backend}", b)
}
fn relay_aud(b: &str) -> String {
    RELAY_AUD.replace("{backend}", b)
}

fn jwt_config(cfg: &mut ServerConfig, idp: &Idp) {
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.user_audience = USER_AUD.into();
    cfg.auth.relay_audience = RELAY_AUD.into();
    cfg.auth.issuers = vec![IssuerConfig {
        issuer: idp.url.clone(),
        jwks_uri: None,
        jwks_file: None,
        algorithms: Vec::new(),
    }];
    cfg.auth.unknown_kid_cooldown = Duration::from_millis(300);
}

async fn relay_with(idp: &Idp, edit: impl FnOnce(&mut ServerConfig)) -> Relay {
    let relay = Relay::start(|c| {
        jwt_config(c, idp);
        edit(c);
    })
    .await;
    wait_keys_loaded(&relay, idp).await;
    relay
}

/// Waits until the server has loaded the IdP's keys.
async fn wait_keys_loaded(relay: &Relay, idp: &Idp) {
    let token = idp.sign("rsa-1", &idp.claims(&user_aud("nobody"), "probe"));
    eventually(|| async {
        let (_, body, _) = user_status(relay, "nobody", &token).await;
        (!body.contains("identity provider")).then_some(())
    })
    .await
}

fn token_file(token: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), token).unwrap();
    f
}

/// A relay-client for `backend` whose token comes from a file.
fn client_with_token(
    relay: &Relay,
    backend: &str,
    backend_url: &str,
    file: &tempfile::NamedTempFile,
) -> RelayClient {
    let mut cfg = client_config(relay, backend, backend_url);
    cfg.auth.token_file = Some(file.path().to_owned());
    RelayClient::start(cfg)
}

/// Waits until a user request with `token` for `backend` is answered 200.
async fn wait_served(relay: &Relay, backend: &str, token: &str) -> String {
    let url = format!("{}/client/{backend}/who", relay.url);
    eventually(|| async {
        let resp = relay
            .http()
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .ok()?;
        if resp.status() != 200 {
            return None;
        }
        resp.text().await.ok()
    })
    .await
}

async fn user_status(relay: &Relay, backend: &str, token: &str) -> (u16, String, Option<String>) {
    let resp = relay
        .http()
        .get(format!("{}/client/{backend}/x", relay.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), resp.text().await.unwrap(), www)
}

#[tokio::test]
async fn valid_rsa_and_ec_tokens_relay_and_the_token_is_not_forwarded() {
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let file = token_file(&idp.sign("ec-1", &idp.claims(&relay_aud("robot-1"), "robot-1")));
    let _client = client_with_token(&relay, "robot-1", &backend.url, &file);

    for kid in ["rsa-1", "ec-1"] {
        let token = idp.sign(kid, &idp.claims(&user_aud("robot-1"), "alice"));
        let text = wait_served(&relay, "robot-1", &token).await;
        assert!(
            !text.to_lowercase().contains("authorization"),
            "token relayed: {text}"
        );
    }

    let (status, body, www) = user_status(&relay, "robot-1", "").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(www.as_deref(), Some("Bearer error=\"invalid_token\""));
    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/x", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "no token at all");
}

#[tokio::test]
async fn attacks_are_refused_with_401() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let aud = user_aud("robot-1");
    let now = jsonwebtoken::get_current_timestamp();
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut expired = idp.claims(&aud, "eve");
    expired["exp"] = json!(now - 3600);
    cases.push(("expired", idp.sign("rsa-1", &expired), "expired"));
    let mut future = idp.claims(&aud, "eve");
    future["nbf"] = json!(now + 3600);
    cases.push((
        "nbf in the future",
        idp.sign("ec-1", &future),
        "not valid yet",
    ));
    let mut no_exp = idp.claims(&aud, "eve");
    no_exp.as_object_mut().unwrap().remove("exp");
    cases.push(("no exp", idp.sign("ec-1", &no_exp), "exp"));
    let mut other_iss = idp.claims(&aud, "eve");
    other_iss["iss"] = json!("https://evil.example");
    cases.push(("wrong issuer", idp.sign("rsa-1", &other_iss), "issuer"));
    // A foreign key that claims a published kid.
    let forged = Idp::sign_with(
        &Key::generate("rsa-1", Algorithm::RS256),
        &idp.claims(&aud, "eve"),
    );
    cases.push(("signed by another key", forged, "signature"));
    // alg: none, no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
        b64(&idp.claims(&aud, "eve"))
    );
    cases.push(("alg none", none, "malformed"));
    // HS256 with the RSA public key as the shared secret.
    let rsa = idp.key("rsa-1");
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let hs = jsonwebtoken::encode(
        &header,
        &idp.claims(&aud, "eve"),
        &jsonwebtoken::EncodingKey::from_secret(rsa.public_pem.as_bytes()),
    )
    .unwrap();
    cases.push(("HS256 with the public key", hs, "algorithm"));
    // ES256 header on the RSA key's kid: key confusion.
    let ec_key_rsa_kid = Key {
        kid: "rsa-1".into(),
        ..idp.key("ec-1")
    };
    cases.push((
        "alg does not fit the key",
        Idp::sign_with(&ec_key_rsa_kid, &idp.claims(&aud, "eve")),
        "does not match",
    ));
    // Tampered payload: the signature was made over other claims.
    let good = idp.sign("rsa-1", &idp.claims(&user_aud("other"), "eve"));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&idp.claims(&aud, "eve")),
        parts[2]
    );
    cases.push(("tampered payload", tampered, "signature"));
    cases.push(("garbage", "not-a-jwt".into(), "malformed"));
    // A kid the IdP never published: one refetch, then refused.
    let unknown = Idp::sign_with(
        &Key::generate("never-published", Algorithm::ES256),
        &idp.claims(&aud, "eve"),
    );
    cases.push(("unknown kid", unknown, "unknown key"));

    // The last refetch is past the 300 ms cooldown, so the unknown kid
    // may refetch exactly once.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let fetches_before = idp.jwks_fetches();
    for (name, token, expect) in cases {
        let (status, body, www) = user_status(&relay, "robot-1", &token).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert!(body.contains(expect), "{name}: {expect:?} not in {body:?}");
        assert!(!body.contains(&token), "{name}: body echoes the token");
        assert_eq!(
            www.as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{name}"
        );
    }

    assert_eq!(
        idp.jwks_fetches() - fetches_before,
        1,
        "one refetch for the unknown kid"
    );

    // Every failure is counted by reason.
    let metrics = relay.get_text("/metrics").await;
    for reason in [
        "expired",
        "not_yet_valid",
        "bad_signature",
        "unknown_issuer",
        "unknown_kid",
        "algorithm",
        "malformed",
    ] {
        assert!(
            metrics.contains(&format!("relay_auth_failures_total{{reason=\"{reason}\"}}")),
            "{reason} not counted:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn roles_and_backends_do_not_mix() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let http = relay.http();
    let user_a = idp.sign("rsa-1", &idp.claims(&user_aud("robot-a"), "alice"));
    let relay_a = idp.sign("ec-1", &idp.claims(&relay_aud("robot-a"), "robot-a"));
    let relay_b = idp.sign("ec-1", &idp.claims(&relay_aud("robot-b"), "robot-b"));

    // A user token never works as a relay token.
    let poll = |backend: &str, token: &str| {
        http.get(format!("{}/server/request?server={backend}", relay.url))
            .bearer_auth(token.to_owned())
            .timeout(Duration::from_secs(2))
            .send()
    };
    let resp = poll("robot-a", &user_a).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains(&relay_aud("robot-a")));
    // A relay token for A cannot register B.
    assert_eq!(poll("robot-b", &relay_a).await.unwrap().status(), 403);
    // And a relay token is no user token.
    let (status, _, _) = user_status(&relay, "robot-a", &relay_a).await;
    assert_eq!(status, 403);
    // A user token for A does not reach B.
    let (status, body, _) = user_status(&relay, "robot-b", &user_a).await;
    assert_eq!(status, 403, "{body}");

    // B polls with its own token and gets a request...
    let user_b = idp.sign("rsa-1", &idp.claims(&user_aud("robot-b"), "bob"));
    let user_b_again = user_b.clone();
    let _ = poll("robot-b", &relay_b).await; // registers B
    let waiting = tokio::spawn({
        let http = relay.http();
        let url = format!("{}/client/robot-b/secret", relay.url);
        async move { http.get(url).bearer_auth(user_b).send().await.unwrap() }
    });
    let req = bounded(async {
        loop {
            let resp = poll("robot-b", &relay_b).await.unwrap();
            if resp.status() == 200 {
                return HttpRequest::decode(resp.bytes().await.unwrap()).unwrap();
            }
        }
    })
    .await;
    let id = req.id.unwrap();
    // ... and A's relay token cannot answer it or read its stream.
    let answer = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(200),
        body: Some(Bytes::from_static(b"from A")),
        eof: Some(true),
        ..Default::default()
    };
    let post = |token: &str| {
        http.post(format!("{}/server/response", relay.url))
            .bearer_auth(token.to_owned())
            .body(answer.encode_to_vec())
            .send()
    };
    assert_eq!(
        post(&user_b_again).await.unwrap().status(),
        403,
        "user token, refused before the body is read"
    );
    assert_eq!(post(&relay_a).await.unwrap().status(), 403);
    let stream = http
        .post(format!("{}/server/requeststream?id={id}", relay.url))
        .bearer_auth(&relay_a)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 403);
    // B's own token can.
    assert_eq!(post(&relay_b).await.unwrap().status(), 200);
    let resp = bounded(waiting).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "from A");
}

#[tokio::test]
async fn per_backend_audiences_and_required_claims() {
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.backends.insert(
            "robot-1".into(),
            BackendAuth {
                user_audiences: vec!["https://fleet.test/robots".into()],
                relay_audiences: Vec::new(),
                required_claims: [("groups".to_owned(), "fleet-ops".to_owned())].into(),
            },
        );
    })
    .await;
    let mut relay_claims = idp.claims(&relay_aud("robot-1"), "robot-1");
    relay_claims["groups"] = json!(["robots", "fleet-ops"]);
    let file = token_file(&idp.sign("ec-1", &relay_claims));
    let _client = client_with_token(&relay, "robot-1", &backend.url, &file);

    let mut claims = idp.claims("https://fleet.test/robots", "ops");
    claims["groups"] = json!(["fleet-ops"]);
    wait_served(&relay, "robot-1", &idp.sign("rsa-1", &claims)).await;

    claims["groups"] = json!(["visitors"]);
    let (status, body, _) = user_status(&relay, "robot-1", &idp.sign("rsa-1", &claims)).await;
    assert_eq!(status, 403);
    assert!(body.contains("groups=fleet-ops"), "{body}");
}

#[tokio::test]
async fn key_rotation_works_without_restart() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let aud = user_aud("robot-1");
    // 503 would mean "keys not loaded"; an unknown backend (503 too) is
    // avoided by checking the refusal text.
    let signed_before = idp.sign("rsa-1", &idp.claims(&aud, "alice"));

    idp.add_key(Key::generate("rsa-2", Algorithm::RS256));
    tokio::time::sleep(Duration::from_millis(400)).await; // past the cooldown
    let signed_after = idp.sign("rsa-2", &idp.claims(&aud, "alice"));
    let (status, body, _) = user_status(&relay, "robot-1", &signed_after).await;
    assert_eq!(status, 503, "authenticated, then unknown client: {body}");
    assert!(body.contains("unknown client"), "{body}");
    // The old key is still published: tokens signed before still work.
    let (status, body, _) = user_status(&relay, "robot-1", &signed_before).await;
    assert!(body.contains("unknown client"), "{status} {body}");

    // Once the IdP stops publishing it, the next refresh drops it.
    idp.remove_key("rsa-1");
    idp.add_key(Key::generate("rsa-3", Algorithm::RS256));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let newest = idp.sign("rsa-3", &idp.claims(&aud, "alice"));
    let (_, body, _) = user_status(&relay, "robot-1", &newest).await;
    assert!(body.contains("unknown client"), "{body}");
    let (status, _, _) = user_status(&relay, "robot-1", &signed_before).await;
    assert_eq!(status, 401, "key no longer published");
}

#[tokio::test]
async fn random_kid_flood_fetches_jwks_at_most_once_per_window() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.unknown_kid_cooldown = Duration::from_secs(60)
    })
    .await;
    let before = idp.jwks_fetches();
    let aud = user_aud("robot-1");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let token = Idp::sign_with(
            &Key::generate(&format!("random-{i}"), Algorithm::ES256),
            &idp.claims(&aud, "x"),
        );
        let http = relay.http();
        let url = format!("{}/client/robot-1/x", relay.url);
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap(), 401);
    }
    let fetched = idp.jwks_fetches() - before;
    assert!(fetched <= 1, "{fetched} JWKS fetches for 200 random kids");
}

#[tokio::test]
async fn idp_down_at_start_gives_503_then_recovers() {
    let idp = Idp::start().await;
    idp.set_up(false);
    let relay = Relay::start(|c| jwt_config(c, &idp)).await;
    let token = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
    let (status, body, _) = user_status(&relay, "robot-1", &token).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("identity provider"), "{body}");
    assert_eq!(
        relay
            .http()
            .get(format!("{}/healthz", relay.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    idp.set_up(true);
    // Authenticated once the answer is "unknown client" (nobody polls).
    eventually(|| async {
        let (_, body, _) = user_status(&relay, "robot-1", &token).await;
        body.contains("unknown client").then_some(())
    })
    .await;
}

#[tokio::test]
async fn custom_token_header_and_cookie() {
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.token_header = "x-relay-token".into();
        c.auth.token_cookie = Some("relay_token".into());
    })
    .await;
    let file = token_file(&idp.sign("ec-1", &idp.claims(&relay_aud("robot-1"), "robot-1")));
    let _client = client_with_token(&relay, "robot-1", &backend.url, &file);
    let token = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
    eventually(|| async {
        let resp = relay
            .http()
            .get(format!("{}/client/robot-1/h", relay.url))
            .header("x-relay-token", &token)
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;

    let text = relay
        .http()
        .get(format!("{}/client/robot-1/h", relay.url))
        .header("x-relay-token", &token)
        .header("authorization", "Basic YmFja2VuZDpwdw==")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("authorization: Basic YmFja2VuZDpwdw=="),
        "backend auth kept: {text}"
    );
    assert!(!text.contains("x-relay-token"), "{text}");

    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/c", relay.url))
        .header(
            "cookie",
            format!("theme=dark; relay_token={token}; lang=en"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("cookie: theme=dark; lang=en"), "{text}");
    assert!(!text.contains(&token), "{text}");
}

#[tokio::test]
async fn client_rereads_its_token_file() {
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    // First a token for the wrong backend: the server refuses the polls.
    let file = token_file(&idp.sign("ec-1", &idp.claims(&relay_aud("someone-else"), "robot-1")));
    let _client = client_with_token(&relay, "robot-1", &backend.url, &file);
    let refused = || async {
        let metrics = relay.get_text("/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("relay_auth_failures_total{reason=\"wrong_audience\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    eventually(|| async { (refused().await >= 1.0).then_some(()) }).await;
    // Refused, the client backs off instead of spinning: at most one more
    // refused poll per pending poll (4) in the next half second.
    let first = refused().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let more = refused().await - first;
    assert!(more <= 4.0, "{more} refused polls in 500 ms");
    let user = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
    let (status, body, _) = user_status(&relay, "robot-1", &user).await;
    assert_eq!(status, 503, "not registered with a refused token: {body}");

    // The file is rotated (as a projected token would be); no restart.
    std::fs::write(
        file.path(),
        idp.sign("ec-1", &idp.claims(&relay_aud("robot-1"), "robot-1")),
    )
    .unwrap();
    wait_served(&relay, "robot-1", &user).await;
}

/// A relay-client `robot-1` using the client-credentials grant at `idp`.
fn credentials_client(
    relay: &Relay,
    idp: &Idp,
    backend: &Backend,
    secret: &tempfile::NamedTempFile,
) -> http_relay::config::ClientConfig {
    let mut cfg = client_config(relay, "robot-1", &backend.url);
    cfg.auth.issuer = Some(idp.url.clone());
    cfg.auth.client_id = Some("robot-1".into());
    cfg.auth.client_secret_file = Some(secret.path().to_owned());
    cfg.auth.audience = Some(relay_aud("robot-1"));
    cfg
}

async fn client_credentials(method: ClientAuthMethod) {
    let idp = Idp::start().await;
    idp.add_client("robot-1", "s3cret:/&");
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let secret = token_file("s3cret:/&\n");
    let mut cfg = credentials_client(&relay, &idp, &backend, &secret);
    cfg.auth.client_auth = method;
    let _client = RelayClient::start(cfg);
    let user = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
    wait_served(&relay, "robot-1", &user).await;

    let calls = idp.token_calls();
    assert!(!calls.is_empty());
    let call = &calls[0];
    assert_eq!(
        call.form.get("grant_type").map(String::as_str),
        Some("client_credentials")
    );
    assert_eq!(call.form.get("resource"), Some(&relay_aud("robot-1")));
    assert_eq!(call.form.get("audience"), Some(&relay_aud("robot-1")));
    match method {
        ClientAuthMethod::ClientSecretBasic => {
            assert!(call.basic_auth.is_some());
            assert!(!call.form.contains_key("client_secret"));
        }
        ClientAuthMethod::ClientSecretPost => {
            assert!(call.basic_auth.is_none());
            assert_eq!(
                call.form.get("client_secret").map(String::as_str),
                Some("s3cret:/&")
            );
        }
    }
    // Tokens are reused until close to expiry, not fetched per call.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        idp.token_calls().len() <= 2,
        "{} token calls",
        idp.token_calls().len()
    );
}

#[tokio::test]
async fn client_credentials_basic() {
    client_credentials(ClientAuthMethod::ClientSecretBasic).await;
}

#[tokio::test]
async fn client_credentials_post() {
    client_credentials(ClientAuthMethod::ClientSecretPost).await;
}

#[tokio::test]
async fn client_credentials_refresh_before_expiry() {
    let idp = Idp::start().await;
    idp.add_client("robot-1", "pw");
    idp.set_token_ttl(12); // refreshed 10 s before expiry, i.e. after ~2 s
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let secret = token_file("pw");
    let cfg = credentials_client(&relay, &idp, &backend, &secret);
    let _client = RelayClient::start(cfg);
    let user = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
    wait_served(&relay, "robot-1", &user).await;
    bounded(async {
        while idp.token_calls().len() < 2 {
            // Each request makes the client post with a (fresh) token.
            wait_served(&relay, "robot-1", &user).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}
