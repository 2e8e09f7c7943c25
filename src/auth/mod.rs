//! Authentication: token extraction, JWT validation against the trusted
//! issuers' keys, and the per-backend audience policy.
//!
//! Every backend name has two audiences: one for user-clients and one for
//! relay-clients. A token is first *verified* (signature, issuer, `exp`,
//! `nbf`: failures are 401) and then *checked* for the role and backend at
//! hand (wrong audience or missing claim: 403). Relay-client calls that
//! name a request id are checked against the backend the broker says owns
//! the id, never against anything parsed from the id.

pub mod client;
pub mod dev;
mod keys;
pub mod origin;

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthConfig, AuthMode, BackendAuth};
pub use keys::{FetchError, KeySource};

/// Who is calling, as far as the audience policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Relay,
}

/// Why a request was not authenticated. [`AuthError::status`] picks 401,
/// 403 or 503; `crate::error` turns it into the response.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0:?} is not allowed")]
    Algorithm(Algorithm),
    #[error("token has no key id (kid)")]
    NoKid,
    #[error("token signed with an unknown key")]
    UnknownKid,
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    #[error("token key does not match its algorithm")]
    KeyMismatch,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token lacks a required claim or has an invalid one: {0}")]
    Claims(String),
    #[error("token audience does not include {expected}")]
    WrongAudience { expected: String },
    #[error("token lacks required claim {0}")]
    MissingClaim(String),
    #[error("cannot verify tokens yet: the identity provider's keys are not loaded")]
    KeysUnavailable,
    /// A browser sent the cookie token on another site's behalf
    /// ([`origin`]).
    #[error("cookie token sent from {0}")]
    CrossSite(String),
}

impl AuthError {
    /// 401 for bad tokens, 403 for valid tokens without access, 503 while
    /// keys cannot be loaded.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::WrongAudience { .. }
            | AuthError::MissingClaim(_)
            | AuthError::CrossSite(_) => http::StatusCode::FORBIDDEN,
            AuthError::KeysUnavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// Label of the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::NoKid => "no_kid",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::UnknownIssuer => "unknown_issuer",
            AuthError::KeyMismatch => "key_mismatch",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Claims(_) => "claims",
            AuthError::WrongAudience { .. } => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::CrossSite(_) => "cross_site",
        }
    }
}

/// Only asymmetric algorithms are accepted from JWKS issuers: with an
/// HMAC algorithm, a public key would be usable as the shared secret.
pub fn is_asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// `aud` is a string or an array of strings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(a) => a == aud,
            Audience::Many(v) => v.iter().any(|a| a == aud),
        }
    }
}

/// The verified claims the relay looks at.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub aud: Audience,
    /// Everything else, for required-claim checks.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A NumericDate claim (`exp`, `nbf`) in whole seconds, read as
/// `jsonwebtoken` reads it: an integer, or a decimal (RFC 7519, section
/// 2), rounded.
pub fn numeric_date(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        let f = v.as_f64()?;
        // Bounded and finite, as the verifier requires.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
    })
}

impl Claims {
    /// Whether claim `name` is `want`, or a list holding it. `sub` and
    /// `aud` are read from their own fields (they never reach `other`);
    /// a number or boolean matches its JSON text (`"true"`, `"42"`).
    pub fn has(&self, name: &str, want: &str) -> bool {
        fn matches(v: &serde_json::Value, want: &str) -> bool {
            match v {
                serde_json::Value::String(s) => s == want,
                serde_json::Value::Bool(b) => want.parse::<bool>() == Ok(*b),
                serde_json::Value::Number(n) => {
                    want.parse::<serde_json::Number>().is_ok_and(|w| w == *n)
                }
                _ => false,
            }
        }
        match name {
            "sub" => self.sub.as_deref() == Some(want),
            "aud" => self.aud.contains(want),
            _ => match self.other.get(name) {
                Some(serde_json::Value::Array(v)) => v.iter().any(|x| matches(x, want)),
                Some(v) => matches(v, want),
                None => false,
            },
        }
    }

