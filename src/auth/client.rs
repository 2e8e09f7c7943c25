//! Where the relay-client's bearer token comes from: a file re-read when
//! it changes (projected service-account tokens), or the OIDC
//! client-credentials grant, refreshed before expiry.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{ClientAuth, ClientAuthMethod};

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading token file {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("token file {0} is empty")]
    Empty(PathBuf),
    #[error("token is not a valid header value")]
    Invalid,
    #[error("reading client secret {0}: {1}")]
    Secret(PathBuf, std::io::Error),
    #[error("token endpoint: {0}")]
    Http(#[from] reqwest::Error),
    #[error("token endpoint answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("discovery of {0} failed: {1}")]
    Discovery(String, String),
    #[error("token endpoint failed ({last}); next attempt in {retry_in:?}")]
    Backoff { last: String, retry_in: Duration },
    #[error("{0} answered more than {MAX_RESPONSE} bytes")]
    TooLarge(String),
    #[error("token endpoint answered with malformed JSON: {0}")]
    Malformed(serde_json::Error),
}

/// Largest discovery document or token response read: a misbehaving
/// identity provider cannot make the relay-client buffer without bound.
const MAX_RESPONSE: usize = 1 << 20;

/// The body of `resp`, at most [`MAX_RESPONSE`] bytes of it.
async fn read_capped(mut resp: reqwest::Response, what: &str) -> Result<Vec<u8>, TokenError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(TokenError::TooLarge(what.to_owned()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Longest token lifetime believed: an IdP's `expires_in` is clamped to
/// it, so an absurd value can neither overflow a deadline nor keep a
/// token cached for years.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// Backoff after a failed token fetch, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A token the server refused is dropped for a new one only once it is
/// this old, then twice as old for the next one, up to the maximum. A
/// token refused at once will most likely be refused again (an audience or
/// a role the server does not accept, a clock out of step): fetching one
/// per refused call would make a fleet under a server misconfiguration
/// ask the identity provider for a grant every few seconds per robot, and
/// providers limit and bill those. A token that lived to its refresh
/// unrefused resets the wait; an expired one is dropped at once.
const REFUSED_KEEP_MIN: Duration = Duration::from_secs(60);
const REFUSED_KEEP_MAX: Duration = Duration::from_secs(16 * 60);

use crate::lock;

/// The relay-client's token source.
pub enum TokenSource {
    /// No token: for servers with `auth.mode = "none"`.
    None,
    File(FileToken),
    ClientCredentials(Arc<ClientCredentials>),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints a token or secret.
        match self {
            TokenSource::None => f.write_str("TokenSource::None"),
            TokenSource::File(t) => write!(f, "TokenSource::File({})", t.path.display()),
            TokenSource::ClientCredentials(c) => {
                write!(f, "TokenSource::ClientCredentials({})", c.issuer)
            }
        }
    }
}

impl TokenSource {
    pub fn new(cfg: &ClientAuth) -> Result<Self, reqwest::Error> {
        if let Some(path) = &cfg.token_file {
            return Ok(TokenSource::File(FileToken {
                path: path.clone(),
                cache: Mutex::new(None),
            }));
        }
        if cfg.issuer.is_some() {
            return Ok(TokenSource::ClientCredentials(Arc::new(
                ClientCredentials::new(cfg)?,
            )));
        }
        Ok(TokenSource::None)
    }

    /// The current token, if this source has one.
    pub async fn token(&self) -> Result<Option<String>, TokenError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::File(f) => f.token().map(Some),
            TokenSource::ClientCredentials(c) => c.token().await.map(Some),
        }
    }

    /// The server refused `sent` (401, or 403 for a claim the IdP may since
    /// have granted): fetch a new token next time, unless the cached one is
    /// already another (compare and clear, so concurrent refusals cost one
    /// fetch), or is too young to drop ([`REFUSED_KEEP_MIN`]).
    pub async fn invalidate(&self, sent: &str) {
        if let TokenSource::ClientCredentials(c) = self {
            c.refused(sent);
        }
    }
}

/// A token kept in a file; re-read whenever size or mtime change.
pub struct FileToken {
    path: PathBuf,
    cache: Mutex<Option<(SystemTime, u64, String)>>,
}

