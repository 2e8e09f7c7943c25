//! rustls configurations: the server's acceptor (its certificate, reloaded
//! from files or obtained by ACME, and optional client certificates of
//! relay-clients), the relay-client's trust store and identity, and the
//! development CA that makes the default start work.

pub mod acme;
pub mod client_cert;
pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read PEM from {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{key} does not match the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot use the private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA bundle {path}: {source}")]
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("cannot create development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The one crypto backend of the project (see `Cargo.toml`): explicit, so
/// that no process-wide default has to be guessed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

/// A certificate chain and its private key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::Key {
            path: key.to_owned(),
            source,
        })?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        Ok(()) => Ok(pair),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
        // A key type whose public half rustls cannot compare: accepted,
        // as rustls itself does.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(pair),
        Err(e) => Err(e.into()),
    }
}

/// Server config with a fixed certificate: TLS 1.2 and 1.3 only, ALPN
/// `h2` then `http/1.1`, no client certificates.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let pair = Arc::new(certified_key(cert, key)?);
    server_config_with(Arc::new(rustls::sign::SingleCertAndKey::from(pair)), None)
}

/// Server config presenting what `certs` resolves. With `client_ca`, a
/// client certificate is asked for and, when one is presented, must chain
/// to that bundle; presenting none is allowed (browsers have none), and
/// the relay-client endpoints then refuse the request
/// ([`client_cert::PeerCert`]).
pub fn server_config_with(
    certs: Arc<dyn ResolvesServerCert>,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path)?),
    };
    let mut cfg = builder.with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Verifier of client certificates chaining to the bundle at `path`; a
/// client presenting none passes (user-clients have none).
pub fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|source| TlsError::ClientCa {
            path: path.to_owned(),
            source,
        })
}

/// Client config trusting the public web PKI plus `extra_ca` (a PEM file).
/// ALPN is left to the HTTP connector, which offers what it speaks.
pub fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    client_config_with(extra_ca, None)
}

/// [`client_config`] presenting `identity` (certificate chain, key) when
/// the server asks for a client certificate.
pub fn client_config_with(
    extra_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in load_certs(path)? {
            roots.add(cert)?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pair = certified_key(cert, key)?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                Arc::new(pair),
            )))
        }
    })
}

/// Paths of the development CA and server certificate.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevCerts {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }

    /// Creates a development CA and a server certificate for `localhost`,
    /// `127.0.0.1` and `::1` signed by it, unless the server files exist.
    ///
    /// Returns whether anything was created. Keys are written with mode
    /// 0600. Clients trust the CA with `--ca-file certs/ca.pem`.
    pub fn ensure(&self) -> Result<bool, TlsError> {
        if self.cert.exists() && self.key.exists() {
            return Ok(false);
        }
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "http-relay development CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);

        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "http-relay development server");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;

        for (path, data, secret) in [
            (&self.ca_cert, ca_cert.pem(), false),
            (&self.ca_key, ca_key.serialize_pem(), true),
            (&self.cert, cert.pem(), false),
            (&self.key, key.serialize_pem(), true),
        ] {
            write_file(path, data.as_bytes(), secret).map_err(|source| TlsError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(true)
    }
}

/// Writes a file, creating its directory; secrets get mode 0600.
pub(crate) fn write_file(path: &Path, data: &[u8], secret: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write as _;
    opts.open(path).and_then(|mut f| f.write_all(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_load_into_server_and_client_configs() {
        let dir = std::env::temp_dir().join(format!("relay-tls-{}", std::process::id()));
        let dev = DevCerts::in_dir(&dir);
        assert!(dev.ensure().unwrap());
        assert!(!dev.ensure().unwrap(), "existing files are kept");
        let server = server_config(&dev.cert, &dev.key).unwrap();
        assert_eq!(server.alpn_protocols[0], b"h2");
        client_config(Some(&dev.ca_cert)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let err = server_config(Path::new("/nope/c.pem"), Path::new("/nope/k.pem")).unwrap_err();
        assert!(err.to_string().contains("/nope/c.pem"), "{err}");
    }
}
