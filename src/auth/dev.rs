//! The embedded development token issuer: an ES256 key under `certs/`
//! (created when absent), published as a local JWKS file that the default
//! server configuration trusts, and used by `http-relay token` to mint
//! tokens. Production configurations point at a real IdP instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::DEV_ISSUER;

/// Why the development issuer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("cannot access {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("cannot create the development issuer key: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("development issuer key or JWKS unusable: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error("development issuer JWKS {0} is invalid: {1}")]
    Jwks(PathBuf, serde_json::Error),
}

/// The development issuer's signing key.
pub struct DevIssuer {
    key: EncodingKey,
    kid: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct DevClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
}

fn key_path(jwks_file: &Path) -> PathBuf {
    jwks_file.with_file_name("dev-issuer.key")
}

impl DevIssuer {
    /// Loads the issuer whose public keys are in `jwks_file`, creating key
    /// and JWKS when the key is absent. Returns whether it was created.
    pub fn ensure(jwks_file: &Path) -> Result<(Self, bool), DevIssuerError> {
        let key_file = key_path(jwks_file);
        if key_file.exists() && jwks_file.exists() {
            return Ok((Self::load(jwks_file)?, false));
        }
        let pair = rcgen::KeyPair::generate()?; // ECDSA P-256
        let pem = pair.serialize_pem();
        let key = EncodingKey::from_ec_pem(pem.as_bytes())?;
        let kid = format!("dev-{}", uuid::Uuid::new_v4().simple());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
        jwk.common.key_id = Some(kid.clone());
        let set = JwkSet { keys: vec![jwk] };
        let json = serde_json::to_string_pretty(&set)
            .map_err(|e| DevIssuerError::Jwks(jwks_file.to_owned(), e))?;
        crate::tls::write_file(&key_file, pem.as_bytes(), true)
            .map_err(|e| DevIssuerError::Io(key_file.clone(), e))?;
        crate::tls::write_file(jwks_file, json.as_bytes(), false)
            .map_err(|e| DevIssuerError::Io(jwks_file.to_owned(), e))?;
        Ok((Self { key, kid }, true))
    }

    /// Loads an existing issuer.
    pub fn load(jwks_file: &Path) -> Result<Self, DevIssuerError> {
        let key_file = key_path(jwks_file);
        let pem = std::fs::read(&key_file).map_err(|e| DevIssuerError::Io(key_file, e))?;
        let key = EncodingKey::from_ec_pem(&pem)?;
        let text = std::fs::read_to_string(jwks_file)
            .map_err(|e| DevIssuerError::Io(jwks_file.to_owned(), e))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| DevIssuerError::Jwks(jwks_file.to_owned(), e))?;
        let kid = set
            .keys
            .first()
            .and_then(|k| k.common.key_id.clone())
            .unwrap_or_default();
        Ok(Self { key, kid })
    }

    /// Mints a token for `aud`.
    pub fn mint(&self, aud: &str, sub: &str, ttl: Duration) -> Result<String, DevIssuerError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = DevClaims {
            iss: DEV_ISSUER,
            sub,
            aud,
            iat: now,
            nbf: now,
            exp: now + ttl.as_secs(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}