impl FileToken {
    fn token(&self) -> Result<String, TokenError> {
        let err = |e| TokenError::File(self.path.clone(), e);
        let meta = std::fs::metadata(&self.path).map_err(err)?;
        let stamp = (meta.modified().map_err(err)?, meta.len());
        let mut cache = lock(&self.cache);
        if let Some((mtime, len, token)) = cache.as_ref()
            && (*mtime, *len) == stamp
        {
            return Ok(token.clone());
        }
        let token = std::fs::read_to_string(&self.path)
            .map_err(err)?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(TokenError::Empty(self.path.clone()));
        }
        *cache = Some((stamp.0, stamp.1, token.clone()));
        Ok(token)
    }
}

/// The OIDC client-credentials grant against `auth.issuer`.
pub struct ClientCredentials {
    issuer: String,
    client_id: String,
    secret_file: PathBuf,
    audience: String,
    send_audience_param: bool,
    method: ClientAuthMethod,
    http: reqwest::Client,
    token_endpoint: tokio::sync::Mutex<Option<String>>,
    /// The cached token; read without waiting for any fetch.
    current: Mutex<Option<Cached>>,
    /// Single flight: one fetch at a time, shared by its waiters.
    fetching: tokio::sync::Mutex<()>,
    /// Whether a background refresh task is running.
    refreshing: AtomicBool,
    /// After a failed fetch: no new attempt before `retry_at`.
    failure: Mutex<Option<Failure>>,
    /// How old a refused token must be to be dropped.
    refused_keep: Mutex<Duration>,
}

#[derive(Clone)]
struct Cached {
    token: String,
    /// From here on a refresh runs in the background.
    refresh_at: Instant,
    /// From here on the token is not presented any more.
    expires_at: Instant,
    fetched: Instant,
    /// The server refused it, and it was kept (too young to drop).
    refused: bool,
}

