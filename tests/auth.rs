//! Authentication against a real in-test OIDC issuer (discovery and JWKS
//! over HTTP, RSA and EC keys): valid tokens, every attack case, key
//! rotation, the unknown-kid flood, JWKS refresh on the IdP's schedule, a
//! configured `jwks_uri`, `leeway`, per-backend policy for both roles, the
//! token cookie on WebSockets, an IdP that is down at start, and the
//! relay-client's token sources (client-credentials reuse, refresh before
//! expiry without holding up requests, backoff while the IdP fails).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::backend::Backend;
use common::idp::{Idp, Key};
use common::{Relay, RelayClient, bounded, client_config, eventually};
use futures::{SinkExt as _, StreamExt as _};
use http_relay::config::{
    AuthMode, BackendAuth, ClientAuthMethod, IssuerConfig, ServerConfig, Transport,
};
use http_relay::proto::{HttpRequest, HttpResponse};
use jsonwebtoken::Algorithm;
use prost::Message as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

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

/// Only a request whose token passed makes its connection one that is
/// never closed to make room: with every place taken, a newcomer takes
/// the place of a connection whose request was refused (401), never that
/// of a connection whose token passed.
#[tokio::test]
async fn a_refused_token_does_not_keep_a_place_from_newcomers() {
    use tokio::io::AsyncReadExt as _;
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |c| c.limits.max_connections = 3).await;
    let valid = format!(
        "authorization: Bearer {}\r\n",
        idp.sign("rsa-1", &idp.claims(&user_aud("nobody"), "alice"))
    );
    let mut refused = relay.tls_connect().await;
    let wrong = "authorization: Bearer not-a-token\r\n";
    assert_eq!(
        common::http1_get(&mut refused, "/client/nobody/x", wrong)
            .await
            .0,
        401
    );
    let mut passed = relay.tls_connect().await;
    // Unknown backend, once the token passed.
    assert_eq!(
        common::http1_get(&mut passed, "/client/nobody/x", &valid)
            .await
            .0,
        503
    );
    let mut filler = relay.tls_connect().await;
    assert_eq!(common::http1_get(&mut filler, "/healthz", "").await.0, 200);

    let mut newcomer = relay.tls_connect().await;
    assert_eq!(
        common::http1_get(&mut newcomer, "/healthz", "").await.0,
        200
    );
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), refused.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the refused connection kept its place");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_eq!(
        common::http1_get(&mut passed, "/client/nobody/x", &valid)
            .await
            .0,
        503
    );
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
                ..Default::default()
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

/// `n` tokens for robot-1's users, each signed by a fresh key under a kid
/// the IdP never published.
fn random_kid_tokens(idp: &Idp, prefix: &str, n: usize) -> Vec<String> {
    let aud = user_aud("robot-1");
    (0..n)
        .map(|i| {
            let key = Key::generate(&format!("{prefix}-{i}"), Algorithm::ES256);
            Idp::sign_with(&key, &idp.claims(&aud, "x"))
        })
        .collect()
}

/// Sends a user request for robot-1 with each token at once; the statuses.
async fn send_all(relay: &Relay, http: &reqwest::Client, tokens: Vec<String>) -> Vec<u16> {
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let req = http
                .get(format!("{}/client/robot-1/x", relay.url))
                .bearer_auth(token);
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(bounded(t).await.unwrap());
    }
    statuses
}

/// `n` tokens with random kids sent while a slow (1 s) JWKS fetch runs:
/// the first one starts it, the rest follow once it is in flight, after
/// `lag`. Returns how many JWKS fetches they caused; each was refused.
async fn unknown_kids_during_a_slow_fetch(cooldown: Duration, n: usize, lag: Duration) -> usize {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |c| c.auth.unknown_kid_cooldown = cooldown).await;
    // Past any window the initial load might have opened: the tokens are
    // entitled to exactly one fetch.
    tokio::time::sleep(cooldown + Duration::from_millis(200)).await;
    let mut tokens = random_kid_tokens(&idp, "random", n);
    // One connection, already up, so nothing is held up by handshakes.
    let http = relay.http();
    let known = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "x"));
    send_all(&relay, &http, vec![known]).await;

    idp.set_jwks_delay(Duration::from_secs(1));
    let before = idp.jwks_fetches();
    let first = tokens.pop().unwrap();
    let (first, rest) = tokio::join!(send_all(&relay, &http, vec![first]), async {
        eventually(|| async { (idp.jwks_in_flight() > 0).then_some(()) }).await;
        tokio::time::sleep(lag).await;
        send_all(&relay, &http, tokens).await
    });
    for status in first.into_iter().chain(rest) {
        assert_eq!(status, 401);
    }
    assert_eq!(idp.jwks_max_in_flight(), 1, "concurrent JWKS fetches");
    idp.jwks_fetches() - before
}

