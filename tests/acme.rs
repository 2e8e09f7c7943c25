//! ACME (`[tls.acme]`), with the real binary against a local pebble
//! (tests/common/pebble.rs; `scripts/test` installs it):
//!
//! - on a fresh cache the server gets a certificate for `relay.test`
//!   through TLS-ALPN-01 on its own listener (handshakes fail until then)
//!   and serves it: a client trusting only pebble's root completes a
//!   handshake and `GET /healthz` answers `200 ok`;
//! - after a restart with the directory gone, the cached certificate is
//!   served at once;
//! - a short-lived certificate is renewed (at about 2/3 of its lifetime)
//!   before it expires, with no handshake failing in between; a renewal
//!   failing because the directory is gone is logged and the current
//!   certificate stays;
//! - without `[tls.acme]` nothing about ACME happens; the section's
//!   defaults are the documented ones, and the environment
//!   (`HTTP_RELAY_TLS__ACME__*`) sets it too.
//!
//! The relay listens on the port pebble validates TLS-ALPN-01 on (its
//! `tlsPort`); pebble's DNS answers 127.0.0.1 for `relay.test`.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::pebble::Pebble;
use common::process::{Proc, sigterm, wait_exit};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const DOMAIN: &str = "relay.test";
const DEPLOYED: &str = "ACME: new certificate deployed";
const CACHED: &str = "ACME: serving the cached certificate";
const ORDER_FAILED: &str = "ACME: ordering a certificate failed";
/// Bound of the first issuance, from the server's start.
const ISSUANCE_BOUND: Duration = Duration::from_secs(30);
/// Bound of serving the cached certificate, from the server's start.
const RESTART_BOUND: Duration = Duration::from_secs(2);
/// Lifetime of the certificates of the renewal test.
const SHORT_VALIDITY_SECS: u64 = 30;
/// Bound of the renewal of such a certificate, from its first handshake.
const RENEWAL_BOUND: Duration = Duration::from_secs(40);

// --- the real binary -------------------------------------------------

/// An `http-relay` process and the lines of its stderr.
struct Server {
    proc: Proc,
    lines: Arc<Mutex<Vec<String>>>,
    spawned: Instant,
}

impl Server {
    /// Runs `http-relay <args>` in `cwd` with `RUST_LOG=info`.
    fn spawn(cwd: &Path, args: &[&OsStr], env: &[(&str, &str)]) -> Server {
        let spawned = Instant::now();
        let mut child = Command::new(common::binary())
            .args(args)
            .current_dir(cwd)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Server {
            proc: Proc(child),
            lines,
            spawned,
        }
    }

    /// `http-relay server --config <config>` in `cwd`.
    fn with_config(cwd: &Path, config: &Path) -> Server {
        let args = [
            OsStr::new("server"),
            OsStr::new("--config"),
            config.as_os_str(),
        ];
        Server::spawn(cwd, &args, &[])
    }

    /// Log lines containing `needle` so far.
    fn count(&self, needle: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Every log line so far, for failure messages.
    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Panics with the log when the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.proc.0.try_wait().unwrap() {
            panic!("the server exited ({status}); its log:\n{}", self.log());
        }
    }

