//! Client certificates of relay-clients (`tls.client_ca`).
//!
//! The handshake already checked that a presented certificate chains to
//! `tls.client_ca`; what is left is whether a relay-client endpoint got
//! one at all and, with `tls.client_cert_names_backend`, whether it names
//! the backend, so that a stolen certificate of robot A cannot serve
//! robot B.

use rustls_pki_types::{CertificateDer, ServerName};

/// The end-entity certificate a connection's peer presented, if any; put
/// into every request's extensions by the accept loop.
#[derive(Clone, Debug, Default)]
pub struct PeerCert(pub Option<CertificateDer<'static>>);

/// Why a relay-client's certificate was refused; the label of
/// `relay_client_cert_refusals_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    #[error("a client certificate is required for relay-client endpoints")]
    Missing,
    #[error("the client certificate does not name this backend (SAN DNS name)")]
    WrongName,
}

impl CertRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            CertRefusal::Missing => "missing",
            CertRefusal::WrongName => "wrong_name",
        }
    }
}

impl PeerCert {
    /// Whether this peer may act as the relay-client of `backend`.
    pub fn check(&self, backend: &str, names_backend: bool) -> Result<(), CertRefusal> {
        let Some(der) = &self.0 else {
            return Err(CertRefusal::Missing);
        };
        if !names_backend {
            return Ok(());
        }
        // DNS names match without regard to case or a trailing dot, but
        // backend names are exact: only the canonical spelling of a name
        // can be certified, or a certificate of `robot-a` would also serve
        // `Robot-A` and `robot-a.`, different backends.
        if backend.ends_with('.') || backend.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(CertRefusal::WrongName);
        }
        // A backend name that reads as an IP address would be matched
        // against the certificate's IP addresses: it names no backend.
        let Ok(name @ ServerName::DnsName(_)) = ServerName::try_from(backend) else {
            return Err(CertRefusal::WrongName);
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
            return Err(CertRefusal::WrongName);
        };
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|_| CertRefusal::WrongName)?;
        // That check lets a wildcard name (`*.fleet.example`) cover every
        // backend under it: one certificate would serve them all. Only a
        // SAN that is the backend's name itself names it.
        if cert
            .valid_dns_names()
            .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(backend))
        {
            Ok(())
        } else {
            Err(CertRefusal::WrongName)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_for(names: &[&str]) -> PeerCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        PeerCert(Some(cert.der().clone()))
    }

    #[test]
    fn the_backend_must_be_a_san_name_when_required() {
        let a = cert_for(&["robot-a"]);
        assert_eq!(a.check("robot-a", true), Ok(()));
        assert_eq!(a.check("robot-b", true), Err(CertRefusal::WrongName));
        assert_eq!(a.check("robot-b", false), Ok(()));
        // No wildcard surprises: `robot-a` does not cover `x.robot-a`.
        assert_eq!(a.check("x.robot-a", true), Err(CertRefusal::WrongName));
        assert_eq!(
            PeerCert(None).check("robot-a", false),
            Err(CertRefusal::Missing)
        );
        assert_eq!(a.check("not a name", true), Err(CertRefusal::WrongName));
        // Other spellings of the name are other backends.
        assert_eq!(a.check("Robot-A", true), Err(CertRefusal::WrongName));
        assert_eq!(a.check("robot-a.", true), Err(CertRefusal::WrongName));
    }

    /// A wildcard name covers no backend, and an address names none: one
    /// certificate must not serve a whole family of backends.
    #[test]
    fn only_a_san_that_is_the_backends_name_names_it() {
        let wildcard = cert_for(&["*.fleet.example", "robot-c.fleet.example"]);
        assert_eq!(
            wildcard.check("robot-a.fleet.example", true),
            Err(CertRefusal::WrongName)
        );
        assert_eq!(wildcard.check("robot-c.fleet.example", true), Ok(()));
        let address = cert_for(&["10.0.0.5"]);
        assert_eq!(address.check("10.0.0.5", true), Err(CertRefusal::WrongName));
    }
}