#[tokio::test]
async fn random_kid_flood_fetches_jwks_at_most_once_per_window() {
    // Longer than the slow fetch, so all of the flood falls into the
    // window its one fetch opens: the rest shares that fetch rather than
    // start its own.
    let fetches =
        unknown_kids_during_a_slow_fetch(Duration::from_secs(3), 200, Duration::ZERO).await;
    assert_eq!(fetches, 1, "JWKS fetches for 200 random kids in one window");
}

/// A token signed with a newly published key that arrives while a fetch
/// for an unknown kid is running waits for that fetch and is accepted
/// with the key it brings, not refused as one more unknown kid.
#[tokio::test]
async fn a_new_key_is_found_by_requests_that_wait_for_the_fetch_bringing_it() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.unknown_kid_cooldown = Duration::from_secs(30)
    })
    .await;
    idp.add_key(Key::generate("rsa-2", Algorithm::RS256));
    idp.set_jwks_delay(Duration::from_secs(1));
    let fresh = idp.sign("rsa-2", &idp.claims(&user_aud("nobody"), "alice"));
    let http = relay.http();
    let (unknown, fresh) = tokio::join!(
        send_all(&relay, &http, random_kid_tokens(&idp, "random", 1)),
        async {
            eventually(|| async { (idp.jwks_in_flight() > 0).then_some(()) }).await;
            user_status(&relay, "nobody", &fresh).await
        }
    );
    assert_eq!(unknown, vec![401]);
    assert_ne!(fresh.0, 401, "the new key's token was refused: {}", fresh.1);
}

/// A request that goes away during the unknown-kid fetch it started does
/// not take the fetch with it: the fetch ends, and the new key it brings
/// is used at once, not only after the cooldown (or the next scheduled
/// refresh). Over HTTP/2 the reset stream drops the request's future on
/// the server, as any peer can make it do.
#[tokio::test]
async fn a_fetch_outlives_the_request_that_started_it() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.unknown_kid_cooldown = Duration::from_secs(30)
    })
    .await;
    idp.add_key(Key::generate("rsa-2", Algorithm::RS256));
    idp.set_jwks_delay(Duration::from_millis(500));
    let fresh = idp.sign("rsa-2", &idp.claims(&user_aud("nobody"), "alice"));
    let before = idp.jwks_fetches();
    let gone = relay
        .http2()
        .get(format!("{}/client/nobody/x", relay.url))
        .bearer_auth(&fresh)
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gone.is_err(), "answered before the fetch ended: {gone:?}");
    // The fetch was asked for; wait until the IdP has answered it.
    eventually(|| async {
        (idp.jwks_fetches() > before && idp.jwks_in_flight() == 0).then_some(())
    })
    .await;
    idp.set_jwks_delay(Duration::ZERO);
    let (status, body, _) = user_status(&relay, "nobody", &fresh).await;
    assert_ne!(status, 401, "the new key's token was refused: {body}");
}

/// A JWKS fetch slower than the cooldown: unknown kids that arrive once
/// the window has passed, while that fetch is still running, are refused
/// when it ends instead of each starting a fetch of its own in turn.
#[tokio::test]
async fn a_fetch_slower_than_the_cooldown_is_not_followed_by_a_queue_of_fetches() {
    const COOLDOWN: Duration = Duration::from_millis(300);
    // The rest arrives past the cooldown, before the fetch ends.
    let fetches =
        unknown_kids_during_a_slow_fetch(COOLDOWN, 6, COOLDOWN + Duration::from_millis(200)).await;
    assert_eq!(fetches, 1, "JWKS fetches");
}

