//! gRPC through the relay with a real tonic service and client: every call
//! shape, large messages, and error statuses (trailers-only and after
//! replies), over TLS (ALPN h2) and over h2c.

mod common;

use common::grpc::pb::echo_client::EchoClient;
use common::grpc::pb::{EchoReply, EchoRequest};
use common::grpc::{self, MAX_MESSAGE};
use common::{Relay, RelayClient, bounded, client_config};
use futures::StreamExt as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

type Client = EchoClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn name_backend(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut()
        .insert("x-server-name", "grpc-robot".parse().unwrap());
    Ok(req)
}

/// A relay (TLS or h2c), a relay-client with `backend_http2`, the tonic
/// service, and a tonic client that names the backend by header.
async fn setup(tls: bool) -> (Relay, RelayClient, Client, tokio::task::JoinHandle<()>) {
    let (addr, svc) = grpc::start().await;
    let relay = Relay::start(|c| c.tls.enabled = tls).await;
    let mut cfg = client_config(&relay, "grpc-robot", &format!("http://{addr}"));
    cfg.backend_http2 = true;
    let client = RelayClient::start(cfg);
    relay.wait_for_backend("grpc-robot").await;

    let mut endpoint = Channel::from_shared(relay.url.clone()).unwrap();
    if tls {
        let ca = std::fs::read(&common::certs().ca_cert).unwrap();
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .unwrap();
    }
    let channel = endpoint.connect().await.unwrap();
    let grpc = EchoClient::with_interceptor(channel, name_backend as fn(_) -> _)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    (relay, client, grpc, svc)
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

async fn all_call_shapes(tls: bool) {
    let (_relay, _client, mut grpc, _svc) = setup(tls).await;

    let reply = bounded(grpc.unary(req("hi"))).await.unwrap().into_inner();
    assert_eq!(reply.message, "hi");

    let mut stream = bounded(grpc.server_stream(EchoRequest {
        count: 5,
        ..req("s")
    }))
    .await
    .unwrap()
    .into_inner();
    let mut seqs = Vec::new();
    while let Some(r) = bounded(stream.next()).await {
        seqs.push(r.unwrap().seq);
    }
    assert_eq!(seqs, [0, 1, 2, 3, 4]);

    let outbound = futures::stream::iter((0..4).map(|i| req(&format!("m{i}"))));
    let reply = bounded(grpc.client_stream(outbound))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.message.as_str(), reply.seq), ("m0,m1,m2,m3", 4));

    // v1 buffers the request body whole, so the client sends its stream
    // and then reads the replies.
    let outbound = futures::stream::iter((0..6).map(|i| req(&format!("b{i}"))));
    let mut replies = bounded(grpc.bidi_stream(outbound))
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<EchoReply> = Vec::new();
    while let Some(r) = bounded(replies.next()).await {
        got.push(r.unwrap());
    }
    let msgs: Vec<_> = got.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(msgs, ["b0", "b1", "b2", "b3", "b4", "b5"]);
}

#[tokio::test]
async fn call_shapes_over_tls() {
    all_call_shapes(true).await;
}

#[tokio::test]
async fn call_shapes_over_h2c() {
    all_call_shapes(false).await;
}

#[tokio::test]
async fn large_messages_both_ways() {
    let (_relay, _client, mut grpc, _svc) = setup(true).await;
    let payload = common::pattern(6 * 1024 * 1024, 11);
    let reply = bounded(grpc.unary(EchoRequest {
        payload: payload.clone(),
        ..req("big")
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(reply.payload.len(), payload.len());
    assert!(reply.payload == payload);

    let mut stream = bounded(grpc.server_stream(EchoRequest {
        count: 3,
        payload: payload.clone(),
        ..req("big")
    }))
    .await
    .unwrap()
    .into_inner();
    let mut n = 0;
    while let Some(r) = bounded(stream.next()).await {
        assert!(r.unwrap().payload == payload);
        n += 1;
    }
    assert_eq!(n, 3);
}

#[tokio::test]
async fn error_statuses_arrive_with_code_and_message() {
    for tls in [true, false] {
        let (_relay, _client, mut grpc, _svc) = setup(tls).await;
        // Trailers-only replies: the status is in the response headers.
        for code in [
            tonic::Code::NotFound,
            tonic::Code::PermissionDenied,
            tonic::Code::Internal,
        ] {
            let err = bounded(grpc.unary(EchoRequest {
                fail_with: code as i32,
                ..req("x")
            }))
            .await
            .unwrap_err();
            assert_eq!(err.code(), code, "tls={tls}");
            assert_eq!(err.message(), "failed as asked: x");
        }
        // An error after two replies travels in the trailers.
        let mut stream = bounded(grpc.server_stream(EchoRequest {
            count: 2,
            fail_with: tonic::Code::Aborted as i32,
            ..req("late")
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(bounded(stream.next()).await.unwrap().is_ok());
        assert!(bounded(stream.next()).await.unwrap().is_ok());
        let err = bounded(stream.next()).await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert_eq!(err.message(), "failed as asked: late");
    }
}
