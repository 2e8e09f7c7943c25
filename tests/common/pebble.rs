//! A local ACME directory for the ACME tests: `pebble` (Let's Encrypt's
//! test CA) and `pebble-challtestsrv` (its DNS, answering 127.0.0.1 for
//! every name), both on 127.0.0.1 only, as child processes killed on drop.
//!
//! Pebble validates TLS-ALPN-01 by connecting to `<domain>:<tls_port>`, so
//! the relay under test must listen on the `tls_port` given to
//! [`Pebble::start`]. Pebble creates a new signing root on every start:
//! fetch it with [`Pebble::root_pem`] after each start.
//!
//! Both binaries come with the Debian package `pebble`, which
//! `scripts/test` installs when they are missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

use super::process::Proc;

/// Bound of the wait for pebble and challtestsrv to listen.
const START_BOUND: Duration = Duration::from_secs(15);

/// Pebble and its DNS server, running.
pub struct Pebble {
    dir: TempDir,
    /// Port of the ACME directory (`https://127.0.0.1:<port>/dir`).
    pub acme_port: u16,
    /// Port of pebble's management interface (`/roots/0`).
    pub management_port: u16,
    /// The port pebble validates TLS-ALPN-01 challenges on.
    pub tls_port: u16,
    pebble: Option<Proc>,
    challtestsrv: Option<Proc>,
}

impl Pebble {
    /// Starts challtestsrv and pebble validating TLS-ALPN-01 on
    /// `tls_port`, issuing certificates valid for `validity_secs` (pebble's
    /// default of 5 years when `None`), and waits until both listen.
    ///
    /// Panics with what to install when the binaries are missing.
    pub async fn start(tls_port: u16, validity_secs: Option<u64>) -> Pebble {
        for bin in ["pebble", "pebble-challtestsrv"] {
            assert!(
                on_path(bin),
                "`{bin}` is not installed: the ACME tests (tests/acme.rs) need `pebble` and \
                 `pebble-challtestsrv` on PATH. `scripts/test` installs them (Debian package \
                 `pebble`: apt-get install pebble)."
            );
        }
        let dir = tempfile::tempdir().unwrap();
        write_directory_tls(dir.path());

        let dns_port = free_tcp_and_udp_port();
        let challtestsrv_port = free_port();
        let (acme_port, management_port, http_port) = (free_port(), free_port(), free_port());

        let config = format!(
            r#"{{
  "pebble": {{
    "listenAddress": "127.0.0.1:{acme_port}",
    "managementListenAddress": "127.0.0.1:{management_port}",
    "certificate": {cert:?},
    "privateKey": {key:?},
    "httpPort": {http_port},
    "tlsPort": {tls_port},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false{validity}
  }}
}}
"#,
            cert = dir.path().join("pebble-cert.pem").display().to_string(),
            key = dir.path().join("pebble-key.pem").display().to_string(),
            validity = validity_secs
                .map(|v| format!(",\n    \"certificateValidityPeriod\": {v}"))
                .unwrap_or_default(),
        );
        std::fs::write(dir.path().join("pebble-config.json"), config).unwrap();

        // Every listener on 127.0.0.1: an empty `-management` would bind
        // port 80 on all interfaces.
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{challtestsrv_port}")])
            .stdin(Stdio::null())
            .stdout(log_file(dir.path(), "challtestsrv.log"))
            .stderr(log_file(dir.path(), "challtestsrv.log"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let challtestsrv = Proc(challtestsrv);

        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble-config.json"))
            .args([
                "-dnsserver",
                &format!("127.0.0.1:{dns_port}"),
                "-strict=false",
            ])
            // No random sleeps before validations, no bad-nonce rejections,
            // no reuse of valid authorizations, root -> intermediate -> leaf.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_CHAIN_LENGTH", "1")
            .stdin(Stdio::null())
            .stdout(log_file(dir.path(), "pebble.log"))
            .stderr(log_file(dir.path(), "pebble.log"))
            .spawn()
            .expect("start pebble");
        let mut pebble = Pebble {
            dir,
            acme_port,
            management_port,
            tls_port,
            pebble: Some(Proc(pebble)),
            challtestsrv: Some(challtestsrv),
        };
        let deadline = Instant::now() + START_BOUND;
        for (port, what) in [
            (dns_port, "pebble-challtestsrv (DNS)"),
            (challtestsrv_port, "pebble-challtestsrv (management)"),
            (acme_port, "pebble (ACME directory)"),
            (management_port, "pebble (management)"),
        ] {
            pebble.wait_listening(port, what, deadline).await;
        }
        pebble
    }

    async fn wait_listening(&mut self, port: u16, what: &str, deadline: Instant) {
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            let exited = [&mut self.pebble, &mut self.challtestsrv]
                .into_iter()
                .flatten()
                .find_map(|proc| proc.0.try_wait().unwrap());
            if let Some(status) = exited {
                panic!(
                    "a child exited ({status}) before {what} listened:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not listen on 127.0.0.1:{port} within {START_BOUND:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The ACME directory URL (`tls.acme.directory_url`).
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// PEM of the CA of the directory's own HTTPS certificate
    /// (`tls.acme.directory_ca_file`).
    pub fn directory_ca_file(&self) -> PathBuf {
        self.dir.path().join("directory-ca.pem")
    }

    /// PEM of pebble's current signing root, from its management
    /// interface. A new one on every pebble start.
    pub async fn root_pem(&self) -> Vec<u8> {
        let ca = std::fs::read(self.directory_ca_file()).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("https://127.0.0.1:{}/roots/0", self.management_port);
        let resp = http.get(&url).send().await.expect("GET pebble /roots/0");
        assert_eq!(resp.status(), 200, "GET {url}");
        resp.bytes().await.unwrap().to_vec()
    }

    /// Stops pebble and challtestsrv: the directory becomes unreachable.
    /// Their logs stay readable.
    pub fn stop(&mut self) {
        self.pebble.take();
        self.challtestsrv.take();
    }

    /// The last lines of pebble's and challtestsrv's output, for failure
    /// messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["pebble.log", "challtestsrv.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!("--- {name} (last {} lines)\n", tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Whether `bin` is an executable file in a directory of `PATH`.
fn on_path(bin: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(bin))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Appends to `dir/name`, shared by stdout and stderr.
fn log_file(dir: &Path, name: &str) -> Stdio {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap();
    Stdio::from(file)
}

/// A free TCP port on 127.0.0.1 (free when asked; nothing holds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port free for both TCP and UDP on 127.0.0.1 (the DNS server binds
/// both).
fn free_tcp_and_udp_port() -> u16 {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP on 127.0.0.1");
}

/// Pebble's own HTTPS certificate (directory and management interface):
/// a CA (`directory-ca.pem`) and a certificate for 127.0.0.1 and
/// localhost it issued (`pebble-cert.pem`, `pebble-key.pem`).
fn write_directory_tls(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ACME test directory CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "pebble");
    // ECDSA P-256 in PKCS#8, which Go's tls.LoadX509KeyPair reads.
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    std::fs::write(dir.join("directory-ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-cert.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble-key.pem"), leaf_key.serialize_pem()).unwrap();
}