struct Failure {
    last: String,
    retry_at: Instant,
    /// The wait after the next failure.
    next_wait: Duration,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl ClientCredentials {
    fn new(cfg: &ClientAuth) -> Result<Self, reqwest::Error> {
        Ok(Self {
            issuer: cfg.issuer.clone().unwrap_or_default(),
            client_id: cfg.client_id.clone().unwrap_or_default(),
            secret_file: cfg.client_secret_file.clone().unwrap_or_default(),
            audience: cfg.audience.clone().unwrap_or_default(),
            send_audience_param: cfg.send_audience_param,
            method: cfg.client_auth,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                // No redirects: the `https` check covers the endpoint
                // configured or discovered, not where a redirect leads,
                // and a 307 would send the secret along.
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            token_endpoint: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            failure: Mutex::new(None),
            refused_keep: Mutex::new(REFUSED_KEEP_MIN),
        })
    }

    /// See [`TokenSource::invalidate`].
    fn refused(&self, sent: &str) {
        let mut current = lock(&self.current);
        let Some(cached) = current.as_mut().filter(|c| c.token == sent) else {
            return;
        };
        // Past its `exp` by the wall clock, whatever its age says: the
        // monotonic clock stands still while a robot is suspended, and an
        // IdP that gives no `expires_in` leaves the lifetime a guess.
        let now = crate::clock::unix_now().unwrap_or(0);
        if unverified_exp(sent).is_some_and(|exp| exp <= now) {
            *current = None;
            return;
        }
        let mut keep = lock(&self.refused_keep);
        if cached.fetched.elapsed() < *keep {
            tracing::debug!(
                age = ?cached.fetched.elapsed(),
                "refused token kept: a new one would most likely be refused too"
            );
            cached.refused = true;
            return;
        }
        *current = None;
        *keep = (*keep * 2).min(REFUSED_KEEP_MAX);
    }

    /// The cached token while it is valid: polls and chunk posts never
    /// wait for the token endpoint then. Once 80% of its life has passed
    /// (and at least 10 s before expiry for tokens that live over 50 s) a
    /// refresh starts in the background and the
    /// old token stays in use until the new one arrives. Only without a
    /// valid token does a caller wait, for one fetch shared by all.
    async fn token(self: &Arc<Self>) -> Result<String, TokenError> {
        let cached = lock(&self.current).clone();
        if let Some(c) = cached
            && Instant::now() < c.expires_at
        {
            if Instant::now() >= c.refresh_at {
                self.refresh_in_background();
            }
            return Ok(c.token);
        }
        self.fetch_shared().await
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.fetch_shared().await {
                tracing::warn!(error = %e, "refreshing the relay token failed; the current one stays in use");
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// One fetch at a time; a caller that waited for another's fetch
    /// takes its result. After a failure, no new attempt is made before
    /// the backoff has passed.
    async fn fetch_shared(&self) -> Result<String, TokenError> {
        let _single = self.fetching.lock().await;
        let now = Instant::now();
        if let Some(c) = lock(&self.current).as_ref()
            && now < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        if let Some(f) = lock(&self.failure).as_ref()
            && now < f.retry_at
        {
            return Err(TokenError::Backoff {
                last: f.last.clone(),
                retry_in: f.retry_at - now,
            });
        }
        match self.fetch().await {
            Ok((token, lifetime)) => {
                let fetched = Instant::now();
                let replaced = lock(&self.current).replace(Cached {
                    token: token.clone(),
                    refresh_at: crate::clock::after(fetched, refresh_after(lifetime)),
                    expires_at: crate::clock::after(fetched, lifetime),
                    fetched,
                    refused: false,
                });
                // A refresh of a token the server took: refusals, if they
                // come again, start afresh.
                if replaced.is_some_and(|c| !c.refused) {
                    *lock(&self.refused_keep) = REFUSED_KEEP_MIN;
                }
                *lock(&self.failure) = None;
                Ok(token)
            }
            Err(e) => {
                let mut failure = lock(&self.failure);
                let wait = failure.as_ref().map_or(RETRY_MIN, |f| f.next_wait);
                *failure = Some(Failure {
                    last: e.to_string(),
                    retry_at: crate::clock::from_now(wait),
                    next_wait: (wait * 2).min(RETRY_MAX),
                });
                Err(e)
            }
        }
    }

    async fn endpoint(&self) -> Result<String, TokenError> {
        let mut cached = self.token_endpoint.lock().await;
        if let Some(e) = cached.as_ref() {
            return Ok(e.clone());
        }
        #[derive(serde::Deserialize)]
        struct Discovery {
            token_endpoint: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| TokenError::Discovery(url.clone(), e.to_string()))?;
        let body = read_capped(resp, &url)
            .await
            .map_err(|e| TokenError::Discovery(url.clone(), e.to_string()))?;
        let doc: Discovery = serde_json::from_slice(&body)
            .map_err(|e| TokenError::Discovery(url.clone(), e.to_string()))?;
        if !crate::config::is_secure_or_loopback(&doc.token_endpoint) {
            return Err(TokenError::Discovery(
                url,
                "token_endpoint must be https".into(),
            ));
        }
        *cached = Some(doc.token_endpoint.clone());
        Ok(doc.token_endpoint)
    }

    async fn fetch(&self) -> Result<(String, Duration), TokenError> {
        let endpoint = self.endpoint().await?;
        let secret = std::fs::read_to_string(&self.secret_file)
            .map_err(|e| TokenError::Secret(self.secret_file.clone(), e))?
            .trim()
            .to_owned();
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("resource", self.audience.clone()),
        ];
        if self.send_audience_param {
            form.push(("audience", self.audience.clone()));
        }
        let mut req = self.http.post(&endpoint);
        match self.method {
            ClientAuthMethod::ClientSecretBasic => {
                // RFC 6749 2.3.1: form-urlencode both parts first.
                let id: String =
                    form_urlencoded::byte_serialize(self.client_id.as_bytes()).collect();
                let pw: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
                req = req.basic_auth(id, Some(pw));
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_secret", secret));
            }
        }
        let resp = req.form(&form).send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_capped(resp, &endpoint).await.unwrap_or_default();
            return Err(TokenError::Refused {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            });
        }
        let body = read_capped(resp, &endpoint).await?;
        let tok: TokenResponse = serde_json::from_slice(&body).map_err(TokenError::Malformed)?;
        let lifetime = Duration::from_secs(tok.expires_in.unwrap_or(300).max(1)).min(MAX_LIFETIME);
        tracing::debug!(lifetime = ?lifetime, "fetched relay token");
        Ok((tok.access_token, lifetime))
    }
}

/// When a token that is valid for `lifetime` from now is due to be
/// replaced: at 80% of that life, and at least 10 s before expiry for
/// tokens that live long enough (a short-lived token must not be due the
/// moment it arrives).
pub(crate) fn refresh_after(lifetime: Duration) -> Duration {
    let margin = if lifetime > Duration::from_secs(50) {
        (lifetime / 5).max(Duration::from_secs(10))
    } else {
        lifetime / 5
    };
    lifetime - margin
}

/// A token's `exp` (seconds since the epoch), read without verifying it,
/// as the server reads it (a decimal one too).
pub(crate) fn unverified_exp(token: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: serde_json::Value,
    }
    let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Exp>(token).ok()?;
    super::numeric_date(&claims.exp)
}

