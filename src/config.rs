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

use std::collections::BTreeMap;

use bytesize::ByteSize;
use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use http::HeaderName;
use serde::{Deserialize, Serialize};

pub use crate::telemetry::TelemetryConfig;

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
    /// `origin` says where the value came from, as figment's messages do.
    #[error("invalid value for `{key}`{}: {reason}", origin.as_deref().map(|s| format!(" (from {s})")).unwrap_or_default())]
    Invalid {
        key: &'static str,
        reason: String,
        origin: Option<String>,
    },
}

impl ConfigError {
    /// Names the source of an invalid value: the file, the environment
    /// variable or the flag it came from (nothing for a default).
    fn with_source(self, fig: &Figment) -> Self {
        match self {
            ConfigError::Invalid {
                key,
                reason,
                origin: None,
            } => {
                // A table's tag is that of the last provider to set any
                // key in it, which need not be the culprit: no source then.
                let leaf = fig
                    .find_value(key)
                    .is_ok_and(|v| !matches!(v, Value::Dict(..)));
                let origin = leaf
                    .then(|| fig.find_metadata(key))
                    .flatten()
                    .and_then(|md| {
                        let keys: Vec<&str> = key.split('.').collect();
                        match &md.source {
                            Some(figment::Source::File(path)) => {
                                Some(format!("{} {}", md.name, path.display()))
                            }
                            // Defaults are the values' own code location.
                            Some(_) => None,
                            None if md.name.contains("environment") => {
                                let var = md.interpolate(&Profile::Default, &keys);
                                Some(format!("{ENV_PREFIX}{}", var.replace('.', "__")))
                            }
                            None => Some(md.name.to_string()),
                        }
                    });
                ConfigError::Invalid {
                    key,
                    reason,
                    origin,
                }
            }
            other => other,
        }
    }
}

/// What the types of a configuration cannot check; [`load`] runs it.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

impl Validate for ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ServerConfig::validate(self)
    }
}

impl Validate for ClientConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ClientConfig::validate(self)
    }
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
        origin: None,
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Every duration has an upper bound: timers add them to the clock, and
/// an absurd value (`300000000000y`) must be refused at start, not
/// overflow a deadline later.
fn check_durations(bounds: &[(&'static str, Duration, Duration)]) -> Result<(), ConfigError> {
    for &(key, d, max) in bounds {
        if d > max {
            return Err(invalid(
                key,
                format!(
                    "{} is too long; at most {}",
                    humantime::format_duration(d),
                    humantime::format_duration(max)
                ),
            ));
        }
    }
    Ok(())
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
    pub telemetry: TelemetryConfig,
    /// Optional separate address for `/metrics` and `/healthz` (cleartext
    /// HTTP); when set, `/metrics` is off on the public listener.
    pub admin_listen: Option<SocketAddr>,
    /// Serve `/metrics` on the public listener too. Unset: only when TLS
    /// is off and there is no `admin_listen` (behind an ingress, where
    /// scrapers expect it); a relay facing the internet itself would
    /// otherwise show every connected backend name to anyone.
    pub metrics_public: Option<bool>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            tls: ServerTls::default(),
            timeouts: ServerTimeouts::default(),
            limits: ServerLimits::default(),
            auth: AuthConfig::default(),
            telemetry: TelemetryConfig::default(),
            admin_listen: None,
            metrics_public: None,
        }
    }
}

impl ServerConfig {
    /// Whether the public listener serves `/metrics` (`metrics_public`).
    pub fn metrics_on_public_listener(&self) -> bool {
        self.metrics_public
            .unwrap_or(!self.tls.enabled && self.admin_listen.is_none())
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
    /// PEM bundle of CAs for relay-client certificates. When set, the
    /// relay-client endpoints require a client certificate chaining to it
    /// (in addition to the token); user-client endpoints do not.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the certificate must also carry the backend name
    /// as a SAN DNS name (so only lowercase backend names without a
    /// trailing dot can be served: DNS names ignore both differences).
    pub client_cert_names_backend: bool,
    /// Obtain and renew the certificate by ACME instead of `cert`/`key`.
    pub acme: Option<AcmeSettings>,
}

/// `[tls.acme]`: the server's certificate from an ACME CA (Let's Encrypt by
/// default), validated with TLS-ALPN-01 on the relay's own listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeSettings {
    /// Names the certificate is for; each must resolve to this host.
    pub domains: Vec<String>,
    /// Account contacts, `mailto:` URLs.
    pub contact: Vec<String>,
    /// The ACME directory.
    pub directory_url: String,
    /// Account key and certificates, kept across restarts.
    pub cache_dir: PathBuf,
    /// Extra PEM trust root for the directory's HTTPS (test or private CAs).
    pub directory_ca_file: Option<PathBuf>,
    /// How long the ACME client may go without an event (a certificate
    /// served, an order done or failed) before it is started afresh: its
    /// HTTP client has no time limits, and one exchange with the CA that
    /// never ends would stop renewals until the certificate expired.
    #[serde(with = "humantime_serde")]
    pub restart_after: Duration,
}

