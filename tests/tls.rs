//! The TLS listener: TLS 1.2 and 1.3 with ALPN, and bad or idle
//! connections that do not disturb anyone else.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Relay, bounded};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn handshake(
    relay: &Relay,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[&[u8]],
) -> Option<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in http_relay::tls::load_certs(&common::certs().ca_cert).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(http_relay::tls::provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    // A request over it in the negotiated protocol, to show the session
    // works.
    if alpn.as_deref() == Some(b"h2") {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("https://localhost/healthz")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    } else {
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("ok"), "{text}");
    }
    alpn
}

#[tokio::test]
async fn tls12_and_tls13_with_alpn() {
    let relay = Relay::start(|_| {}).await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        assert_eq!(
            bounded(handshake(&relay, version, &[b"h2", b"http/1.1"]))
                .await
                .as_deref(),
            Some(&b"h2"[..])
        );
        assert_eq!(
            bounded(handshake(&relay, version, &[b"http/1.1"]))
                .await
                .as_deref(),
            Some(&b"http/1.1"[..])
        );
        assert_eq!(bounded(handshake(&relay, version, &[])).await, None);
    }
}

#[tokio::test]
async fn garbage_and_idle_connections_do_not_block_others() {
    let relay = Relay::start(|_| {}).await;
    // Cleartext HTTP on the TLS port, and random bytes: the connection is
    // closed; nothing else happens.
    for junk in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        let _ = bounded(tcp.read_to_end(&mut buf)).await;
    }
    // Idle connections that never start a handshake.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        relay.http().get(format!("{}/healthz", relay.url)).send(),
    )
    .await
    .expect("served despite idle connections")
    .unwrap();
    assert_eq!(resp.status(), 200);
}
