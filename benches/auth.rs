//! Cost of token verification per request with a cached key:
//! `cargo bench --bench auth` prints verifications/s for RS256 and ES256
//! (signature, issuer, exp/nbf and the audience policy), single-threaded.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::idp::{Idp, Key};
use http_relay::auth::{Authenticator, Role};
use http_relay::config::{AuthConfig, AuthMode, IssuerConfig};
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::JwkSet;

const ISSUER: &str = "https://idp.bench";

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let keys = [Key::generate("rsa", Algorithm::RS256), Key::generate("ec", Algorithm::ES256)];
        let dir = tempfile::tempdir().expect("temp dir");
        let jwks = dir.path().join("jwks.json");
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        std::fs::write(&jwks, serde_json::to_string(&set).expect("json")).expect("write");
        let cfg = AuthConfig {
            mode: AuthMode::Jwt,
            issuers: vec![IssuerConfig {
                issuer: ISSUER.into(),
                jwks_uri: None,
                jwks_file: Some(jwks),
                algorithms: Vec::new(),
            }],
            ..AuthConfig::default()
        };
        let auth = Authenticator::new(&cfg).expect("client").expect("jwt mode");
        auth.spawn_refresh(tokio_util::sync::CancellationToken::new());
        let aud = auth.audience(Role::User, "robot-1");
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"iss": ISSUER, "aud": aud, "sub": "bench", "nbf": now, "exp": now + 3600});
        for key in &keys {
            let token = Idp::sign_with(key, &claims);
            // Wait for the keys, then warm up.
            let deadline = Instant::now() + Duration::from_secs(5);
            while auth.verify(&token).await.is_err() {
                assert!(Instant::now() < deadline, "keys never loaded");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let budget = Duration::from_secs(3);
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < budget && n < 1_000_000 {
                let claims = auth.verify(&token).await.expect("valid token");
                auth.check(&claims, Role::User, "robot-1").expect("audience");
                n += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{:?}: {:.0} verifications/s ({:.1} µs each, {n} in {secs:.1} s)",
                key.alg,
                n as f64 / secs,
                secs * 1e6 / n as f64
            );
        }
    });
}
