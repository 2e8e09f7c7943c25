//! Certificates for the TLS tests: independent server CA and certificate
//! pairs (the development CA of [`DevCerts`]), and a client CA issuing
//! relay-client certificates with rcgen.

use std::path::{Path, PathBuf};

use http_relay::tls::DevCerts;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A server certificate for `localhost`/`127.0.0.1` and its own CA, in a
/// directory of their own.
pub struct ServerPair {
    pub files: DevCerts,
    _dir: TempDir,
}

impl ServerPair {
    pub fn new() -> ServerPair {
        let dir = tempfile::tempdir().unwrap();
        let files = DevCerts::in_dir(dir.path());
        files.ensure().unwrap();
        ServerPair { files, _dir: dir }
    }

    /// DER of the server certificate, to recognise it on the wire.
    pub fn der(&self) -> Vec<u8> {
        der_of(&self.files.cert)
    }
}

/// DER of the first certificate of a PEM file.
pub fn der_of(path: &Path) -> Vec<u8> {
    http_relay::tls::load_certs(path).unwrap()[0].to_vec()
}

/// A CA for relay-client certificates.
pub struct ClientCa {
    /// PEM of the CA certificate (`tls.client_ca`).
    pub pem: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    dir: TempDir,
}

/// A client certificate and its key, as files.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// Certificate and key in one PEM, as `reqwest::Identity` takes them.
    pub fn reqwest(&self) -> reqwest::Identity {
        let mut pem = std::fs::read(&self.cert).unwrap();
        pem.extend(std::fs::read(&self.key).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }
}

impl ClientCa {
    pub fn new(name: &str) -> ClientCa {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.path().join("client-ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        ClientCa {
            pem,
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    /// A client certificate whose only SAN is the DNS name `san`.
    pub fn issue(&self, san: &str) -> Identity {
        let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, san);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let id = Identity {
            cert: self.dir.path().join(format!("{san}.pem")),
            key: self.dir.path().join(format!("{san}.key")),
        };
        std::fs::write(&id.cert, cert.pem()).unwrap();
        std::fs::write(&id.key, key.serialize_pem()).unwrap();
        id
    }
}

/// A TLS client trusting only `roots`, offering HTTP/1.1.
pub fn http1_connector(roots: rustls::RootCertStore) -> tokio_rustls::TlsConnector {
    let mut cfg = rustls::ClientConfig::builder_with_provider(http_relay::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}