impl Default for AcmeSettings {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            contact: Vec::new(),
            directory_url: "https://acme-v02.api.letsencrypt.org/directory".to_owned(),
            cache_dir: Path::new(DEV_CERT_DIR).join("acme"),
            directory_ca_file: None,
            restart_after: Duration::from_secs(6 * 3600),
        }
    }
}

impl Default for ServerTls {
    fn default() -> Self {
        Self {
            enabled: true,
            cert: Path::new(DEV_CERT_DIR).join("server.pem"),
            key: Path::new(DEV_CERT_DIR).join("server.key"),
            client_ca: None,
            client_cert_names_backend: false,
            acme: None,
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
    /// A relayed request with no chunk for this long is reaped; a chunk
    /// post whose body is not complete after it is answered 400.
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
    /// A new connection must complete its TLS handshake and send complete
    /// request headers within this (slowloris, silent connections). On
    /// HTTP/1.1 it also bounds the wait for each next request head, so an
    /// idle HTTP/1.1 keep-alive connection is closed after the shorter of
    /// this and `idle_connection`.
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// A connection with no request in flight for this long is closed;
    /// until one of its requests passed the gate (a valid token; with auth
    /// off, any request for a backend or a relay endpoint), after
    /// `header_read` already: such a connection is only a socket that
    /// anyone can open.
    #[serde(with = "humantime_serde")]
    pub idle_connection: Duration,
    /// An upgraded connection (WebSocket, exec) with no byte in either
    /// direction for this long is closed, and so is one whose peer stops
    /// reading for this long.
    #[serde(with = "humantime_serde")]
    pub idle_stream: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(30),
            inactive_request: Duration::from_secs(60),
            inactive_backend: Duration::from_secs(30 * 60),
            relay: Duration::from_secs(10),
            shutdown: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            idle_connection: Duration::from_secs(120),
            idle_stream: Duration::from_secs(60 * 60),
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
    /// Open connections. With all open, a new one takes the place of the
    /// oldest connection none of whose requests passed the gate yet
    /// (`server::places`); with none such, it is closed at accept.
    pub max_connections: usize,
    /// Open connections from one IPv4 address or IPv6 /64; beyond it new
    /// ones from there are closed at accept. A site whose robots or users
    /// share one address (NAT) needs as many as they open: one each over
    /// HTTP/2. Unset: [`DEFAULT_CONNECTIONS_PER_IP`] when the server
    /// terminates TLS itself (it faces the internet), no limit without
    /// TLS, where every connection may come from the terminator in front.
    pub max_connections_per_ip: Option<usize>,
    /// Requests of one backend in flight or waiting for its relay-client
    /// (an upgraded connection until it closes); beyond it 503 with
    /// `Retry-After`, other backends unaffected.
    pub max_requests_per_backend: usize,
    /// HTTP/2 `MAX_CONCURRENT_STREAMS` of every connection.
    pub max_streams_per_connection: u32,
    /// Request bodies the v1 path holds in memory at once, over all
    /// requests (v1 buffers a body whole); beyond it a request waits
    /// briefly, then gets 503. A body larger than this can only travel
    /// over v2, which streams and is not counted.
    pub max_buffered_bytes: ByteSize,
    /// Backend names known at once (each costs a map entry and metric
    /// series); a relay-client of a new name beyond it gets 503.
    pub max_backends: usize,
    /// Open v2 connections of one backend name. One relay-client holds
    /// one (two while it renews its token, or redials after its network
    /// changed); the cap keeps one name's token from taking every place
    /// of `max_connections`. Beyond it a new connection gets 429.
    pub max_tunnels_per_backend: usize,
}

/// `limits.max_connections_per_ip` of a server that terminates TLS itself,
/// unless set.
pub const DEFAULT_CONNECTIONS_PER_IP: usize = 1000;

impl ServerConfig {
    /// The limit of connections per source in force, if any
    /// (`limits.max_connections_per_ip`).
    pub fn connections_per_ip(&self) -> Option<usize> {
        self.limits
            .max_connections_per_ip
            .or(self.tls.enabled.then_some(DEFAULT_CONNECTIONS_PER_IP))
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_request_body: ByteSize::mib(64),
            max_response_chunk: ByteSize::mib(16),
            max_connections: 10_000,
            max_connections_per_ip: None,
            max_requests_per_backend: 1000,
            max_streams_per_connection: 256,
            max_buffered_bytes: ByteSize::mib(512),
            max_backends: 10_000,
            max_tunnels_per_backend: 16,
        }
    }
}

/// Issuer name of the embedded development token issuer.
pub const DEV_ISSUER: &str = "http-relay-dev";

/// Authentication of user-clients and relay-clients with JWTs.
///
/// Each backend name has separate audiences for users and relay-clients,
/// so a user token never works as a relay token, and a token for one
/// backend never reaches another.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Audience user-client tokens need; `{backend}` is the backend name.
    pub user_audience: String,
    /// Audience relay-client tokens need; `{backend}` is the backend name.
    pub relay_audience: String,
    /// Clock skew tolerated for `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Header that carries user-client tokens (`Bearer` scheme for
    /// `authorization`; the bare token, or `Bearer`, for any other).
    pub token_header: String,
    /// Cookie that may carry user-client tokens (browsers, WebSockets).
    pub token_cookie: Option<String>,
    /// Origins (`https://host[:port]`) besides the relay's own whose
    /// pages may send requests with the token cookie: a browser sends
    /// cookies on other sites' behalf too (`auth::origin`).
    pub cookie_origins: Vec<String>,
    /// Trusted token issuers.
    pub issuers: Vec<IssuerConfig>,
    /// Claims every user-client token must carry, for any backend: the
    /// claim equals the value, or is an array that contains it; a
    /// `{backend}` in a value is the backend's name.
    pub user_claims: BTreeMap<String, String>,
    /// Claims every relay-client token must carry, as `user_claims`. The
    /// audience alone tells a robot's token from anyone else's only if
    /// the identity provider hands out relay audiences to robots alone;
    /// one that signs a token for any audience its holder asks for
    /// (Google identity tokens) needs these, e.g. the robot's service
    /// account as `email`.
    pub relay_claims: BTreeMap<String, String>,
    /// Per-backend extra audiences and required claims.
    pub backends: BTreeMap<String, BackendAuth>,
    /// Bounds of the JWKS refresh period: the IdP's `Cache-Control:
    /// max-age` is clamped into them, `no-cache` and `no-store` give the
    /// lower bound and no `Cache-Control` the upper one. The upper bound
    /// is how long a key the IdP withdrew can still verify tokens.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_min: Duration,
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_max: Duration,
    /// A token with an unknown `kid` refetches the JWKS at most once per
    /// this window, so random kids cannot make the relay hammer the IdP.
    /// Counted from the last such refetch only (scheduled refreshes do
    /// not count), so it is also the longest a key the IdP has just
    /// published can be refused.
    #[serde(with = "humantime_serde")]
    pub unknown_kid_cooldown: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            user_audience: "http-relay/client/{backend}".into(),
            relay_audience: "http-relay/backend/{backend}".into(),
            leeway: Duration::from_secs(30),
            token_header: "authorization".into(),
            token_cookie: None,
            cookie_origins: Vec::new(),
            issuers: vec![IssuerConfig {
                issuer: DEV_ISSUER.into(),
                jwks_uri: None,
                jwks_file: Some(Path::new(DEV_CERT_DIR).join("dev-issuer.jwks.json")),
                algorithms: Vec::new(),
            }],
            user_claims: BTreeMap::new(),
            relay_claims: BTreeMap::new(),
            backends: BTreeMap::new(),
            jwks_refresh_min: Duration::from_secs(60),
            jwks_refresh_max: Duration::from_secs(3600),
            unknown_kid_cooldown: Duration::from_secs(10),
        }
    }
}