#[tokio::test]
async fn rotation_right_after_a_scheduled_refresh_is_picked_up_at_once() {
    // Longer than the wait for the new key below: if the scheduled
    // refresh opened the unknown-kid window, the new key would stay out
    // for all of that wait.
    const COOLDOWN: Duration = Duration::from_secs(30);
    let idp = Idp::start().await;
    // The first answer asks for a refresh in a second, every later one in
    // an hour: exactly one scheduled refresh happens during the test.
    idp.set_max_age(Some(1));
    let relay = relay_with(&idp, |c| {
        c.auth.jwks_refresh_min = Duration::from_secs(1);
        c.auth.unknown_kid_cooldown = COOLDOWN;
    })
    .await;
    idp.set_max_age(Some(3600));
    let loaded = idp.jwks_fetches();
    // The scheduled refresh has been answered (so it cannot carry the key
    // published below).
    eventually(|| async {
        (idp.jwks_fetches() > loaded && idp.jwks_in_flight() == 0).then_some(())
    })
    .await;

    let before = idp.jwks_fetches();
    idp.add_key(Key::generate("rsa-2", Algorithm::RS256));
    let rotated = idp.sign("rsa-2", &idp.claims(&user_aud("robot-1"), "alice"));
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            // Authenticated, then refused for want of a relay-client.
            let (_, body, _) = user_status(&relay, "robot-1", &rotated).await;
            if body.contains("unknown client") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a token signed with the new key was still refused 10 s after the rotation");

    // The fetch for the new key opened the window: a flood of random kids
    // now costs no further fetch.
    let statuses = send_all(&relay, &relay.http(), random_kid_tokens(&idp, "flood", 50)).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(
        idp.jwks_fetches() - before,
        1,
        "JWKS fetches for the rotation plus 50 random kids in one window"
    );
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

/// A backend cannot act on the relay's whole origin, which all backends
/// share: its `Set-Cookie` of the relay's token cookie and its
/// origin-wide headers (`Service-Worker-Allowed`, `Clear-Site-Data`,
/// `NEL`, `Report-To`, `Alt-Svc`, `Strict-Transport-Security`,
/// `Accept-CH`, `Critical-CH`) never
/// reach the user (v1 and v2), its other cookies do, and no service
/// worker of its can take `/client/` as its scope.
#[tokio::test]
async fn backend_headers_that_reach_past_the_backend_are_dropped() {
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |c| c.auth.token_cookie = Some("relay_token".into())).await;
    let token = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
    for transport in [Transport::V1, Transport::V2] {
        let file = token_file(&idp.sign("ec-1", &idp.claims(&relay_aud("robot-1"), "robot-1")));
        let mut cfg = client_config(&relay, "robot-1", &backend.url);
        cfg.auth.token_file = Some(file.path().to_owned());
        cfg.transport = transport;
        let mut client = RelayClient::start(cfg);
        wait_served(&relay, "robot-1", &token).await;
        let resp = relay
            .http()
            .get(format!("{}/client/robot-1/origin-wide", relay.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1; Path=/"], "{transport:?}");
        assert!(
            !resp.headers().contains_key("service-worker-allowed"),
            "{transport:?}"
        );
        for name in [
            "service-worker-allowed",
            "clear-site-data",
            "nel",
            "report-to",
            "alt-svc",
            "strict-transport-security",
            "accept-ch",
            "critical-ch",
        ] {
            assert!(!resp.headers().contains_key(name), "{name} {transport:?}");
        }
        // A service worker may be registered inside the backend's path,
        // never at `/client/<name>`, whose scope is all of `/client/`.
        for (path, status) in [("/client/robot-1/sw.js", 200), ("/client/robot-1", 403)] {
            let resp = relay
                .http()
                .get(format!("{}{path}", relay.url))
                .bearer_auth(&token)
                .header("service-worker", "script")
                .header("sec-fetch-dest", "serviceworker")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), status, "{path} {transport:?}");
        }
        client.stop().await;
    }
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
    // An hour-long token is reused: twenty relayed requests (each a poll
    // and a response post of the relay-client) cost no further call.
    let http = relay.http();
    for _ in 0..20 {
        assert_eq!(relayed(&http, &relay, &user).await, 200);
    }
    assert_eq!(idp.token_calls().len(), 1, "token endpoint calls");
}

#[tokio::test]
async fn client_credentials_basic() {
    client_credentials(ClientAuthMethod::ClientSecretBasic).await;
}

#[tokio::test]
async fn client_credentials_post() {
    client_credentials(ClientAuthMethod::ClientSecretPost).await;
}

/// A token endpoint that redirects is not followed: a 307 would carry the
/// client secret wherever it points, past the endpoint's `https` check.
#[tokio::test]
async fn client_credentials_do_not_follow_a_redirect() {
    let idp = Idp::start().await;
    idp.add_client("robot-1", "pw");
    idp.set_token_redirect(true);
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |_| {}).await;
    let secret = token_file("pw");
    let mut cfg = credentials_client(&relay, &idp, &backend, &secret);
    cfg.auth.client_auth = ClientAuthMethod::ClientSecretPost;
    let _client = RelayClient::start(cfg);
    // A second call means the first fetch, redirect and all, is over.
    eventually(|| async { (idp.token_calls().len() >= 2).then_some(()) }).await;
    assert_eq!(idp.elsewhere_calls(), 0, "the redirect was followed");
}

/// One user request for robot-1 through the relay; its status.
async fn relayed(http: &reqwest::Client, relay: &Relay, user: &str) -> u16 {
    let req = http
        .get(format!("{}/client/robot-1/t", relay.url))
        .bearer_auth(user);
    let resp = bounded(req.send()).await;
    let timed_out = |e: &reqwest::Error| if e.is_timeout() { " (timed out)" } else { "" };
    resp.unwrap_or_else(|e| panic!("relayed request failed{}: {e}", timed_out(&e)))
        .status()
        .as_u16()
}

