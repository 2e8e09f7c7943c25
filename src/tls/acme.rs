//! The server certificate from an ACME CA (`[tls.acme]`).
//!
//! rustls-acme orders, caches and renews the certificate; we drive its
//! state and answer TLS-ALPN-01 challenges on our own listener: a
//! ClientHello that offers only `acme-tls/1` gets the challenge
//! configuration (and its connection ends after the handshake), every
//! other one our normal configuration, whose certificate rustls-acme
//! resolves. Renewal happens at two thirds of the certificate's lifetime
//! (so short-lived certificates work); a failed order is logged and
//! retried with a doubling backoff while the current certificate stays in
//! use; a cached certificate is served at once after a restart.
//!
//! rustls-acme's HTTP client has no time limits: an exchange with the CA
//! whose answer never comes would leave it waiting for ever, renewals
//! stopped and nothing logged. So after `restart_after` without an event
//! the client is started afresh from the cache ([`Current`] keeps serving
//! the certificate in use until the new one serves one).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, AcmeState, EventOk, ResolvesServerCertAcme};

use super::{TlsError, client_config, provider};
use crate::config::AcmeSettings;

/// How long a start waits for a cached certificate to be in use before it
/// accepts connections anyway.
const CACHED_WAIT: Duration = Duration::from_secs(2);

/// A running ACME certificate source.
pub struct Acme {
    /// Resolves the current certificate for normal handshakes.
    pub resolver: Arc<Current>,
    /// The configuration answering `acme-tls/1` challenge handshakes.
    pub challenge: Arc<ServerConfig>,
    settings: AcmeSettings,
    state: AcmeState<std::io::Error>,
    /// Whether the cache holds a certificate to serve at once.
    cached: bool,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

/// The certificate of the ACME client in use, and the challenges of the
/// newest one: a client started afresh answers its challenges at once,
/// but serves certificates only once it has one.
#[derive(Debug)]
pub struct Current {
    serving: RwLock<Arc<ResolvesServerCertAcme>>,
    challenges: RwLock<Arc<ResolvesServerCertAcme>>,
}

impl Current {
    fn new(first: Arc<ResolvesServerCertAcme>) -> Self {
        Self {
            serving: RwLock::new(first.clone()),
            challenges: RwLock::new(first),
        }
    }

    fn read(lock: &RwLock<Arc<ResolvesServerCertAcme>>) -> Arc<ResolvesServerCertAcme> {
        match lock.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn write(lock: &RwLock<Arc<ResolvesServerCertAcme>>, to: Arc<ResolvesServerCertAcme>) {
        match lock.write() {
            Ok(mut w) => *w = to,
            Err(poisoned) => *poisoned.into_inner() = to,
        }
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let lock = if rustls_acme::is_tls_alpn_challenge(&hello) {
            &self.challenges
        } else {
            &self.serving
        };
        Self::read(lock).resolve(hello)
    }
}

/// A fresh rustls-acme state for `settings`, on the directory client of
/// `settings.directory_ca_file` (checked when the server starts).
fn state(settings: &AcmeSettings) -> Result<AcmeState<std::io::Error>, TlsError> {
    let directory_tls = client_config(settings.directory_ca_file.as_deref())?;
    Ok(
        AcmeConfig::new_with_client_config(&settings.domains, Arc::new(directory_tls))
            .directory(&settings.directory_url)
            .contact(&settings.contact)
            .cache(DirCache::new(settings.cache_dir.clone()))
            .state(),
    )
}

impl Acme {
    /// Sets up the account and certificate cache and the client that
    /// talks to the directory (web PKI roots plus `directory_ca_file`).
    pub fn new(settings: &AcmeSettings) -> Result<Self, TlsError> {
        private_dir(&settings.cache_dir)?;
        let state = state(settings)?;
        // rustls-acme's directory cache names certificate files
        // `cached_cert_<hash>`.
        let cached = std::fs::read_dir(&settings.cache_dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("cached_cert_"))
        });
        let resolver = Arc::new(Current::new(state.resolver()));
        let mut challenge = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        challenge
            .alpn_protocols
            .push(rustls_acme::acme::ACME_TLS_ALPN_NAME.to_vec());
        Ok(Self {
            resolver,
            challenge: Arc::new(challenge),
            settings: settings.clone(),
            state,
            cached,
        })
    }

    /// Drives ordering and renewal until the task is dropped. With a
    /// cached certificate, returns once it is in use (so that the first
    /// connections after a restart get it), else at once: the order runs
    /// in the task, and its validation needs the listener accepting.
    pub async fn spawn(self) -> tokio::task::JoinHandle<()> {
        let (first, deployed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(drive(self.settings, self.state, self.resolver, first));
        if self.cached {
            let _ = tokio::time::timeout(CACHED_WAIT, deployed).await;
        }
        task
    }
}

async fn drive(
    settings: AcmeSettings,
    mut state: AcmeState<std::io::Error>,
    current: Arc<Current>,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = Some(first);
    loop {
        let event = match tokio::time::timeout(settings.restart_after, state.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(_) => {
                tracing::info!(
                    after = ?settings.restart_after,
                    "ACME: no event for tls.acme.restart_after; starting the client afresh from its cache"
                );
                match self::state(&settings) {
                    Ok(fresh) => {
                        state = fresh;
                        Current::write(&current.challenges, state.resolver());
                    }
                    Err(e) => tracing::warn!(error = %e, "ACME: cannot start the client afresh"),
                }
                continue;
            }
        };
        match event {
            Ok(EventOk::DeployedCachedCert) => {
                tracing::info!("ACME: serving the cached certificate");
            }
            Ok(EventOk::DeployedNewCert) => tracing::info!("ACME: new certificate deployed"),
            Ok(EventOk::CertCacheStore | EventOk::AccountCacheStore) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "ACME: ordering a certificate failed; retrying with backoff, the current certificate (if any) stays in use");
                continue;
            }
        }
        // This client serves a certificate now: its resolver takes over.
        Current::write(&current.serving, state.resolver());
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
    }
}

/// Creates `dir` readable by the relay alone: it holds the account key
/// and the certificate's private key.
fn private_dir(dir: &Path) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_cache_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("acme");
        std::fs::create_dir(&cache).unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&cache).unwrap();
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
