//! The gRPC server's connections, each with a switch that cuts it.
//!
//! The `die_after_tokens` fault must look to a gRPC client as an engine death does: the HTTP/2
//! connection goes away mid-stream and the call fails with a transport error, not with a clean
//! status. tonic gives a handler no way to drop its connection, so every accepted socket is
//! wrapped in [`CutIo`], whose switch travels to the handlers as the connection info tonic puts
//! in each request's extensions ([`ConnInfo`]). Once cut, every read and write fails, and hyper
//! tears the connection down with every call on it (a dead engine takes them all).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

/// Cuts one connection.
#[derive(Debug, Default)]
pub(crate) struct CutSwitch {
    cut: AtomicBool,
    /// The connection task, parked on a read, must wake up to see the cut.
    waker: AtomicWaker,
}

impl CutSwitch {
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// What a handler finds in its request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) switch: Arc<CutSwitch>,
}

/// An accepted socket that fails every IO once its switch is cut.
#[derive(Debug)]
pub(crate) struct CutIo {
    inner: TcpStream,
    switch: Arc<CutSwitch>,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "simulated engine death")
}

impl AsyncRead for CutIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Register before checking, so a cut between the two still wakes this task.
        self.switch.waker.register(cx.waker());
        if self.switch.is_cut() {
            return Poll::Ready(Err(gone()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.switch.is_cut() {
            return Poll::Ready(Err(gone()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.switch.is_cut() {
            return Poll::Ready(Err(gone()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.switch.is_cut() {
            return Poll::Ready(Err(gone()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for CutIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            switch: self.switch.clone(),
        }
    }
}

/// Accepted connections, each wrapped. Accept errors (e.g. out of file descriptors) are passed
/// on; tonic logs them and keeps accepting.
pub(crate) fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<CutIo>> {
    futures::stream::unfold(listener, |listener| async move {
        let item = listener.accept().await.map(|(tcp, _)| {
            // Token chunks are small writes; without this Nagle and the client's delayed ACK
            // hold some back (tonic's own `tcp_nodelay` does not apply to a custom incoming).
            let _ = tcp.set_nodelay(true);
            CutIo {
                inner: tcp,
                switch: Arc::new(CutSwitch::default()),
            }
        });
        Some((item, listener))
    })
}
