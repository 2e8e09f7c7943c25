//! Typed configuration of the server and the relay-client.
//!
//! Layering (lowest first): built-in defaults, the TOML file given with
//! `--config`, `HTTP_RELAY_*` environment variables (`__` separates nesting
//! levels, e.g. `HTTP_RELAY_TLS__CERT`), then command-line flags. The key
//! names are a contract: other tools drive the binary through them.
//!
//! Every section denies unknown keys so that a typo fails at start instead
//! of silently running with a default. Errors name the key and the source.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables read by both roles.
pub const ENV_PREFIX: &str = "HTTP_RELAY_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// figment's message names the key and the source (file, env or flag).
    #[error("{0}")]
    Figment(Box<figment::Error>),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Figment(Box::new(e))
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

// === Server ===

/// Configuration of the relay server (`http-relay server`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Socket address to listen on.
    pub listen: SocketAddr,
    pub tls: ServerTls,
    pub timeouts: ServerTimeouts,
    pub limits: ServerLimits,
    pub auth: AuthConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            tls: ServerTls::default(),
            timeouts: ServerTimeouts::default(),
            limits: ServerLimits::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// Directory of the development certificates created on first start.
pub const DEV_CERT_DIR: &str = "certs";

/// TLS termination of the public listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTls {
    /// `false` serves cleartext HTTP/1.1 and h2c, for use behind another
    /// TLS terminator.
    pub enabled: bool,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for ServerTls {
    fn default() -> Self {
        Self {
            enabled: true,
            cert: Path::new(DEV_CERT_DIR).join("server.pem"),
            key: Path::new(DEV_CERT_DIR).join("server.key"),
        }
    }
}

impl ServerTls {
    /// The development default: certificate files that the server creates
    /// itself (with a development CA) when they are absent.
    pub fn is_dev_default(&self) -> bool {
        let d = ServerTls::default();
        self.cert == d.cert && self.key == d.key
    }
}

/// Server-side timing rules (`PROTOCOL.md`, "Server-side timing rules").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTimeouts {
    /// How long a relay-client's poll waits for a request before 408.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// A relayed request with no chunk for this long is reaped.
    #[serde(with = "humantime_serde")]
    pub inactive_request: Duration,
    /// A backend that has not polled for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub inactive_backend: Duration,
    /// How long a user-client request waits for a free poll.
    #[serde(with = "humantime_serde")]
    pub relay: Duration,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(30),
            inactive_request: Duration::from_secs(60),
            inactive_backend: Duration::from_secs(30 * 60),
            relay: Duration::from_secs(10),
            shutdown: Duration::from_secs(10),
        }
    }
}

/// Size limits; bigger inputs are refused with a clear status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Largest user-client request body (413 above it).
    pub max_request_body: ByteSize,
    /// Largest single `POST /server/response` message.
    pub max_response_chunk: ByteSize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_request_body: ByteSize::mib(64),
            max_response_chunk: ByteSize::mib(16),
        }
    }
}

/// Authentication of user-clients and relay-clients.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
}

/// How requests are authenticated.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone who reaches the relay may use it (the v1 behaviour).
    #[default]
    None,
}

impl ServerConfig {
    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.timeouts;
        for (key, d) in [
            ("timeouts.poll", t.poll),
            ("timeouts.inactive_request", t.inactive_request),
            ("timeouts.inactive_backend", t.inactive_backend),
            ("timeouts.relay", t.relay),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if self.limits.max_response_chunk.as_u64() < 1024 {
            return Err(invalid(
                "limits.max_response_chunk",
                "must be at least 1KiB",
            ));
        }
        Ok(())
    }
}

// === Client ===

/// Configuration of the relay-client (`http-relay client`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Base URL of the relay server; may carry a path prefix.
    pub relay_url: String,
    /// The name user-clients address this backend by.
    pub backend_name: String,
    /// Where the backend listens (`http://` or `https://`).
    pub backend_url: String,
    /// Talk HTTP/2 with prior knowledge (h2c) to the backend, for gRPC.
    pub backend_http2: bool,
    /// Extra PEM trust root(s) for the relay server and https backends.
    pub ca_file: Option<PathBuf>,
    /// Concurrent long polls kept open towards the server.
    pub pending_polls: usize,
    /// Largest body carried in one response chunk.
    pub max_chunk_size: ByteSize,
    /// A partial chunk is sent after this much backend silence.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// An empty chunk is sent after this much backend silence, so the
    /// server does not reap a quiet stream.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// HTTP/2 ping period towards the server; a dead connection is noticed
    /// after this plus `relay_ping_timeout`.
    #[serde(with = "humantime_serde")]
    pub relay_ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub relay_ping_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            relay_url: "https://127.0.0.1:8443".into(),
            backend_name: String::new(),
            backend_url: "http://127.0.0.1:8080".into(),
            backend_http2: false,
            ca_file: None,
            pending_polls: 4,
            max_chunk_size: ByteSize::mib(1),
            flush_interval: Duration::from_millis(100),
            keepalive_interval: Duration::from_secs(3),
            relay_ping_interval: Duration::from_secs(5),
            relay_ping_timeout: Duration::from_secs(5),
        }
    }
}