    /// `exp` in seconds since the epoch, read as the verifier read it:
    /// `jsonwebtoken` accepts a decimal NumericDate (RFC 7519, section 2)
    /// and rounds it, so a tunnel opened with such a token must still
    /// learn when it expires.
    pub fn expires_at(&self) -> Option<u64> {
        numeric_date(self.other.get("exp")?)
    }
}

/// Whether the JWK's key type (and curve, and `alg` if it names one) fits
/// the token's algorithm: no key confusion.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if jwk.common.public_key_use == Some(jsonwebtoken::jwk::PublicKeyUse::Encryption) {
        return false;
    }
    if let Some(key_alg) = jwk.common.key_algorithm
        && key_alg.to_string() != format!("{alg:?}")
    {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA) => {
            okp.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

/// Verifies tokens and applies the audience policy of a server.
pub struct Authenticator {
    cfg: AuthConfig,
    /// `cfg.cookie_origins`, normalised ([`origin::parse_origin`]).
    cookie_origins: Vec<String>,
    issuers: Vec<Arc<KeySource>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| i.issuer()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Authenticator {
    /// `None` when auth is off. Keys load once [`Authenticator::spawn_refresh`]
    /// runs; until then requests get 503.
    pub fn new(cfg: &AuthConfig) -> Result<Option<Arc<Self>>, reqwest::Error> {
        if cfg.mode == AuthMode::None {
            return Ok(None);
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            // No redirects: a redirect could lead key fetches off https.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let issuers = cfg
            .issuers
            .iter()
            .map(|i| Arc::new(KeySource::new(i.clone(), cfg, http.clone())))
            .collect();
        Ok(Some(Arc::new(Self {
            cfg: cfg.clone(),
            // Checked by the config's validation.
            cookie_origins: cfg
                .cookie_origins
                .iter()
                .filter_map(|o| origin::parse_origin(o))
                .collect(),
            issuers,
        })))
    }

    /// Starts the key refresh of every issuer; the tasks stop when `stop`
    /// is cancelled.
    pub fn spawn_refresh(&self, stop: tokio_util::sync::CancellationToken) {
        for source in &self.issuers {
            let source = source.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = source.run() => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    /// Verifies signature, issuer, `exp` and `nbf` (401 on failure).
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let alg = header.alg;
        if !is_asymmetric(alg) {
            return Err(AuthError::Algorithm(alg));
        }
        #[derive(Deserialize)]
        struct Unverified {
            iss: Option<String>,
        }
        // Only to pick the issuer whose keys verify the token; the issuer
        // is then validated with the signature.
        let unverified: Unverified = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Malformed)?;
        let iss = unverified.iss.ok_or(AuthError::UnknownIssuer)?;
        let source = self
            .issuers
            .iter()
            .find(|s| s.issuer() == iss)
            .ok_or(AuthError::UnknownIssuer)?;
        if !source.allows(alg) {
            return Err(AuthError::Algorithm(alg));
        }
        let kid = header.kid.ok_or(AuthError::NoKid)?;
        let jwk = source.key(&kid).await?;
        if !key_fits(&jwk, alg) {
            return Err(AuthError::KeyMismatch);
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| AuthError::KeyMismatch)?;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&iss]);
        v.validate_aud = false; // checked per role and backend, for a 403
        v.validate_nbf = true;
        v.leeway = self.cfg.leeway.as_secs();
        v.set_required_spec_claims(&["exp", "iss"]);
        use jsonwebtoken::errors::ErrorKind as K;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| match e.kind() {
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidSignature => AuthError::BadSignature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::Algorithm(alg),
            K::InvalidKeyFormat | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                AuthError::KeyMismatch
            }
            K::MissingRequiredClaim(c) => AuthError::Claims(format!("missing {c}")),
            K::InvalidIssuer => AuthError::UnknownIssuer,
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthError::Malformed,
            other => AuthError::Claims(format!("{other:?}")),
        })?;
        Ok(data.claims)
    }

    /// The audience a `role` token for `backend` must carry.
    pub fn audience(&self, role: Role, backend: &str) -> String {
        audience_for(&self.cfg, role, backend)
    }

    /// Whether the token carries a `role` audience for *some* backend: a
    /// cheap check before the owner is known (e.g. before reading a
    /// `/server/response` body), so other tokens cannot make the server
    /// buffer bodies.
    pub fn has_role(&self, claims: &Claims, role: Role) -> bool {
        let template = match role {
            Role::User => &self.cfg.user_audience,
            Role::Relay => &self.cfg.relay_audience,
        };
        let fits = |aud: &str| crate::config::template_yields(template, aud);
        let extra = self.cfg.backends.values().flat_map(|b| match role {
            Role::User => &b.user_audiences,
            Role::Relay => &b.relay_audiences,
        });
        let auds: Vec<&str> = match &claims.aud {
            Audience::None => Vec::new(),
            Audience::One(a) => vec![a.as_str()],
            Audience::Many(v) => v.iter().map(String::as_str).collect(),
        };
        auds.iter().any(|a| fits(a)) || extra.into_iter().any(|e| claims.aud.contains(e))
    }

    /// Applies the audience policy (403 on failure).
    pub fn check(&self, claims: &Claims, role: Role, backend: &str) -> Result<(), AuthError> {
        let expected = self.audience(role, backend);
        let extra = self.cfg.backends.get(backend);
        let extra_auds = extra.map(|b: &BackendAuth| match role {
            Role::User => &b.user_audiences,
            Role::Relay => &b.relay_audiences,
        });
        let ok = claims.aud.contains(&expected)
            || extra_auds.is_some_and(|auds| auds.iter().any(|a| claims.aud.contains(a)));
        if !ok {
            return Err(AuthError::WrongAudience { expected });
        }
        let (all, per_backend) = match role {
            Role::User => (&self.cfg.user_claims, extra.map(|b| &b.user_claims)),
            Role::Relay => (&self.cfg.relay_claims, extra.map(|b| &b.relay_claims)),
        };
        let wanted = all
            .iter()
            .chain(extra.into_iter().flat_map(|b| &b.required_claims))
            .chain(per_backend.into_iter().flatten());
        for (name, want) in wanted {
            let want = if want.contains("{backend}") {
                std::borrow::Cow::Owned(want.replace("{backend}", backend))
            } else {
                std::borrow::Cow::Borrowed(want.as_str())
            };
            if !claims.has(name, &want) {
                return Err(AuthError::MissingClaim(format!("{name}={want}")));
            }
        }
        Ok(())
    }

    /// Takes the user-client's token out of the request (header or
    /// cookie), so it is never relayed to the backend.
    pub fn take_user_token(&self, headers: &mut HeaderMap) -> Option<UserToken> {
        let name = self.cfg.token_header.as_str();
        let from_header = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let v = v.trim();
                match v.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                        Some(token.trim().to_owned())
                    }
                    // A dedicated header may carry the bare token.
                    None if !name.eq_ignore_ascii_case("authorization") && !v.is_empty() => {
                        Some(v.to_owned())
                    }
                    _ => None,
                }
            });
        if from_header.is_some() {
            headers.remove(name);
        }
        let from_cookie = self
            .cfg
            .token_cookie
            .as_deref()
            .and_then(|cookie| take_cookie(headers, cookie));
        match (from_header, from_cookie) {
            (Some(token), _) => Some(UserToken {
                token,
                from_cookie: false,
            }),
            (None, Some(token)) => Some(UserToken {
                token,
                from_cookie: true,
            }),
            (None, None) => None,
        }
    }

    /// For a token from the cookie: refuses the request if a browser sent
    /// it on another site's behalf ([`origin`]). `host` is the request's
    /// authority.
    pub fn check_cookie_origin(
        &self,
        method: &http::Method,
        headers: &HeaderMap,
        host: Option<&str>,
    ) -> Result<(), AuthError> {
        origin::check(method, headers, host, &self.cookie_origins)
    }
}

