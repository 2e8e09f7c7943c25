//! Signing keys of one token issuer: OIDC discovery, JWKS fetch, cache,
//! periodic refresh and rate-limited refetch on an unknown `kid`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use tokio::time::Instant;

use super::AuthError;
use crate::config::{AuthConfig, IssuerConfig, is_secure_or_loopback};

/// Why keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("reading {0}: {1}")]
    File(String, std::io::Error),
    #[error("fetching {0}: {1}")]
    Http(String, reqwest::Error),
    #[error("invalid JWKS or discovery document from {0}: {1}")]
    Parse(String, serde_json::Error),
    #[error("discovery document of {0} names issuer {1:?}")]
    IssuerMismatch(String, String),
    #[error("jwks_uri {0:?} must be https (http only on loopback hosts)")]
    InsecureUri(String),
    #[error("{0} answered more than {MAX_DOCUMENT} bytes")]
    TooLarge(String),
}

/// Largest discovery document or JWKS accepted.
const MAX_DOCUMENT: usize = 1 << 20;

/// Longest a retry of a failed fetch waits.
const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    keys: Option<Arc<JwkSet>>,
    /// When the last fetch for an unknown kid started, and again when it
    /// ended: the cooldown counts from both, so a fetch slower than the
    /// cooldown cannot be followed at once by another (and another) for
    /// the requests that waited on it. Scheduled refreshes do not count:
    /// an IdP that publishes a new key and signs with it at once, just
    /// after a refresh, must not see its tokens refused for a whole
    /// cooldown.
    last_on_demand: Option<Instant>,
    jwks_uri: Option<String>,
}

/// The cached keys of one issuer.
pub struct KeySource {
    cfg: IssuerConfig,
    refresh_min: Duration,
    refresh_max: Duration,
    cooldown: Duration,
    http: reqwest::Client,
    state: Mutex<State>,
    /// One fetch at a time, scheduled or on demand: the last fetch to end
    /// is the last to have started, so an old answer never replaces a
    /// newer one. Shared, so that an on-demand fetch's task can hold it.
    refetch: Arc<tokio::sync::Mutex<()>>,
}

use crate::lock;

/// How long the IdP lets the keys be kept (`Cache-Control`): its
/// `max-age`, or zero for `no-store` and `no-cache` (refreshed as often as
/// `jwks_refresh_min` allows, not as seldom as `jwks_refresh_max`: an IdP
/// that asks for no caching wants a withdrawn key to stop working soon);
/// `None` without either.
fn max_age(headers: &http::HeaderMap) -> Option<Duration> {
    let directives = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut age = None;
    for d in directives {
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if let Some(secs) = d.strip_prefix("max-age=") {
            age = age.or_else(|| secs.trim().parse().ok().map(Duration::from_secs));
        }
    }
    age
}