/// Authentication failures the relay counted, all reasons together.
async fn auth_failures(relay: &Relay) -> f64 {
    relay
        .get_text("/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("relay_auth_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A relay and a client-credentials relay-client for robot-1 whose tokens
/// live `ttl_secs`, serving requests with its first token.
struct CredentialsRun {
    idp: Idp,
    relay: Relay,
    /// A user token for robot-1.
    user: String,
    /// When the first token was asked for.
    first_call: Instant,
    _backend: Backend,
    _secret: tempfile::NamedTempFile,
    _client: RelayClient,
}

impl CredentialsRun {
    async fn start(ttl_secs: u64, edit: impl FnOnce(&mut ServerConfig)) -> Self {
        let idp = Idp::start().await;
        idp.add_client("robot-1", "pw");
        idp.set_token_ttl(ttl_secs);
        let backend = Backend::start().await;
        let relay = relay_with(&idp, edit).await;
        let secret = token_file("pw");
        let client = RelayClient::start(credentials_client(&relay, &idp, &backend, &secret));
        let user = idp.sign("rsa-1", &idp.claims(&user_aud("robot-1"), "alice"));
        wait_served(&relay, "robot-1", &user).await;
        Self {
            first_call: idp.token_calls()[0].at,
            idp,
            relay,
            user,
            _backend: backend,
            _secret: secret,
            _client: client,
        }
    }

    /// Relays user requests one after another until `until` has passed
    /// since the first token call, asserting each is served.
    async fn traffic(&self, until: Duration) {
        let http = self.relay.http();
        let mut served = 0;
        while self.first_call.elapsed() < until {
            let status = relayed(&http, &self.relay, &self.user).await;
            assert_eq!(
                status,
                200,
                "request {served} at {:?}",
                self.first_call.elapsed()
            );
            served += 1;
            // Paced: steady traffic, not a busy loop.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A token the server refuses (401) is not swapped for a new grant on
/// every refused call: a fleet whose server refuses its tokens (here:
/// their algorithm) must not ask the identity provider for a grant every
/// few seconds per robot. Before, each refusal (about one every 2 s, the
/// refusal backoff) fetched a new token.
#[tokio::test]
async fn a_refused_token_is_not_refetched_on_every_refusal() {
    let idp = Idp::start().await;
    idp.add_client("robot-1", "pw");
    let backend = Backend::start().await;
    // The IdP grants ES256 tokens; this server takes RS256 only.
    let relay = relay_with(&idp, |c| {
        c.auth.issuers[0].algorithms = vec![Algorithm::RS256];
    })
    .await;
    let secret = token_file("pw");
    let cfg = credentials_client(&relay, &idp, &backend, &secret);
    let _client = RelayClient::start(cfg);
    // Refused calls come at once (the v2 probe and the polls), then at
    // the refusal backoff's pace: several rounds of them.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let metrics = relay.get_text("/metrics").await;
    let refused = common::observe::labelled_sum(&metrics, "relay_auth_failures_total", &[]);
    assert!(refused >= 8.0, "refused calls: {refused}");
    assert_eq!(idp.tokens_issued(), 1, "tokens granted");
}

#[tokio::test]
async fn client_credentials_refresh_before_expiry() {
    const TTL: Duration = Duration::from_secs(6);
    // No leeway: a relay token used past its expiry is refused at once.
    let run = CredentialsRun::start(TTL.as_secs(), |c| c.auth.leeway = Duration::ZERO).await;
    let failures = auth_failures(&run.relay).await;
    // Across the refresh and past the first token's expiry.
    run.traffic(TTL + Duration::from_secs(2)).await;

    let calls = run.idp.token_calls();
    assert!(calls.len() >= 2, "not refreshed within {TTL:?}");
    let refreshed_after = calls[1].at - calls[0].at;
    // The window: once most of the lifetime (80%) has passed, before expiry.
    assert!(
        refreshed_after >= TTL * 7 / 10 && refreshed_after < TTL,
        "refreshed {refreshed_after:?} into a {TTL:?} token"
    );
    // The second token is good for the rest of the run.
    assert_eq!(calls.len(), 2, "token calls");
    assert_eq!(
        auth_failures(&run.relay).await,
        failures,
        "the relay refused the relay-client's token"
    );
}

#[tokio::test]
async fn client_credentials_refresh_does_not_hold_up_requests() {
    // Long enough that the refresh starts well before expiry (at 80% of
    // the life, or earlier with a margin of seconds) and its slow answer
    // still arrives while the old token is valid.
    const TTL: u64 = 12;
    let run = CredentialsRun::start(TTL, |_| {}).await;
    // The refresh takes a second.
    run.idp.set_token_delay(Duration::from_secs(1));
    assert_eq!(run.idp.token_calls().len(), 1, "token calls to start with");
    // (calls in flight, calls made, tokens issued): equal and busy at a
    // request's start and end means the request was served entirely while
    // one refresh call was in flight, not waiting for it.
    let snapshot = |idp: &Idp| {
        (
            idp.token_in_flight(),
            idp.token_calls().len(),
            idp.tokens_issued(),
        )
    };
    let http = run.relay.http();
    let mut during = 0;
    bounded(async {
        while run.idp.tokens_issued() < 2 {
            let at_start = snapshot(&run.idp);
            assert_eq!(relayed(&http, &run.relay, &run.user).await, 200);
            let at_end = snapshot(&run.idp);
            if at_start.0 > 0 && at_end == at_start {
                during += 1;
            }
            // Started before the refresh call arrived, ended after it was
            // answered: this request waited for the token endpoint.
            assert!(
                !(at_start.0 == 0 && at_start.1 == 1 && at_end.2 == 2),
                "a request was held up by the whole refresh"
            );
            // Paced: steady traffic, not a busy loop.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        during >= 3,
        "{during} requests served while the token endpoint was busy"
    );
    assert_eq!(run.idp.token_calls().len(), 2, "token calls");
    assert_eq!(run.idp.token_max_in_flight(), 1, "concurrent token calls");
}

#[tokio::test]
async fn client_credentials_failing_refresh_backs_off_and_keeps_the_valid_token() {
    const TTL: Duration = Duration::from_secs(15);
    let run = CredentialsRun::start(TTL.as_secs(), |c| c.auth.leeway = Duration::ZERO).await;
    run.idp.set_token_failing(true);
    let failures = auth_failures(&run.relay).await;
    // Until shortly before the first token expires, every refresh fails.
    run.traffic(TTL - Duration::from_secs(1)).await;
    let attempts = run.idp.token_calls().len() - 1;
    assert!(attempts >= 1, "no refresh attempted before expiry");
    assert!(
        attempts <= 5,
        "{attempts} failing token calls in the last seconds of the token's life"
    );
    assert_eq!(
        auth_failures(&run.relay).await,
        failures,
        "the relay refused the relay-client's token"
    );
    // Backing off is not giving up.
    run.idp.set_token_failing(false);
    eventually(|| async { (run.idp.tokens_issued() >= 2).then_some(()) }).await;
    wait_served(&run.relay, "robot-1", &run.user).await;
}

#[tokio::test]
async fn jwks_refresh_follows_cache_control_max_age() {
    let with_max_age = Idp::start().await;
    with_max_age.set_max_age(Some(1));
    let no_store = Idp::start().await;
    no_store.set_cache_control(Some("no-store"));
    let without = Idp::start().await;
    // Bounds that leave the IdP's max-age in charge: without one, the
    // period is an hour; `no-store` asks for the shortest, a second.
    let bounds = |c: &mut ServerConfig| {
        c.auth.jwks_refresh_min = Duration::from_secs(1);
        c.auth.jwks_refresh_max = Duration::from_secs(3600);
    };
    let _relay_a = relay_with(&with_max_age, bounds).await;
    let _relay_b = relay_with(&without, bounds).await;
    let _relay_c = relay_with(&no_store, bounds).await;
    let (a, b, c) = (
        with_max_age.jwks_fetches(),
        without.jwks_fetches(),
        no_store.jwks_fetches(),
    );

    // Two scheduled refreshes a second apart, with no unknown kid asking.
    eventually(|| async {
        (with_max_age.jwks_fetches() >= a + 2 && no_store.jwks_fetches() >= c + 2).then_some(())
    })
    .await;
    // Meanwhile (well over refresh_min) the other relay kept its keys.
    assert_eq!(without.jwks_fetches(), b, "refreshed without max-age");
}

#[tokio::test]
async fn leeway_tolerates_clock_skew_on_exp_and_nbf() {
    let idp = Idp::start().await;
    let lenient = relay_with(&idp, |c| c.auth.leeway = Duration::from_secs(30)).await;
    let strict = relay_with(&idp, |c| c.auth.leeway = Duration::ZERO).await;
    let now = jsonwebtoken::get_current_timestamp();
    let mut expired = idp.claims(&user_aud("robot-1"), "alice");
    expired["iat"] = json!(now - 70);
    expired["nbf"] = json!(now - 70);
    expired["exp"] = json!(now - 10);
    let mut early = idp.claims(&user_aud("robot-1"), "alice");
    early["nbf"] = json!(now + 10);
    for (name, claims, refusal) in [
        ("expired 10 s ago", expired, "expired"),
        ("valid in 10 s", early, "not valid yet"),
    ] {
        let token = idp.sign("rsa-1", &claims);
        // Authenticated, then refused for want of a relay-client.
        let (status, body, _) = user_status(&lenient, "robot-1", &token).await;
        assert!(
            body.contains("unknown client"),
            "{name}, leeway 30 s: {status} {body}"
        );
        let (status, body, _) = user_status(&strict, "robot-1", &token).await;
        assert_eq!(status, 401, "{name}, no leeway: {body}");
        assert!(body.contains(refusal), "{name}: {body}");
    }
}

#[tokio::test]
async fn configured_jwks_uri_skips_discovery() {
    let idp = Idp::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.issuers[0].jwks_uri = Some(format!("{}/jwks", idp.url));
    })
    .await;
    let aud = user_aud("robot-1");
    let (_, body, _) =
        user_status(&relay, "robot-1", &idp.sign("ec-1", &idp.claims(&aud, "a"))).await;
    assert!(body.contains("unknown client"), "{body}");
    // A refetch for a new key uses the same address.
    idp.add_key(Key::generate("rsa-2", Algorithm::RS256));
    let rotated = idp.sign("rsa-2", &idp.claims(&aud, "a"));
    eventually(|| async {
        let (_, body, _) = user_status(&relay, "robot-1", &rotated).await;
        body.contains("unknown client").then_some(())
    })
    .await;
    assert!(idp.jwks_fetches() >= 2);
    assert_eq!(idp.discovery_calls(), 0, "discovery documents fetched");
}

/// Status and body of one long poll for `backend` with `token` (`None`
/// if the server kept it open).
async fn poll_status(relay: &Relay, backend: &str, token: &str) -> Option<(u16, String)> {
    let resp = relay
        .http()
        .get(format!("{}/server/request?server={backend}", relay.url))
        .bearer_auth(token)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some((resp.status().as_u16(), resp.text().await.unwrap()))
}

#[tokio::test]
async fn per_backend_relay_audiences_and_required_claims() {
    const FLEET_RELAYS: &str = "https://fleet.test/relays";
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.backends.insert(
            "robot-1".into(),
            BackendAuth {
                user_audiences: Vec::new(),
                relay_audiences: vec![FLEET_RELAYS.into()],
                required_claims: [("groups".to_owned(), "fleet-ops".to_owned())].into(),
                ..Default::default()
            },
        );
    })
    .await;
    let with_groups = |aud: &str, groups: &[&str]| {
        let mut claims = idp.claims(aud, "robot-1");
        claims["groups"] = json!(groups);
        idp.sign("ec-1", &claims)
    };

    // Only the extra audience, not robot-1's relay audience: it may poll.
    let file = token_file(&with_groups(FLEET_RELAYS, &["fleet-ops"]));
    let _client = client_with_token(&relay, "robot-1", &backend.url, &file);
    let user = with_groups(&user_aud("robot-1"), &["fleet-ops"]);
    wait_served(&relay, "robot-1", &user).await;

    let robot_2 = relay_aud("robot-2");
    for (name, backend_name, token, reason) in [
        (
            "relay audience, required claim missing",
            "robot-1",
            idp.sign("ec-1", &idp.claims(&relay_aud("robot-1"), "robot-1")),
            "groups=fleet-ops",
        ),
        (
            "extra audience, wrong group",
            "robot-1",
            with_groups(FLEET_RELAYS, &["visitors"]),
            "groups=fleet-ops",
        ),
        (
            "robot-1's extra audience polling for robot-2",
            "robot-2",
            with_groups(FLEET_RELAYS, &["fleet-ops"]),
            robot_2.as_str(),
        ),
    ] {
        let answer = poll_status(&relay, backend_name, &token).await;
        let (status, body) = answer.unwrap_or_else(|| panic!("{name}: poll accepted"));
        assert_eq!(status, 403, "{name}: {body}");
        assert!(body.contains(reason), "{name}: {reason:?} not in {body:?}");
    }
}

/// An identity provider that signs a token for any audience its holder
/// asks for (Google identity tokens) lets anyone hold a relay audience:
/// `relay_claims` then tells the robot apart (here by `sub`, a template
/// on the backend's name), and `user_claims` narrow users without
/// locking the robot out.
#[tokio::test]
async fn role_claims_tell_a_robot_from_anyone_holding_its_audience() {
    let idp = Idp::start().await;
    let backend = Backend::start().await;
    let relay = relay_with(&idp, |c| {
        c.auth.relay_claims = [("sub".to_owned(), "svc-{backend}".to_owned())].into();
        c.auth.backends.insert(
            "robot-1".into(),
            BackendAuth {
                user_claims: [("groups".to_owned(), "fleet-ops".to_owned())].into(),
                ..Default::default()
            },
        );
    })
    .await;
    let signed = |aud: &str, sub: &str, groups: &[&str]| {
        let mut claims = idp.claims(aud, sub);
        claims["groups"] = json!(groups);
        idp.sign("rsa-1", &claims)
    };

    // The robot's own token: no group, and none needed.
    let file = token_file(&signed(&relay_aud("robot-1"), "svc-robot-1", &[]));
    let _client = client_with_token(&relay, "robot-1", &backend.url, &file);
    wait_served(
        &relay,
        "robot-1",
        &signed(&user_aud("robot-1"), "alice", &["fleet-ops"]),
    )
    .await;

    for (name, backend_name, token, reason) in [
        (
            "anyone with robot-1's relay audience",
            "robot-1",
            signed(&relay_aud("robot-1"), "mallory", &["fleet-ops"]),
            "sub=svc-robot-1",
        ),
        (
            "robot-1's identity with robot-2's relay audience",
            "robot-2",
            signed(&relay_aud("robot-2"), "svc-robot-1", &[]),
            "sub=svc-robot-2",
        ),
    ] {
        let answer = poll_status(&relay, backend_name, &token).await;
        let (status, body) = answer.unwrap_or_else(|| panic!("{name}: poll accepted"));
        assert_eq!(status, 403, "{name}: {body}");
        assert!(body.contains(reason), "{name}: {reason:?} not in {body:?}");
    }
    // A user outside the group is refused; the user claims ask nothing
    // of another backend's users.
    let (status, body, _) = user_status(
        &relay,
        "robot-1",
        &signed(&user_aud("robot-1"), "bob", &["visitors"]),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("groups=fleet-ops"), "{body}");
    let (status, body, _) =
        user_status(&relay, "robot-2", &signed(&user_aud("robot-2"), "bob", &[])).await;
    assert_ne!(status, 403, "{body}");
}

#[tokio::test]
async fn ec_key_curve_must_fit_the_algorithm() {
    let idp = Idp::start().await;
    // Published without `alg`, as many IdPs do: only the curve tells which
    // algorithm the key is for.
    let mut p384 = Key::generate("p384", Algorithm::ES384);
    p384.jwk.common.key_algorithm = None;
    // A P-384 key whose JWK claims to be on P-256.
    let mut mislabeled = Key::generate("p384-as-p256", Algorithm::ES384);
    mislabeled.jwk.common.key_algorithm = None;
    match &mut mislabeled.jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec) => {
            ec.curve = jsonwebtoken::jwk::EllipticCurve::P256;
        }
        other => panic!("not an EC key: {other:?}"),
    }
    idp.add_key(p384.clone());
    idp.add_key(mislabeled.clone());
    let relay = relay_with(&idp, |_| {}).await;
    let claims = idp.claims(&user_aud("robot-1"), "eve");

    // The P-384 key does verify ES384 tokens.
    let (status, body, _) = user_status(&relay, "robot-1", &Idp::sign_with(&p384, &claims)).await;
    assert!(
        body.contains("unknown client"),
        "ES384 on P-384: {status} {body}"
    );

    // An ES256 header on the P-384 key's kid.
    use base64::Engine as _;
    let es384 = Idp::sign_with(&p384, &claims);
    let (_, rest) = es384.split_once('.').unwrap();
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": "p384"});
    let es256_on_p384 = format!(
        "{}.{rest}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string())
    );
    // A correct ES384 signature by a key published as P-256.
    let on_mislabeled = Idp::sign_with(&mislabeled, &claims);
    for (name, token) in [
        ("ES256 header on a P-384 key", es256_on_p384),
        ("ES384 on a key published as P-256", on_mislabeled),
    ] {
        let (status, body, _) = user_status(&relay, "robot-1", &token).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert!(body.contains("does not match"), "{name}: {body}");
    }
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `path` through the relay over TLS, with `cookie`
/// as the `Cookie` header; on refusal, the handshake's HTTP status.
async fn ws_connect(relay: &Relay, path: &str, cookie: Option<&str>) -> Result<Wss, Option<u16>> {
    match cookie {
        Some(cookie) => ws_connect_with(relay, path, &[("cookie", cookie)]).await,
        None => ws_connect_with(relay, path, &[]).await,
    }
}

/// [`ws_connect`] with the handshake's extra headers.
async fn ws_connect_with(
    relay: &Relay,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<Wss, Option<u16>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let tls = http_relay::tls::client_config(Some(&common::certs().ca_cert)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let url = format!("wss://localhost:{}{path}", relay.addr.port());
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Some(resp.status().as_u16())),
        Err(_) => Err(None),
    }
}

/// A WebSocket echo backend that reports the headers of every upgrade
/// request it accepts.
async fn ws_header_backend() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<http::HeaderMap>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // tungstenite fixes the callback's (large) error type.
                #[allow(clippy::result_large_err)]
                let report = move |req: &http::Request<()>, resp| {
                    let _ = tx.send(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, report).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn token_cookie_authenticates_websocket_upgrades_and_is_not_forwarded() {
    let idp = Idp::start().await;
    let (backend_url, mut upgrades) = ws_header_backend().await;
    let relay = relay_with(&idp, |c| c.auth.token_cookie = Some("relay_token".into())).await;
    let file = token_file(&idp.sign("ec-1", &idp.claims(&relay_aud("ws"), "ws")));
    let _client = client_with_token(&relay, "ws", &backend_url, &file);
    let token = idp.sign("rsa-1", &idp.claims(&user_aud("ws"), "alice"));
    let cookie = format!("theme=dark; relay_token={token}");

    // Retried until the relay-client polls (503 before).
    let mut ws = eventually(|| async {
        ws_connect(&relay, "/client/ws/echo", Some(&cookie))
            .await
            .ok()
    })
    .await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        bounded(ws.next()).await.unwrap().unwrap(),
        Message::text("hello")
    );
    let headers = bounded(upgrades.recv()).await.unwrap();
    assert_eq!(
        headers.get("cookie").map(|v| v.to_str().unwrap()),
        Some("theme=dark"),
        "cookies the backend saw"
    );
    for (name, value) in &headers {
        let value = value.to_str().unwrap_or_default();
        assert!(!value.contains(&token), "token relayed in {name}");
    }

    // Without the cookie the upgrade is refused before it reaches the backend.
    let refused = ws_connect(&relay, "/client/ws/echo", Some("theme=dark")).await;
    assert_eq!(refused.err(), Some(Some(401)));
}

/// A browser sends the token cookie with other sites' WebSockets and
/// posts too: the relay takes the cookie for those from pages of its own
/// origin or of a trusted one only. A token in a header is no browser's
/// doing and needs no check.
#[tokio::test]
async fn cross_site_websockets_with_the_token_cookie_are_refused() {
    let idp = Idp::start().await;
    let (backend_url, _upgrades) = ws_header_backend().await;
    let relay = relay_with(&idp, |c| {
        c.auth.token_cookie = Some("relay_token".into());
        c.auth.cookie_origins = vec!["https://console.example.com".into()];
    })
    .await;
    let file = token_file(&idp.sign("ec-1", &idp.claims(&relay_aud("ws"), "ws")));
    let _client = client_with_token(&relay, "ws", &backend_url, &file);
    let token = idp.sign("rsa-1", &idp.claims(&user_aud("ws"), "alice"));
    let cookie = format!("relay_token={token}");
    let bearer = format!("Bearer {token}");
    let own = format!("https://localhost:{}", relay.addr.port());
    let evil = "https://evil.example";

    // A page of the relay's own origin (retried until the relay-client
    // polls).
    let same_origin = [
        ("cookie", cookie.as_str()),
        ("origin", own.as_str()),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "websocket"),
    ];
    eventually(|| async {
        ws_connect_with(&relay, "/client/ws/echo", &same_origin)
            .await
            .ok()
    })
    .await;
    let c = cookie.as_str();
    let path = "/client/ws/echo";
    // Another site's page, in a current browser and in an older one; a
    // sibling site is another origin too.
    let other_site = [
        ("cookie", c),
        ("origin", evil),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "websocket"),
    ];
    let old_browser = [("cookie", c), ("origin", evil)];
    let sibling = [
        ("cookie", c),
        ("origin", "https://other.localhost"),
        ("sec-fetch-site", "same-site"),
    ];
    for headers in [&other_site[..], &old_browser, &sibling] {
        assert_eq!(
            ws_connect_with(&relay, path, headers).await.err(),
            Some(Some(403)),
            "{headers:?}"
        );
    }
    // A trusted origin, and the relay's own in an older browser.
    let trusted = [
        ("cookie", c),
        ("origin", "https://console.example.com"),
        ("sec-fetch-site", "same-site"),
    ];
    assert!(ws_connect_with(&relay, path, &trusted).await.is_ok());
    let own_old_browser = [("cookie", c), ("origin", own.as_str())];
    assert!(
        ws_connect_with(&relay, path, &own_old_browser)
            .await
            .is_ok()
    );
    // The token in a header, from anywhere.
    let with_header = [
        ("authorization", bearer.as_str()),
        ("origin", evil),
        ("sec-fetch-site", "cross-site"),
    ];
    assert!(ws_connect_with(&relay, path, &with_header).await.is_ok());
    // HTTP/2 names the relay in `:authority`: a post from its own pages
    // passes, one from another site's does not; another site's GET does
    // (it cannot read the answer).
    let h2 = relay.http2();
    let url = format!("{}/client/ws/echo", relay.url);
    let post = |origin: &str| {
        h2.post(&url)
            .header("cookie", c)
            .header("origin", origin)
            .header(
                "sec-fetch-site",
                if origin == own {
                    "same-origin"
                } else {
                    "cross-site"
                },
            )
            .send()
    };
    let resp = post(&own).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_ne!(resp.status(), 403);
    assert_eq!(post(evil).await.unwrap().status(), 403);
    let get = h2
        .get(&url)
        .header("cookie", c)
        .header("origin", evil)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_ne!(get.status(), 403);
    let metrics = relay.get_text("/metrics").await;
    assert!(
        metrics.contains("relay_auth_failures_total{reason=\"cross_site\"} 4"),
        "{metrics}"
    );
}