/// A user-client's token, and where it was found.
pub struct UserToken {
    pub token: String,
    /// Browsers send cookies on other sites' behalf: see [`origin`].
    pub from_cookie: bool,
}

/// `template` with `{backend}` replaced.
pub fn audience_for(cfg: &AuthConfig, role: Role, backend: &str) -> String {
    let template = match role {
        Role::User => &cfg.user_audience,
        Role::Relay => &cfg.relay_audience,
    };
    template.replace("{backend}", backend)
}

/// The relay-client's bearer token (always `Authorization: Bearer`).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Removes cookie `name` from the `Cookie` header(s), returning its value.
///
/// Cookie lines are read as bytes: a line with bytes that are not visible
/// ASCII (other cookies' values may hold any) is searched too, and kept
/// whole but for the token, so the token never reaches the backend and no
/// other cookie is lost.
fn take_cookie(headers: &mut HeaderMap, name: &str) -> Option<String> {
    let mut found: Option<Option<String>> = None;
    let mut kept: Vec<&[u8]> = Vec::new();
    for value in headers.get_all(http::header::COOKIE) {
        for pair in value.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            let key = pair.split(|&b| b == b'=').next().unwrap_or_default();
            if pair.contains(&b'=') && key.trim_ascii() == name.as_bytes() {
                let token = &pair[key.len() + 1..];
                found = Some(
                    std::str::from_utf8(token.trim_ascii())
                        .ok()
                        .map(str::to_owned),
                );
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
    }
    let found = found?;
    let rest = kept.join(&b"; "[..]);
    headers.remove(http::header::COOKIE);
    if let Ok(v) = http::HeaderValue::from_bytes(&rest)
        && !rest.is_empty()
    {
        headers.insert(http::header::COOKIE, v);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_taken_and_others_kept() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; relay_token=tok; b=2".parse().unwrap());
        assert_eq!(take_cookie(&mut h, "relay_token").as_deref(), Some("tok"));
        assert_eq!(h["cookie"], "a=1; b=2");
        assert_eq!(take_cookie(&mut h, "relay_token"), None);

        // A line with bytes that are not visible ASCII is searched too, and
        // what else it holds is kept.
        let mut h = HeaderMap::new();
        h.append("cookie", "x=1".parse().unwrap());
        h.append(
            "cookie",
            http::HeaderValue::from_bytes(b"pref=\xc3\xa9; relay_token=tok").unwrap(),
        );
        assert_eq!(take_cookie(&mut h, "relay_token").as_deref(), Some("tok"));
        assert_eq!(h["cookie"].as_bytes(), b"x=1; pref=\xc3\xa9");
        assert_eq!(h.get_all("cookie").iter().count(), 1);
    }

    #[test]
    fn required_claims_match_sub_aud_lists_and_scalars() {
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "sub": "svc-robot-1",
            "aud": ["r/robot-1", "extra"],
            "groups": ["ops", "robots"],
            "email_verified": true,
            "tier": 2,
            "exp": 1767225600.5,
        }))
        .unwrap();
        assert!(claims.has("sub", "svc-robot-1"));
        assert!(!claims.has("sub", "svc-robot-2"));
        assert!(claims.has("aud", "extra"));
        assert!(claims.has("groups", "robots"));
        assert!(!claims.has("groups", "admins"));
        assert!(claims.has("email_verified", "true"));
        assert!(!claims.has("email_verified", "false"));
        assert!(claims.has("tier", "2"));
        assert!(!claims.has("missing", "x"));
        // A decimal NumericDate is read as the verifier reads it.
        assert_eq!(claims.expires_at(), Some(1767225601));
    }

    #[test]
    fn audience_shapes() {
        assert!(Audience::One("a".into()).contains("a"));
        assert!(Audience::Many(vec!["b".into(), "a".into()]).contains("a"));
        assert!(!Audience::None.contains("a"));
    }

    #[test]
    fn only_asymmetric_algorithms() {
        assert!(!is_asymmetric(Algorithm::HS256));
        assert!(is_asymmetric(Algorithm::RS256));
        assert!(is_asymmetric(Algorithm::EdDSA));
    }
}