/// How requests are authenticated.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone who reaches the relay may use it (the v1 behaviour); for
    /// local use only, and logged loudly.
    None,
    /// Every endpoint needs a JWT from a trusted issuer.
    #[default]
    Jwt,
}

/// One trusted token issuer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` value; OIDC discovery runs from
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// Skips discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Reads the keys from a local JWKS file instead of HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// Allowed algorithms; empty means every asymmetric one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
}

/// Per-backend additions to the audience policy.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendAuth {
    /// Further audiences accepted from user-clients of this backend.
    pub user_audiences: Vec<String>,
    /// Further audiences accepted from its relay-clients.
    pub relay_audiences: Vec<String>,
    /// Claims every token for this backend must carry, user-client's and
    /// relay-client's alike: the claim equals the value, or is an array
    /// that contains it.
    pub required_claims: BTreeMap<String, String>,
    /// Claims its user-client tokens must carry as well.
    pub user_claims: BTreeMap<String, String>,
    /// Claims its relay-client tokens must carry as well.
    pub relay_claims: BTreeMap<String, String>,
}

/// Issuers known to sign a token for whatever audience its holder asks
/// for: with them, an audience proves nothing about who holds the token.
/// (Google's tokens name either spelling as their `iss`.)
pub const OPEN_AUDIENCE_ISSUERS: &[&str] = &["https://accounts.google.com", "accounts.google.com"];