    /// Waits (bounded) for a line containing `needle` beyond the first
    /// `seen`.
    async fn wait_line(&mut self, needle: &str, seen: usize, bound: Duration, pebble: &Pebble) {
        let deadline = Instant::now() + bound;
        while self.count(needle) <= seen {
            self.assert_running();
            if Instant::now() > deadline {
                panic!(
                    "no log line {needle:?} within {bound:?}; server log:\n{}\n{}",
                    self.log(),
                    pebble.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and waits (bounded) for the exit.
    fn stop(mut self) {
        sigterm(&self.proc.0);
        wait_exit(&mut self.proc.0);
    }
}

/// A port for the relay that pebble validates on: free when asked, and
/// nothing holds it (the server binds it itself).
fn reserve_port() -> u16 {
    common::pebble::free_port()
}

/// A relay with `[tls.acme]` against `pebble`: its working directory,
/// its `--config` file and its ACME cache.
struct AcmeRelay {
    port: u16,
    config: PathBuf,
    cache_dir: PathBuf,
    dir: TempDir,
}

/// A relay's configuration on 127.0.0.1:`port`, without auth, with
/// `[tls.acme]` for `relay.test` at `directory_url`, and `more` lines of
/// that section.
fn acme_config(port: u16, directory_url: &str, cache_dir: &Path, more: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:{port}"

[auth]
mode = "none"

[tls.acme]
domains = ["{DOMAIN}"]
contact = ["mailto:admin@relay.test"]
directory_url = {directory_url:?}
cache_dir = {cache_dir:?}
{more}"#,
        cache_dir = cache_dir.display().to_string(),
    )
}

impl AcmeRelay {
    fn new(port: u16, pebble: &Pebble) -> AcmeRelay {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("acme-cache");
        let config = dir.path().join("server.toml");
        let ca = pebble.directory_ca_file().display().to_string();
        let toml = acme_config(
            port,
            &pebble.directory_url(),
            &cache_dir,
            &format!("directory_ca_file = {ca:?}\n"),
        );
        std::fs::write(&config, toml).unwrap();
        AcmeRelay {
            port,
            config,
            cache_dir,
            dir,
        }
    }

    fn start(&self) -> Server {
        Server::with_config(self.dir.path(), &self.config)
    }
}

// --- TLS clients --------------------------------------------------------

/// A client trusting only the roots in `root_pem`, speaking HTTP/1.1.
fn connector(root_pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    assert!(!roots.is_empty(), "no certificate in pebble's root PEM");
    common::pki::http1_connector(roots)
}

/// A handshake with 127.0.0.1:`port` as `name`: the stream and the DER of
/// the end-entity certificate, or why it failed.
async fn handshake_as(
    port: u16,
    name: &str,
    tls: &tokio_rustls::TlsConnector,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), String> {
    let attempt = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let der = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        Ok((stream, der))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("handshake: no answer within 5 s".to_owned()))
}

async fn handshake(
    port: u16,
    tls: &tokio_rustls::TlsConnector,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), String> {
    handshake_as(port, DOMAIN, tls).await
}

/// Polls new handshakes until one verifies, within `bound` from the
/// server's start; the stream, the certificate and the time from the
/// server's start.
async fn wait_served(
    server: &mut Server,
    port: u16,
    tls: &tokio_rustls::TlsConnector,
    bound: Duration,
    pebble: &Pebble,
) -> (TlsStream<TcpStream>, Vec<u8>, Duration) {
    loop {
        let last = match handshake(port, tls).await {
            Ok((stream, der)) => return (stream, der, server.spawned.elapsed()),
            Err(e) => e,
        };
        server.assert_running();
        if server.spawned.elapsed() > bound {
            panic!(
                "no verified handshake as {DOMAIN} within {bound:?} of the server's start \
                 (last: {last}); server log:\n{}\n{}",
                server.log(),
                pebble.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /healthz` on `stream`: status and body.
async fn healthz(stream: TlsStream<TcpStream>) -> (u16, Bytes) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/healthz")
        .header("host", DOMAIN)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = common::bounded(sender.send_request(req)).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

// --- certificates -------------------------------------------------------

/// What the tests read of a certificate.
#[derive(Debug)]
struct CertInfo {
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl CertInfo {
    fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap()
    }

    /// How far into the lifetime `at` is (0 at notBefore, 1 at notAfter).
    fn fraction_at(&self, at: SystemTime) -> f64 {
        let since = at.duration_since(self.not_before).unwrap_or_default();
        since.as_secs_f64() / self.lifetime().as_secs_f64()
    }
}

/// Serial and validity of a DER certificate (a minimal DER walk: the
/// tests have no X.509 parser).
fn cert_info(der: &[u8]) -> CertInfo {
    let (tag, cert, _) = tlv(der);
    assert_eq!(tag, 0x30, "Certificate");
    let (tag, tbs, _) = tlv(cert);
    assert_eq!(tag, 0x30, "TBSCertificate");
    let mut rest = tbs;
    if rest[0] == 0xa0 {
        rest = tlv(rest).2; // [0] version
    }
    let (tag, serial, rest) = tlv(rest);
    assert_eq!(tag, 0x02, "serialNumber");
    let rest = tlv(rest).2; // signature
    let rest = tlv(rest).2; // issuer
    let (tag, validity, _) = tlv(rest);
    assert_eq!(tag, 0x30, "Validity");
    let (nb_tag, nb, rest) = tlv(validity);
    let (na_tag, na, _) = tlv(rest);
    CertInfo {
        serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        not_before: der_time(nb_tag, nb),
        not_after: der_time(na_tag, na),
    }
}

/// Tag, content and what follows of the DER element at the start of `d`.
fn tlv(d: &[u8]) -> (u8, &[u8], &[u8]) {
    let (len, header) = match d[1] {
        l if l < 0x80 => (l as usize, 2),
        l => {
            let n = (l & 0x7f) as usize;
            let len = d[2..2 + n]
                .iter()
                .fold(0, |acc, b| (acc << 8) | usize::from(*b));
            (len, 2 + n)
        }
    };
    (d[0], &d[header..header + len], &d[header + len..])
}

/// A UTCTime (0x17) or GeneralizedTime (0x18) in UTC, whole seconds.
fn der_time(tag: u8, content: &[u8]) -> SystemTime {
    let s = std::str::from_utf8(content).unwrap();
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s[..2].parse().unwrap();
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 => (s[..4].parse().unwrap(), &s[4..]),
        _ => panic!("not a time: tag {tag:#x}"),
    };
    assert!(rest.ends_with('Z') && rest.len() == 11, "time {s:?}");
    let field = |i: usize| -> i64 { rest[i..i + 2].parse().unwrap() };
    let (month, day, h, m, sec) = (field(0), field(2), field(4), field(6), field(8));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

/// Whether some file under `dir` holds the certificate `der` (as DER or
/// in a PEM chain).
fn cache_holds(dir: &Path, der: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.map_while(Result::ok).any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            return cache_holds(&path, der);
        }
        let data = std::fs::read(&path).unwrap_or_default();
        data.windows(der.len()).any(|w| w == der)
            || CertificateDer::pem_slice_iter(&data)
                .map_while(Result::ok)
                .any(|c| c.as_ref() == der)
    })
}

// --- setup ---------------------------------------------------------------

/// Pebble, a relay configured for it with a fresh cache, and a client
/// trusting only pebble's root.
struct Setup {
    pebble: Pebble,
    relay: AcmeRelay,
    tls: tokio_rustls::TlsConnector,
}

impl Setup {
    async fn new(validity_secs: Option<u64>) -> Setup {
        let port = reserve_port();
        let pebble = Pebble::start(port, validity_secs).await;
        let relay = AcmeRelay::new(port, &pebble);
        let tls = connector(&pebble.root_pem().await);
        Setup { pebble, relay, tls }
    }

    /// Starts the server on a fresh cache and waits for its first
    /// certificate: the server, the first verified stream, the
    /// certificate and the issuance time from the server's start.
    async fn first_certificate(&self) -> (Server, TlsStream<TcpStream>, Vec<u8>, Duration) {
        let mut server = self.relay.start();
        // Once the listener accepts, a handshake fails: no certificate yet.
        let early = loop {
            match handshake(self.relay.port, &self.tls).await {
                Err(e) if e.starts_with("connect:") => {}
                other => break other,
            }
            server.assert_running();
            assert!(
                server.spawned.elapsed() < ISSUANCE_BOUND,
                "the server does not accept connections; its log:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let early_at = server.spawned.elapsed();
        assert!(
            early.is_err(),
            "a handshake {early_at:?} after the start, with a fresh cache, verified: \
             a certificate for {DOMAIN} from pebble before any issuance?"
        );
        let (stream, der, issued_in) = wait_served(
            &mut server,
            self.relay.port,
            &self.tls,
            ISSUANCE_BOUND,
            &self.pebble,
        )
        .await;
        eprintln!(
            "issuance: first verified handshake {issued_in:?} after the server's start \
             (the first handshake attempt failed at {early_at:?}: {})",
            early.err().unwrap()
        );
        (server, stream, der, issued_in)
    }
}

// --- tests ----------------------------------------------------------------

#[tokio::test]
async fn a_certificate_is_obtained_through_tls_alpn_01_and_served() {
    let setup = Setup::new(None).await;
    let (mut server, stream, der, _) = setup.first_certificate().await;

    // Verified against pebble's root only, for relay.test.
    let info = cert_info(&der);
    eprintln!("served: serial {} valid {:?}", info.serial, info.lifetime());
    assert_eq!(healthz(stream).await, (200, Bytes::from("ok")));
    server
        .wait_line(DEPLOYED, 0, Duration::from_secs(5), &setup.pebble)
        .await;
    assert_eq!(
        server.count(ORDER_FAILED),
        0,
        "an order failed against a healthy directory; log:\n{}",
        server.log()
    );
    // The certificate is for relay.test, not for any name asked.
    let other = handshake_as(setup.relay.port, "other.test", &setup.tls).await;
    assert!(other.is_err(), "a handshake as other.test verified");
    server.assert_running();
}

#[tokio::test]
async fn the_cached_certificate_is_served_at_once_after_a_restart_even_without_the_directory() {
    let mut setup = Setup::new(None).await;
    let (server, stream, first, _) = setup.first_certificate().await;
    assert_eq!(healthz(stream).await, (200, Bytes::from("ok")));
    // Persisted before the restart.
    common::eventually(|| async { cache_holds(&setup.relay.cache_dir, &first).then_some(()) })
        .await;
    server.stop();
    setup.pebble.stop();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", setup.pebble.acme_port)).is_err(),
        "the directory still answers"
    );
    // Started afresh every second from here on: a restart must go on
    // serving the cached certificate.
    let mut toml = std::fs::read_to_string(&setup.relay.config).unwrap();
    toml.push_str("restart_after = \"1s\"\n");
    std::fs::write(&setup.relay.config, toml).unwrap();

    let mut server = setup.relay.start();
    let (stream, der, served_in) = wait_served(
        &mut server,
        setup.relay.port,
        &setup.tls,
        RESTART_BOUND,
        &setup.pebble,
    )
    .await;
    eprintln!("restart: cached certificate served {served_in:?} after the server's start");
    assert!(
        served_in <= RESTART_BOUND,
        "served only {served_in:?} after the start"
    );
    assert!(
        der == first,
        "after the restart another certificate is served"
    );
    assert_eq!(healthz(stream).await, (200, Bytes::from("ok")));
    server
        .wait_line(CACHED, 0, Duration::from_secs(5), &setup.pebble)
        .await;
    assert_eq!(server.count(DEPLOYED), 0, "log:\n{}", server.log());
    server.assert_running();
    server
        .wait_line(
            "starting the client afresh",
            1,
            Duration::from_secs(5),
            &setup.pebble,
        )
        .await;
    for _ in 0..6 {
        let (_, der) = handshake(setup.relay.port, &setup.tls)
            .await
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log()));
        assert!(der == first, "another certificate after a restart");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_short_lived_certificate_is_renewed_and_a_failing_renewal_keeps_the_old_one() {
    let mut setup = Setup::new(Some(SHORT_VALIDITY_SECS)).await;
    let (mut server, _, first, _) = setup.first_certificate().await;
    let first_seen = Instant::now();
    let info1 = cert_info(&first);
    let lifetime = info1.lifetime();
    assert!(
        lifetime <= Duration::from_secs(SHORT_VALIDITY_SECS),
        "pebble issued for {lifetime:?}, not {SHORT_VALIDITY_SECS} s"
    );

    // Renewed before it expires: every handshake meanwhile verifies (an
    // expired certificate would not), and one presents a new certificate.
    let port = setup.relay.port;
    let (renewed, renewed_at) = loop {
        let (_, der) = handshake(port, &setup.tls).await.unwrap_or_else(|e| {
            panic!(
                "{:?} into the first certificate's lifetime, while waiting for its renewal, \
                 a handshake failed: {e}; server log:\n{}",
                SystemTime::now().duration_since(info1.not_before),
                server.log()
            )
        });
        if der != first {
            break (der, SystemTime::now());
        }
        server.assert_running();
        if first_seen.elapsed() > RENEWAL_BOUND {
            panic!(
                "not renewed within {RENEWAL_BOUND:?} of the first certificate ({info1:?}); \
                 server log:\n{}\n{}",
                server.log(),
                setup.pebble.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let info2 = cert_info(&renewed);
    let fraction = info1.fraction_at(renewed_at);
    eprintln!(
        "renewal: new certificate served {:?} after the first one was, at {:.0} % of its \
         {lifetime:?} lifetime (serial {} -> {})",
        first_seen.elapsed(),
        fraction * 100.0,
        info1.serial,
        info2.serial
    );
    assert!(renewed_at < info1.not_after, "renewed after expiry");
    assert!(
        fraction >= 0.6,
        "renewed at {:.0} % of the lifetime, expected at 2/3",
        fraction * 100.0
    );
    assert_ne!(info2.serial, info1.serial);
    server
        .wait_line(DEPLOYED, 1, Duration::from_secs(5), &setup.pebble)
        .await;
    let failed_before = server.count(ORDER_FAILED);

    // The directory goes away: the next renewal fails and the current
    // certificate stays.
    setup.pebble.stop();
    let stopped = Instant::now();
    let until_expiry = info2
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    server
        .wait_line(
            ORDER_FAILED,
            failed_before,
            until_expiry.saturating_sub(Duration::from_secs(3)),
            &setup.pebble,
        )
        .await;
    eprintln!(
        "failing renewal: logged {:?} after the directory stopped, at {:.0} % of the \
         renewed certificate's lifetime",
        stopped.elapsed(),
        info2.fraction_at(SystemTime::now()) * 100.0
    );
    // Still served for a while of retries.
    let keep_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < keep_until {
        let (stream, der) = handshake(port, &setup.tls)
            .await
            .unwrap_or_else(|e| panic!("after the failed renewal: {e}; log:\n{}", server.log()));
        assert!(
            der == renewed,
            "after the failed renewal another certificate is served"
        );
        assert_eq!(healthz(stream).await, (200, Bytes::from("ok")));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    server.assert_running();
}

#[tokio::test]
async fn without_an_acme_section_nothing_about_acme_happens() {
    assert!(
        http_relay::config::ServerConfig::default()
            .tls
            .acme
            .is_none()
    );
    let cwd = tempfile::tempdir().unwrap();
    let args = ["server", "--listen", "127.0.0.1:0"].map(OsStr::new);
    let mut server = Server::spawn(cwd.path(), &args, &[("HTTP_RELAY_AUTH__MODE", "none")]);
    let addr: std::net::SocketAddr = common::eventually(|| async {
        let lines = server.lines.lock().unwrap();
        let line = lines.iter().find(|l| l.contains("listening on "))?;
        line.split_once("://")?.1.trim().parse().ok()
    })
    .await;

    // The development certificate, as before.
    let ca = std::fs::read(cwd.path().join("certs/ca.pem")).unwrap();
    let (stream, _) = handshake_as(addr.port(), "localhost", &connector(&ca))
        .await
        .unwrap();
    assert_eq!(healthz(stream).await, (200, Bytes::from("ok")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.assert_running();
    let log = server.log();
    assert!(
        !log.to_ascii_lowercase().contains("acme"),
        "ACME in the log of a server without [tls.acme]:\n{log}"
    );
    assert!(!cwd.path().join("certs/acme").exists());
}

#[tokio::test]
async fn the_acme_section_has_the_documented_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        "[tls.acme]\ndomains = [\"relay.example.com\"]\ncontact = [\"mailto:ops@example.com\"]\n",
    )
    .unwrap();
    let cfg: http_relay::config::ServerConfig =
        http_relay::config::load(Some(&file), http_relay::config::Flags::default()).unwrap();
    let acme = cfg.tls.acme.expect("[tls.acme] read");
    assert_eq!(acme.domains, ["relay.example.com"]);
    assert_eq!(acme.contact, ["mailto:ops@example.com"]);
    assert_eq!(
        acme.directory_url,
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(acme.cache_dir, Path::new("certs/acme"));
    assert_eq!(acme.directory_ca_file, None);
    assert_eq!(acme.restart_after, Duration::from_secs(6 * 3600));
}

/// A CA that accepts connections and never answers (its state dropped by
/// a NAT, a hung front) would hold rustls-acme's client for ever, with no
/// time limit of its own: the relay starts it afresh after
/// `tls.acme.restart_after` without an event, and says so. The silent
/// "CA" counts the connections made to it.
#[tokio::test]
async fn an_acme_client_stuck_on_a_silent_ca_is_started_afresh() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let dialled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::new()));
    let accepting = tokio::spawn({
        let (dialled, held) = (dialled.clone(), held.clone());
        async move {
            while let Ok((tcp, _)) = silent.accept().await {
                dialled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.lock().unwrap().push(tcp);
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    let port = common::pebble::free_port();
    let toml = acme_config(
        port,
        &format!("https://{addr}/dir"),
        &dir.path().join("acme-cache"),
        "restart_after = \"1s\"\n",
    );
    std::fs::write(&config, toml).unwrap();
    let mut server = Server::with_config(dir.path(), &config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dialled.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        server.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} connections to the silent CA in 10 s; log:\n{}",
            dialled.load(std::sync::atomic::Ordering::SeqCst),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        server.count("starting the client afresh") >= 2,
        "{}",
        server.log()
    );
    accepting.abort();
}

#[test]
fn the_acme_section_is_read_from_the_environment_too() {
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(common::binary())
        .args(["server", "--check-config"])
        .current_dir(cwd.path())
        .env("HTTP_RELAY_TLS__ACME__DOMAINS", r#"["relay.test"]"#)
        .env(
            "HTTP_RELAY_TLS__ACME__CONTACT",
            r#"["mailto:admin@relay.test"]"#,
        )
        .env("HTTP_RELAY_AUTH__MODE", "none")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(
        stdout.contains("relay.test"),
        "the note on the certificate names no domain from HTTP_RELAY_TLS__ACME__DOMAINS:\n{stdout}"
    );
    assert!(
        !cwd.path().join("certs").exists(),
        "--check-config created files"
    );
}
