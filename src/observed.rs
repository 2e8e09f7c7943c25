//! A connection whose reads and writes are reported as they happen: the
//! liveness and stall watchdogs of both ends judge a peer by whether bytes
//! come from it and whether it takes the bytes sent to it.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a watchdog learns from an [`Observed`] connection.
pub trait Observer {
    /// A read brought bytes.
    fn read(&mut self) {}
    /// A write had to wait for room (`Pending`), or ended (`Ready`).
    fn wrote(&mut self, _polled: &Poll<std::io::Result<usize>>) {}
    /// A flush had to wait for room (`true`), or ended.
    fn flushed(&mut self, _waited: bool) {}
}

/// `io`, reporting to `observer`; everything else passes through.
pub struct Observed<T, O> {
    io: T,
    observer: O,
}

impl<T, O> Observed<T, O> {
    pub fn new(io: T, observer: O) -> Self {
        Self { io, observer }
    }
}

impl<T: AsyncRead + Unpin, O: Observer + Unpin> AsyncRead for Observed<T, O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.observer.read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, O: Observer + Unpin> AsyncWrite for Observed<T, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.observer.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.observer.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.observer.flushed(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