/// Whether `url` may be fetched for keys: https, or http on a loopback
/// host (for tests and local IdPs).
pub fn is_secure_or_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => true,
        (Some("http"), Some(host)) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

/// The fixed text before and after the single `{backend}` of an
/// audience template.
fn template_parts(template: &str) -> (&str, &str) {
    template.split_once("{backend}").unwrap_or((template, ""))
}

/// Whether two single-`{backend}` templates yield the same audience for
/// some pair of backend names: `P1 + x + S1 == P2 + y + S2` has a solution
/// exactly when one fixed prefix starts the other and one fixed suffix
/// ends the other (backend names being any non-empty text).
pub fn templates_can_collide(a: &str, b: &str) -> bool {
    let ((pa, sa), (pb, sb)) = (template_parts(a), template_parts(b));
    (pa.starts_with(pb) || pb.starts_with(pa)) && (sa.ends_with(sb) || sb.ends_with(sa))
}

/// Whether `template` yields `aud` for some backend name.
pub fn template_yields(template: &str, aud: &str) -> bool {
    let (p, s) = template_parts(template);
    aud.len() > p.len() + s.len() && aud.starts_with(p) && aud.ends_with(s)
}

impl AuthConfig {
    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_durations(&[
            ("auth.leeway", self.leeway, HOUR),
            ("auth.jwks_refresh_min", self.jwks_refresh_min, 7 * DAY),
            ("auth.jwks_refresh_max", self.jwks_refresh_max, 7 * DAY),
            ("auth.unknown_kid_cooldown", self.unknown_kid_cooldown, DAY),
        ])?;
        if self.mode == AuthMode::None {
            return Ok(());
        }
        if self.issuers.is_empty() {
            return Err(invalid(
                "auth.issuers",
                "at least one issuer is needed with mode = \"jwt\"",
            ));
        }
        if HeaderName::from_bytes(self.token_header.as_bytes()).is_err() {
            return Err(invalid("auth.token_header", "is not a valid header name"));
        }
        if let Some(bad) = self
            .cookie_origins
            .iter()
            .find(|o| crate::auth::origin::parse_origin(o).is_none())
        {
            return Err(invalid(
                "auth.cookie_origins",
                format!("{bad:?} is not an origin (https://host[:port])"),
            ));
        }
        for i in &self.issuers {
            // Keys from a file need no fetch, so no https check.
            let url = i.jwks_uri.as_deref().unwrap_or(&i.issuer);
            if i.jwks_file.is_none() && !is_secure_or_loopback(url) {
                return Err(invalid(
                    "auth.issuers",
                    format!("{url:?} must be https (http only on loopback hosts)"),
                ));
            }
            if let Some(bad) = i
                .algorithms
                .iter()
                .find(|a| !crate::auth::is_asymmetric(**a))
            {
                return Err(invalid(
                    "auth.issuers.algorithms",
                    format!("{bad:?} is not an asymmetric algorithm"),
                ));
            }
        }
        for (key, template) in [
            ("auth.user_audience", &self.user_audience),
            ("auth.relay_audience", &self.relay_audience),
        ] {
            match template.matches("{backend}").count() {
                0 => {
                    return Err(invalid(
                        key,
                        "must contain {backend}, or one token would reach every backend",
                    ));
                }
                1 => {}
                _ => return Err(invalid(key, "must contain {backend} only once")),
            }
        }
        if self.user_audience == self.relay_audience {
            return Err(invalid(
                "auth.relay_audience",
                "must differ from auth.user_audience, or user tokens would work as relay tokens",
            ));
        }
        if templates_can_collide(&self.user_audience, &self.relay_audience) {
            return Err(invalid(
                "auth.relay_audience",
                format!(
                    "{:?} and auth.user_audience {:?} can name the same audience for two \
                     backend names (e.g. user \"{{backend}}\" and relay \"relay-{{backend}}\": \
                     a user token for backend relay-X would be a relay token for X); \
                     give them fixed parts that differ at the start or at the end",
                    self.relay_audience, self.user_audience
                ),
            ));
        }
        for (name, b) in &self.backends {
            let user_as_relay = b.user_audiences.iter().find(|a| {
                template_yields(&self.relay_audience, a)
                    || self
                        .backends
                        .values()
                        .any(|o| o.relay_audiences.contains(a))
            });
            let relay_as_user = b
                .relay_audiences
                .iter()
                .find(|a| template_yields(&self.user_audience, a));
            if let Some(aud) = user_as_relay.or(relay_as_user) {
                return Err(invalid(
                    "auth.backends",
                    format!(
                        "audience {aud:?} of backend {name:?} would be both a user and a relay \
                         audience; user tokens would work as relay tokens"
                    ),
                ));
            }
        }
        let claim_maps = [
            ("auth.user_claims", &self.user_claims),
            ("auth.relay_claims", &self.relay_claims),
        ]
        .into_iter()
        .chain(self.backends.values().flat_map(|b| {
            [
                ("auth.backends.required_claims", &b.required_claims),
                ("auth.backends.user_claims", &b.user_claims),
                ("auth.backends.relay_claims", &b.relay_claims),
            ]
        }));
        for (key, claims) in claim_maps {
            if claims.keys().any(String::is_empty) {
                return Err(invalid(key, "a claim name is empty"));
            }
        }
        if self.jwks_refresh_min.is_zero() || self.jwks_refresh_min > self.jwks_refresh_max {
            return Err(invalid(
                "auth.jwks_refresh_min",
                "must be greater than zero and at most auth.jwks_refresh_max",
            ));
        }
        if self.unknown_kid_cooldown.is_zero() {
            return Err(invalid(
                "auth.unknown_kid_cooldown",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Checked here, not only once an exporter is built: a bad ratio is a
/// bad configuration whether or not an endpoint is set.
fn check_sample_ratio(ratio: Option<f64>) -> Result<(), ConfigError> {
    match ratio {
        Some(r) if !(0.0..=1.0).contains(&r) => Err(invalid(
            "telemetry.sample_ratio",
            format!("must be within 0 and 1, not {r}"),
        )),
        _ => Ok(()),
    }
}

impl ServerConfig {
    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_sample_ratio(self.telemetry.sample_ratio)?;
        if self.tls.client_ca.is_some() && !self.tls.enabled {
            return Err(invalid(
                "tls.client_ca",
                "client certificates need the relay's own TLS (tls.enabled = true)",
            ));
        }
        if let Some(acme) = &self.tls.acme {
            if !self.tls.enabled {
                return Err(invalid("tls.acme", "needs tls.enabled = true"));
            }
            if acme.domains.is_empty() {
                return Err(invalid("tls.acme.domains", "at least one domain is needed"));
            }
            if let Some(bad) = acme.domains.iter().find(|d| {
                rustls_pki_types::DnsName::try_from(d.as_str()).is_err() || d.contains('*')
            }) {
                return Err(invalid(
                    "tls.acme.domains",
                    format!(
                        "{bad:?} is not a DNS name (no wildcards: TLS-ALPN-01 cannot validate them)"
                    ),
                ));
            }
            if let Some(bad) = acme.contact.iter().find(|c| !c.starts_with("mailto:")) {
                return Err(invalid(
                    "tls.acme.contact",
                    format!("{bad:?} must be a mailto: URL"),
                ));
            }
            if !acme.directory_url.starts_with("https://") {
                return Err(invalid("tls.acme.directory_url", "must be https"));
            }
            if acme.restart_after < Duration::from_secs(1) {
                return Err(invalid("tls.acme.restart_after", "must be at least 1s"));
            }
        }
        if self.tls.client_cert_names_backend && self.tls.client_ca.is_none() {
            return Err(invalid(
                "tls.client_cert_names_backend",
                "needs tls.client_ca",
            ));
        }
        let t = &self.timeouts;
        check_durations(&[
            ("timeouts.poll", t.poll, HOUR),
            ("timeouts.inactive_request", t.inactive_request, DAY),
            ("timeouts.inactive_backend", t.inactive_backend, 30 * DAY),
            ("timeouts.relay", t.relay, HOUR),
            ("timeouts.shutdown", t.shutdown, HOUR),
            ("timeouts.header_read", t.header_read, HOUR),
            ("timeouts.idle_connection", t.idle_connection, 7 * DAY),
            ("timeouts.idle_stream", t.idle_stream, 7 * DAY),
        ])?;
        let l = &self.limits;
        for (key, n) in [
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip.unwrap_or(1),
            ),
            (
                "limits.max_requests_per_backend",
                l.max_requests_per_backend,
            ),
            (
                "limits.max_streams_per_connection",
                l.max_streams_per_connection as usize,
            ),
            ("limits.max_backends", l.max_backends),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // A relay-client renews its token on a new connection before the
        // old one closes: it needs two at once.
        if l.max_tunnels_per_backend < 2 {
            return Err(invalid(
                "limits.max_tunnels_per_backend",
                "must be at least 2 (a token renewal opens a second connection)",
            ));
        }

        for (key, d) in [
            ("timeouts.poll", t.poll),
            ("timeouts.inactive_request", t.inactive_request),
            ("timeouts.inactive_backend", t.inactive_backend),
            ("timeouts.relay", t.relay),
            ("timeouts.header_read", t.header_read),
            ("timeouts.idle_connection", t.idle_connection),
            ("timeouts.idle_stream", t.idle_stream),
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
        self.auth.validate()
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
    /// How to reach the server: `auto` (v2 when offered, else v1),
    /// `v1` (long polls only) or `v2` (v2, or fail clearly).
    pub transport: Transport,
    /// Extra PEM trust root(s) for the relay server and https backends.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain presented to the relay server when it
    /// asks for one (`tls.client_ca` on the server); with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Concurrent long polls kept open towards the server.
    pub pending_polls: usize,
    /// Requests handled at once (an upgraded connection until it closes);
    /// beyond it a request is answered 503 at once, so a flood cannot
    /// exhaust the robot's memory or sockets.
    pub max_concurrent_requests: usize,
    /// Longest wait for the backend's response head (504 after it), so a
    /// backend that never answers does not pin a task and a socket.
    #[serde(with = "humantime_serde")]
    pub backend_timeout: Duration,
    /// Largest body carried in one response chunk.
    pub max_chunk_size: ByteSize,
    /// A partial chunk is sent after this much backend silence.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// An empty chunk is sent after this much backend silence, so the
    /// server does not reap a quiet stream.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// HTTP/2 ping period towards the server; a dead connection (nothing
    /// read from the server, no full socket buffer draining) is noticed
    /// after this plus `relay_ping_timeout`.
    #[serde(with = "humantime_serde")]
    pub relay_ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub relay_ping_timeout: Duration,
    /// The token presented to the relay server.
    pub auth: ClientAuth,
    pub telemetry: TelemetryConfig,
}

/// The relay-client's transport (`docs/transport-v2.md`, "Negotiation").
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// v2 when the server offers it, else v1 (re-probed periodically).
    #[default]
    Auto,
    /// v1 long polls only: the fleet's protocol.
    V1,
    /// v2 only; fails clearly against a server that does not offer it.
    V2,
}

/// Where the relay-client's token comes from: a file (re-read when it
/// changes), or OIDC client credentials. Neither: no token is sent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientAuth {
    /// A file holding the token, e.g. a projected service-account token.
    pub token_file: Option<PathBuf>,
    /// OIDC issuer for the client-credentials flow (token endpoint from
    /// discovery).
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    /// File holding the client secret (never the secret itself).
    pub client_secret_file: Option<PathBuf>,
    /// Audience asked for: sent as the RFC 8707 `resource` parameter.
    pub audience: Option<String>,
    /// Also send the audience as the `audience` parameter (Auth0 style).
    pub send_audience_param: bool,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuthMethod,
}

impl Default for ClientAuth {
    fn default() -> Self {
        Self {
            token_file: None,
            issuer: None,
            client_id: None,
            client_secret_file: None,
            audience: None,
            send_audience_param: true,
            client_auth: ClientAuthMethod::default(),
        }
    }
}

/// Client authentication at the token endpoint.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
}

impl ClientAuth {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.token_file, &self.issuer) {
            (Some(_), Some(_)) => Err(invalid(
                "auth.token_file",
                "set either auth.token_file or auth.issuer, not both",
            )),
            (_, Some(issuer)) => {
                if !is_secure_or_loopback(issuer) {
                    return Err(invalid(
                        "auth.issuer",
                        format!("{issuer:?} must be https (http only on loopback hosts)"),
                    ));
                }
                for (key, missing) in [
                    ("auth.client_id", self.client_id.is_none()),
                    ("auth.client_secret_file", self.client_secret_file.is_none()),
                    ("auth.audience", self.audience.is_none()),
                ] {
                    if missing {
                        return Err(invalid(key, "is required with auth.issuer"));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            relay_url: "https://127.0.0.1:8443".into(),
            backend_name: String::new(),
            backend_url: "http://127.0.0.1:8080".into(),
            backend_http2: false,
            transport: Transport::Auto,
            ca_file: None,
            tls_cert: None,
            tls_key: None,
            pending_polls: 4,
            max_concurrent_requests: 256,
            backend_timeout: Duration::from_secs(60),
            max_chunk_size: ByteSize::mib(1),
            flush_interval: Duration::from_millis(100),
            keepalive_interval: Duration::from_secs(3),
            relay_ping_interval: Duration::from_secs(5),
            relay_ping_timeout: Duration::from_secs(5),
            auth: ClientAuth::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl ClientConfig {
    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_durations(&[
            ("flush_interval", self.flush_interval, MINUTE),
            ("keepalive_interval", self.keepalive_interval, HOUR),
            ("relay_ping_interval", self.relay_ping_interval, HOUR),
            ("relay_ping_timeout", self.relay_ping_timeout, HOUR),
            ("backend_timeout", self.backend_timeout, DAY),
        ])?;
        if self.backend_name.is_empty() {
            return Err(invalid("backend_name", "is required"));
        }
        if !crate::proto::valid_backend_name(&self.backend_name) {
            return Err(invalid(
                "backend_name",
                "must be 1 to 63 of A-Z a-z 0-9 . _ - (what the server accepts)",
            ));
        }
        check_http_url("relay_url", &self.relay_url)?;
        check_http_url("backend_url", &self.backend_url)?;
        if self.pending_polls == 0 {
            return Err(invalid("pending_polls", "must be at least 1"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(invalid("max_concurrent_requests", "must be at least 1"));
        }
        if self.max_chunk_size.as_u64() == 0 {
            return Err(invalid("max_chunk_size", "must be greater than zero"));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(invalid("tls_key", "is needed with tls_cert")),
            (None, Some(_)) => return Err(invalid("tls_cert", "is needed with tls_key")),
            _ => {}
        }
        check_sample_ratio(self.telemetry.sample_ratio)?;
        self.auth.validate()
    }
}

impl ClientConfig {
    /// The client certificate and key presented to the relay server.
    pub fn relay_identity(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
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

/// Layers defaults, file, environment and flags into `T`, and validates
/// the result: an error names the key and where its value came from.
pub fn load<T>(file: Option<&Path>, flags: Flags) -> Result<T, ConfigError>
where
    T: Default + Serialize + for<'de> Deserialize<'de> + Validate,
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
    let cfg: T = fig.extract()?;
    cfg.validate().map_err(|e| e.with_source(&fig))?;
    Ok(cfg)
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

        // Values that parse but are refused by the checks name their
        // source too: a file, a flag.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "[telemetry]\nsample_ratio = 5.0\n").unwrap();
        let err = load::<ServerConfig>(Some(&file), Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.sample_ratio"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        let flags = Flags::default().set("relay_url", Some("ftp://relay"));
        let flags = flags.set("backend_name", Some("robot-1"));
        let err = load::<ClientConfig>(None, flags).unwrap_err().to_string();
        assert!(err.contains("relay_url"), "{err}");
        assert!(err.contains("command-line flag"), "{err}");
        // The key named is the one that is missing.
        let flags = Flags::default()
            .set("backend_name", Some("robot-1"))
            .set("tls_cert", Some("client.pem"));
        let err = load::<ClientConfig>(None, flags).unwrap_err().to_string();
        assert!(err.starts_with("invalid value for `tls_key`"), "{err}");
        // A default needs no source.
        let err = load::<ClientConfig>(None, Flags::default())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "invalid value for `backend_name`: is required");
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
        let obs = Path::new(env!("CARGO_MANIFEST_DIR")).join("observability");
        let cfg: ServerConfig =
            load(Some(&obs.join("relay-server.toml")), Flags::default()).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.admin_listen.is_some());
        let cfg: ClientConfig =
            load(Some(&obs.join("relay-client.toml")), Flags::default()).unwrap();
        cfg.validate().unwrap();
        for idp in ["keycloak", "auth0", "google"] {
            let path = dir.join(format!("auth-{idp}.example.toml"));
            let cfg: ServerConfig = load(Some(&path), Flags::default()).unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.auth.issuers.len(), 1, "{idp}: replaces the dev issuer");
            assert!(cfg.auth.issuers[0].issuer.starts_with("https://"));
        }
    }

    #[test]
    fn auth_validation() {
        let ok = ServerConfig::default();
        ok.validate().unwrap();
        let mut c = ServerConfig::default();
        c.auth.relay_audience = "https://relay/backend".into();
        assert!(c.validate().unwrap_err().to_string().contains("{backend}"));
        let mut c = ServerConfig::default();
        c.auth.relay_audience = c.auth.user_audience.clone();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("must differ")
        );
        let mut c = ServerConfig::default();
        c.auth.jwks_refresh_min = Duration::from_secs(7200);
        c.auth.jwks_refresh_max = Duration::from_secs(60);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("jwks_refresh_min")
        );
        let mut c = ServerConfig::default();
        c.auth.issuers[0].jwks_file = None;
        c.auth.issuers[0].issuer = "http://idp.example.com".into();
        assert!(c.validate().unwrap_err().to_string().contains("https"));
        // Keys from a file: no https check, but the algorithms are checked.
        let mut c = ServerConfig::default();
        c.auth.issuers[0].issuer = "http://idp.example.com".into();
        assert!(c.auth.issuers[0].jwks_file.is_some());
        c.validate().unwrap();
        c.auth.issuers[0].algorithms = vec![jsonwebtoken::Algorithm::HS256];
        assert!(c.validate().unwrap_err().to_string().contains("asymmetric"));
        let mut c = ServerConfig::default();
        c.auth.cookie_origins = vec!["https://console.example.com".into()];
        c.validate().unwrap();
        c.auth.cookie_origins.push("console.example.com".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("auth.cookie_origins")
        );
    }

    #[test]
    fn audience_templates_that_can_collide_are_refused() {
        assert!(!templates_can_collide(
            "http-relay/client/{backend}",
            "http-relay/backend/{backend}"
        ));
        assert!(!templates_can_collide(
            "{backend}.users",
            "{backend}.relays"
        ));
        assert!(!templates_can_collide("u/{backend}", "r/{backend}"));
        // user {backend}, relay relay-{backend}: user("relay-X") == relay("X").
        assert!(templates_can_collide("{backend}", "relay-{backend}"));
        assert!(templates_can_collide("a/{backend}/x", "a/b/{backend}/x"));
        assert!(templates_can_collide("a/{backend}", "a/{backend}/relay"));
        let mut c = ServerConfig::default();
        c.auth.user_audience = "{backend}".into();
        c.auth.relay_audience = "relay-{backend}".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.relay_audience"), "{err}");
        assert!(err.contains("same audience"), "{err}");
        let mut c = ServerConfig::default();
        c.auth.relay_audience = "r/{backend}/{backend}".into();
        assert!(c.validate().unwrap_err().to_string().contains("only once"));
        let mut c = ServerConfig::default();
        c.auth.backends.insert(
            "a".into(),
            BackendAuth {
                user_audiences: vec!["http-relay/backend/b".into()],
                ..Default::default()
            },
        );
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("both a user and a relay")
        );
    }

    #[test]
    fn an_empty_claim_name_is_refused() {
        let mut c = ServerConfig::default();
        c.auth.relay_claims.insert(String::new(), "x".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.relay_claims"), "{err}");
        let mut c = ServerConfig::default();
        c.auth.backends.insert(
            "b".into(),
            BackendAuth {
                user_claims: [(String::new(), "x".to_owned())].into(),
                ..Default::default()
            },
        );
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.backends.user_claims"), "{err}");
    }

    #[test]
    fn absurd_durations_are_refused() {
        let mut c = ServerConfig::default();
        c.timeouts.relay = Duration::from_secs(300_000_000_000 * 31_557_600);
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("timeouts.relay") && err.contains("at most"),
            "{err}"
        );
        let mut c = ClientConfig {
            backend_name: "r".into(),
            ..ClientConfig::default()
        };
        c.keepalive_interval = Duration::MAX;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("keepalive_interval")
        );
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
