//! A server certificate that follows its files.
//!
//! certbot and cert-manager replace `tls.cert` and `tls.key` by renaming
//! new files over the old ones. The files are checked every
//! [`CHECK_PERIOD`] (and at once on SIGHUP): when they changed and the new
//! pair loads and matches, new handshakes present it; connections already
//! open keep theirs. A pair that does not load or does not match is
//! refused with one log line, and the one in use stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{TlsError, certified_key};
use crate::lock;

/// How often the files are looked at; a replaced certificate is in use
/// within about this long.
pub const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// SIGHUP, the conventional "reload your files" signal.
#[cfg(unix)]
pub type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
pub type Hangup = NoSignal;

/// Where there is no SIGHUP.
#[cfg(not(unix))]
pub struct NoSignal;

#[cfg(not(unix))]
impl NoSignal {
    pub async fn recv(&mut self) -> Option<()> {
        std::future::pending().await
    }
}

/// Listens for SIGHUP from now on (its default action, ending the
/// process, is then off).
pub fn hangup() -> Option<Hangup> {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The certificate of `tls.cert`/`tls.key`, replaced when they change.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like when last loaded (or refused).
    seen: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Identity and age of both files: a rename gives a new inode, an edit in
/// place a new modification time or size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp([FileStamp; 2]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    // `metadata` follows symbolic links, so a swapped link target (as in
    // Kubernetes secret volumes) counts as a change.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

impl ReloadingCert {
    /// Loads the pair; an error here stops the server from starting.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let seen = Self::stamp_of(cert, key);
        let pair = certified_key(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(pair)),
            seen: Mutex::new(seen),
        }))
    }

    fn stamp_of(cert: &Path, key: &Path) -> Option<Stamp> {
        Some(Stamp([file_stamp(cert)?, file_stamp(key)?]))
    }

    /// Loads the files again if they changed since they were last looked
    /// at (or always, with `force`). `Ok(true)`: a new pair is in use.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamp = Self::stamp_of(&self.cert, &self.key);
        {
            let mut seen = lock(&self.seen);
            if !force && *seen == stamp {
                return Ok(false);
            }
            // Remembered before loading: a refused pair is reported once,
            // not at every check until the files change again.
            *seen = stamp;
        }
        let pair = certified_key(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(true)
    }

    /// Checks the files every [`CHECK_PERIOD`] and whenever `hangup` fires
    /// (SIGHUP, registered by the caller before it announces the listener,
    /// so that an early SIGHUP cannot end the process), until the task is
    /// dropped.
    pub async fn watch(self: Arc<Self>, mut hangup: Option<Hangup>) {
        let mut tick = tokio::time::interval(CHECK_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { hangup.as_mut()?.recv().await } => true,
            };
            match self.reload(force) {
                Ok(true) => tracing::info!(
                    cert = %self.cert.display(),
                    "TLS certificate reloaded; new connections get the new one"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "refused the new TLS certificate; the one in use stays"
                ),
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::DevCerts;

    fn end_entity(c: &ReloadingCert) -> Vec<u8> {
        c.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn a_changed_pair_is_taken_and_a_broken_one_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (ca, cb) = (DevCerts::in_dir(a.path()), DevCerts::in_dir(b.path()));
        ca.ensure().unwrap();
        cb.ensure().unwrap();
        let live = tempfile::tempdir().unwrap();
        let (cert, key) = (live.path().join("c.pem"), live.path().join("k.pem"));
        std::fs::copy(&ca.cert, &cert).unwrap();
        std::fs::copy(&ca.key, &key).unwrap();
        let r = ReloadingCert::load(&cert, &key).unwrap();
        let first = end_entity(&r);
        assert!(!r.reload(false).unwrap(), "nothing changed");

        // A mismatched pair (new certificate, old key): refused, old kept.
        let tmp = live.path().join("tmp");
        std::fs::copy(&cb.cert, &tmp).unwrap();
        std::fs::rename(&tmp, &cert).unwrap();
        assert!(matches!(r.reload(false), Err(TlsError::KeyMismatch { .. })));
        assert_eq!(end_entity(&r), first);
        // Reported once: the same files are not tried again.
        assert!(!r.reload(false).unwrap());

        // The matching key arrives: taken.
        std::fs::copy(&cb.key, &tmp).unwrap();
        std::fs::rename(&tmp, &key).unwrap();
        assert!(r.reload(false).unwrap());
        assert_ne!(end_entity(&r), first);

        // Garbage: refused, the good pair stays.
        let good = end_entity(&r);
        std::fs::write(&tmp, "not a certificate").unwrap();
        std::fs::rename(&tmp, &cert).unwrap();
        assert!(r.reload(false).is_err());
        assert_eq!(end_entity(&r), good);
    }
}