impl KeySource {
    pub fn new(cfg: IssuerConfig, auth: &AuthConfig, http: reqwest::Client) -> Self {
        Self {
            cfg,
            refresh_min: auth.jwks_refresh_min,
            refresh_max: auth.jwks_refresh_max,
            cooldown: auth.unknown_kid_cooldown,
            http,
            state: Mutex::new(State::default()),
            refetch: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    pub fn allows(&self, alg: jsonwebtoken::Algorithm) -> bool {
        self.cfg.algorithms.is_empty() || self.cfg.algorithms.contains(&alg)
    }

    /// Keeps the keys fresh: fetches at start (retrying with backoff while
    /// the IdP is unreachable), then on the period the IdP's
    /// `Cache-Control` asks for, clamped to the configured bounds.
    pub async fn run(self: Arc<Self>) {
        let mut retry = Duration::from_millis(250);
        loop {
            let fetched = {
                let _single = self.refetch.lock().await;
                self.fetch().await
            };
            match fetched {
                Ok(max_age) => {
                    retry = Duration::from_millis(250);
                    let period = max_age
                        .unwrap_or(self.refresh_max)
                        .clamp(self.refresh_min, self.refresh_max);
                    tokio::time::sleep(period).await;
                }
                Err(e) => {
                    tracing::warn!(issuer = self.cfg.issuer, error = %e, retry_in = ?retry, "cannot fetch signing keys");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// The key with id `kid`. An unknown kid refetches the keys, at most
    /// once per cooldown window (counted from the start and from the end
    /// of the last such refetch), and concurrent requests share that one
    /// fetch: they wait for it, and find a newly published key in it.
    ///
    /// The fetch runs in a task of its own, so it ends even if the request
    /// that started it goes away: a fetch dropped midway would use up the
    /// window and bring nothing, and any unauthenticated peer could start
    /// and drop one per window (a reset HTTP/2 stream) to keep a newly
    /// published key out until the next scheduled refresh.
    pub async fn key(self: &Arc<Self>, kid: &str) -> Result<Jwk, AuthError> {
        if let Some(found) = self.cached(kid)? {
            return Ok(found);
        }
        let single = Arc::clone(&self.refetch).lock_owned().await;
        // Another request may have refetched while this one waited.
        if let Some(found) = self.cached(kid)? {
            return Ok(found);
        }
        {
            let mut state = lock(&self.state);
            if state
                .last_on_demand
                .is_some_and(|t| t.elapsed() < self.cooldown)
            {
                return Err(AuthError::UnknownKid);
            }
            state.last_on_demand = Some(Instant::now());
        }
        let this = Arc::clone(self);
        let fetch = tokio::spawn(async move {
            let _single = single;
            if let Err(e) = this.fetch().await {
                tracing::warn!(issuer = this.cfg.issuer, error = %e, "refetching signing keys failed");
            }
            lock(&this.state).last_on_demand = Some(Instant::now());
        });
        // A fetch that panicked brought nothing: the kid is as unknown.
        let _ = fetch.await;
        self.cached(kid)?.ok_or(AuthError::UnknownKid)
    }

    fn cached(&self, kid: &str) -> Result<Option<Jwk>, AuthError> {
        let state = lock(&self.state);
        let keys = state.keys.as_ref().ok_or(AuthError::KeysUnavailable)?;
        Ok(keys.find(kid).cloned())
    }

    /// Fetches and stores the keys; returns the IdP's `max-age`.
    async fn fetch(&self) -> Result<Option<Duration>, FetchError> {
        let known_uri = lock(&self.state).jwks_uri.clone();
        let (set, max_age) = if let Some(path) = &self.cfg.jwks_file {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| FetchError::File(path.display().to_string(), e))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| FetchError::Parse(path.display().to_string(), e))?;
            (set, None)
        } else {
            let uri = match known_uri.or_else(|| self.cfg.jwks_uri.clone()) {
                Some(uri) => uri,
                None => self.discover().await?,
            };
            let fetched = self.get(&uri).await;
            let (body, max_age) = match fetched {
                Ok(ok) => ok,
                Err(e) => {
                    // A discovered URI may have moved: discover again next time.
                    if self.cfg.jwks_uri.is_none() {
                        lock(&self.state).jwks_uri = None;
                    }
                    return Err(e);
                }
            };
            let set: JwkSet =
                serde_json::from_slice(&body).map_err(|e| FetchError::Parse(uri.clone(), e))?;
            lock(&self.state).jwks_uri = Some(uri);
            (set, max_age)
        };
        tracing::debug!(
            issuer = self.cfg.issuer,
            keys = set.keys.len(),
            "signing keys loaded"
        );
        // The new set replaces the old one: keys the IdP still publishes
        // stay valid across a rotation, removed ones stop working.
        lock(&self.state).keys = Some(Arc::new(set));
        Ok(max_age)
    }

    /// GETs `url` (2xx only), reading at most [`MAX_DOCUMENT`] bytes;
    /// returns the body and the `Cache-Control` max-age.
    async fn get(&self, url: &str) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        let err = |e| FetchError::Http(url.to_owned(), e);
        let mut resp = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(err)?;
        let age = max_age(resp.headers());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(err)? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT {
                return Err(FetchError::TooLarge(url.to_owned()));
            }
        }
        Ok((body, age))
    }

    /// OIDC discovery: the `jwks_uri` of the issuer's configuration.
    async fn discover(&self) -> Result<String, FetchError> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let (body, _) = self.get(&url).await?;
        let doc: Discovery =
            serde_json::from_slice(&body).map_err(|e| FetchError::Parse(url.clone(), e))?;
        if doc.issuer.trim_end_matches('/') != self.cfg.issuer.trim_end_matches('/') {
            return Err(FetchError::IssuerMismatch(url, doc.issuer));
        }
        if !is_secure_or_loopback(&doc.jwks_uri) {
            return Err(FetchError::InsecureUri(doc.jwks_uri));
        }
        Ok(doc.jwks_uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "cache-control",
            "public, max-age=300, must-revalidate".parse().unwrap(),
        );
        assert_eq!(max_age(&h), Some(Duration::from_secs(300)));
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::ZERO));
        h.insert("cache-control", "max-age=600, No-Cache".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::ZERO));
        h.insert("cache-control", "public".parse().unwrap());
        assert_eq!(max_age(&h), None);
        h.remove("cache-control");
        assert_eq!(max_age(&h), None);
    }
}