/// The audience(s) a token claims, for log lines (never the token).
pub fn presented_audience(token: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Aud {
        #[serde(default)]
        aud: super::Audience,
    }
    match jsonwebtoken::dangerous::insecure_decode_claims::<Aud>(token).map(|a| a.aud) {
        Ok(super::Audience::One(a)) => a,
        Ok(super::Audience::Many(v)) => v.join(","),
        _ => "<none>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(c: &ClientCredentials, token: &str) {
        let fetched = Instant::now();
        *lock(&c.current) = Some(Cached {
            token: token.into(),
            refresh_at: crate::clock::after(fetched, Duration::from_secs(3000)),
            expires_at: crate::clock::after(fetched, Duration::from_secs(3600)),
            fetched,
            refused: false,
        });
    }

    fn cached(c: &ClientCredentials) -> Option<String> {
        lock(&c.current).as_ref().map(|c| c.token.clone())
    }

    fn jwt(exp: u64) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({ "exp": exp }),
            &jsonwebtoken::EncodingKey::from_secret(b"not checked here"),
        )
        .expect("token")
    }

    fn unix_now() -> u64 {
        crate::clock::unix_now().expect("clock")
    }

    /// A refused token is dropped only once it is old enough, and the next
    /// one must be twice as old; a refusal of a token no longer cached
    /// changes nothing.
    #[tokio::test(start_paused = true)]
    async fn refused_tokens_are_dropped_ever_more_slowly() {
        let c = ClientCredentials::new(&ClientAuth::default()).expect("client");
        let (a, b) = (jwt(unix_now() + 3600), jwt(unix_now() + 3601));
        cache(&c, &a);
        tokio::time::advance(Duration::from_secs(5)).await;
        c.refused(&a);
        assert_eq!(cached(&c), Some(a.clone()), "a young token is kept");

        tokio::time::advance(REFUSED_KEEP_MIN).await;
        c.refused("other");
        assert_eq!(cached(&c), Some(a.clone()), "another token's refusal");
        c.refused(&a);
        assert_eq!(cached(&c), None, "an old enough token is dropped");

        cache(&c, &b);
        tokio::time::advance(REFUSED_KEEP_MIN + Duration::from_secs(1)).await;
        c.refused(&b);
        assert_eq!(cached(&c), Some(b.clone()), "the next must be older");
        assert!(lock(&c.current).as_ref().is_some_and(|t| t.refused));
        tokio::time::advance(REFUSED_KEEP_MIN).await;
        c.refused(&b);
        assert_eq!(cached(&c), None);
        assert_eq!(*lock(&c.refused_keep), 4 * REFUSED_KEEP_MIN);
    }

    /// A token past its `exp` by the wall clock is dropped at once, however
    /// young it looks (a robot that was suspended).
    #[tokio::test(start_paused = true)]
    async fn an_expired_refused_token_is_dropped_at_once() {
        let c = ClientCredentials::new(&ClientAuth::default()).expect("client");
        let expired = jwt(unix_now() - 10);
        cache(&c, &expired);
        c.refused(&expired);
        assert_eq!(cached(&c), None);
        assert_eq!(*lock(&c.refused_keep), REFUSED_KEEP_MIN, "no doubling");
    }
}
