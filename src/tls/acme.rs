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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use rustls::ServerConfig;
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
    pub resolver: Arc<ResolvesServerCertAcme>,
    /// The configuration answering `acme-tls/1` challenge handshakes.
    pub challenge: Arc<ServerConfig>,
    state: AcmeState<std::io::Error>,
    /// Whether the cache holds a certificate to serve at once.
    cached: bool,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

impl Acme {
    /// Sets up the account and certificate cache and the client that
    /// talks to the directory (web PKI roots plus `directory_ca_file`).
    pub fn new(settings: &AcmeSettings) -> Result<Self, TlsError> {
        private_dir(&settings.cache_dir)?;
        let directory_tls = client_config(settings.directory_ca_file.as_deref())?;
        let state = AcmeConfig::new_with_client_config(&settings.domains, Arc::new(directory_tls))
            .directory(&settings.directory_url)
            .contact(&settings.contact)
            .cache(DirCache::new(settings.cache_dir.clone()))
            .state();
        // rustls-acme's directory cache names certificate files
        // `cached_cert_<hash>`.
        let cached = std::fs::read_dir(&settings.cache_dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("cached_cert_"))
        });
        Ok(Self {
            resolver: state.resolver(),
            challenge: state.challenge_rustls_config_with_provider(provider()),
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
        let task = tokio::spawn(drive(self.state, first));
        if self.cached {
            let _ = tokio::time::timeout(CACHED_WAIT, deployed).await;
        }
        task
    }
}

async fn drive(mut state: AcmeState<std::io::Error>, first: tokio::sync::oneshot::Sender<()>) {
    let mut first = Some(first);
    while let Some(event) = state.next().await {
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
