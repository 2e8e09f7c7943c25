//! A tonic test service covering every gRPC call shape.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("relaytest.echo");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// Message size limit of the test service and clients (above gRPC's 4 MiB
/// default, for the large-message tests).
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;

#[derive(Default)]
pub struct EchoService;

fn fail(req: &EchoRequest) -> Result<(), Status> {
    if req.fail_with != 0 {
        return Err(Status::new(
            tonic::Code::from_i32(req.fail_with),
            format!("failed as asked: {}", req.message),
        ));
    }
    Ok(())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = req.into_inner();
        fail(&req)?;
        Ok(Response::new(EchoReply {
            message: req.message,
            payload: req.payload,
            seq: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    /// `count` replies, then the error of `fail_with` (if any) in the
    /// trailers, after the replies.
    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        let replies = (0..req.count).map({
            let req = req.clone();
            move |seq| {
                Ok(EchoReply {
                    message: format!("{} {seq}", req.message),
                    payload: req.payload.clone(),
                    seq,
                })
            }
        });
        let tail = fail(&req).err().map(Err);
        Ok(Response::new(Box::pin(futures::stream::iter(
            replies.chain(tail),
        ))))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut stream = req.into_inner();
        let mut messages = Vec::new();
        let mut payload = Vec::new();
        let mut n = 0;
        while let Some(r) = stream.next().await {
            let r = r?;
            fail(&r)?;
            messages.push(r.message);
            payload.extend_from_slice(&r.payload);
            n += 1;
        }
        Ok(Response::new(EchoReply {
            message: messages.join(","),
            payload,
            seq: n,
        }))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let stream = req.into_inner();
        let out = stream.enumerate().map(|(i, r)| {
            let r = r?;
            fail(&r)?;
            Ok(EchoReply {
                message: r.message,
                payload: r.payload,
                seq: i as u32,
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Starts the service on 127.0.0.1 (h2c); returns its address.
pub async fn start() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = EchoServer::new(EchoService)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, task)
}