impl ClientConfig {
    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend_name.is_empty() {
            return Err(invalid("backend_name", "is required"));
        }
        if self.backend_name.contains(['/', '?', '#']) {
            return Err(invalid("backend_name", "must not contain '/', '?' or '#'"));
        }
        check_http_url("relay_url", &self.relay_url)?;
        check_http_url("backend_url", &self.backend_url)?;
        if self.pending_polls == 0 {
            return Err(invalid("pending_polls", "must be at least 1"));
        }
        if self.max_chunk_size.as_u64() == 0 {
            return Err(invalid("max_chunk_size", "must be greater than zero"));
        }
        Ok(())
    }
}

fn check_http_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(key, format!("{url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Ok(()),
        _ => Err(invalid(
            key,
            format!("{url:?} must be an http:// or https:// URL"),
        )),
    }
}

// === Loading ===

/// Values given on the command line, as dotted keys.
///
/// A provider of its own so that errors say "command-line flag".
#[derive(Default)]
pub struct Flags(Dict);

impl Flags {
    /// Sets `key` (dotted path) when a flag was given.
    pub fn set<T: Serialize>(mut self, key: &str, value: Option<T>) -> Self {
        if let Some(v) = value {
            let v = Value::serialize(v).unwrap_or_else(|e| Value::from(e.to_string()));
            insert_path(&mut self.0, key, v);
        }
        self
    }
}

fn insert_path(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

impl Provider for Flags {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag")
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.0.clone())]))
    }
}

/// Layers defaults, file, environment and flags into `T`.
pub fn load<T>(file: Option<&Path>, flags: Flags) -> Result<T, ConfigError>
where
    T: Default + Serialize + for<'de> Deserialize<'de>,
{
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_owned()));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    fig = fig
        .merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]))
        .merge(flags);
    Ok(fig.extract()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_figment() {
        let cfg: ServerConfig = Figment::from(Serialized::defaults(ServerConfig::default()))
            .extract()
            .unwrap();
        assert_eq!(cfg, ServerConfig::default());
        let cfg: ClientConfig = Figment::from(Serialized::defaults(ClientConfig::default()))
            .extract()
            .unwrap();
        assert_eq!(cfg, ClientConfig::default());
    }

    #[test]
    fn file_durations_and_sizes_parse() {
        let dir = std::env::temp_dir().join(format!("relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\n[timeouts]\npoll = \"250ms\"\n[limits]\nmax_request_body = \"2MiB\"\n[tls]\nenabled = false\n",
        )
        .unwrap();
        let cfg: ServerConfig = load(Some(&path), Flags::default()).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.timeouts.poll, Duration::from_millis(250));
        assert_eq!(cfg.limits.max_request_body.as_u64(), 2 * 1024 * 1024);
        assert!(!cfg.tls.enabled);

        let flags = Flags::default().set("timeouts.poll", Some("1s"));
        let cfg: ServerConfig = load(Some(&path), flags).unwrap();
        assert_eq!(cfg.timeouts.poll, Duration::from_secs(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_key_and_source() {
        let flags = Flags::default().set("timeouts.poll", Some("soon"));
        let err = load::<ServerConfig>(None, flags).unwrap_err().to_string();
        assert!(err.contains("timeouts.poll"), "{err}");
        assert!(err.contains("command-line flag"), "{err}");

        let flags = Flags::default().set("tls.certificate", Some("x"));
        let err = load::<ServerConfig>(None, flags).unwrap_err().to_string();
        assert!(err.contains("certificate"), "{err}");

        let err = load::<ServerConfig>(Some(Path::new("/nonexistent/x.toml")), Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn example_files_load_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let server: ServerConfig =
            load(Some(&dir.join("server.example.toml")), Flags::default()).unwrap();
        server.validate().unwrap();
        assert_eq!(
            server,
            ServerConfig::default(),
            "the example shows the defaults"
        );
        let client: ClientConfig =
            load(Some(&dir.join("client.example.toml")), Flags::default()).unwrap();
        client.validate().unwrap();
        assert_eq!(client.backend_name, "robot-1");
    }

    #[test]
    fn client_validation() {
        let mut cfg = ClientConfig::default();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("backend_name")
        );
        cfg.backend_name = "robot-1".into();
        cfg.validate().unwrap();
        cfg.backend_url = "ftp://x".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("backend_url")
        );
    }
}
