//! HTTP/1.1 client for one engine, with a pool of kept-alive connections that can be warmed
//! ahead of use.
//!
//! Tandem owns its connections instead of using a general-purpose client for three reasons:
//! the decode leg must fire the instant the prefill's KV params arrive, so a connection to the
//! chosen decode engine is made ready while the prefill runs; aborting a leg must close its
//! TCP connection at once, because that is how a vLLM engine learns to abort the request and free
//! its KV blocks (a [`Conn`] dropped without [`Conn::release`] closes its socket); and the relay
//! reads the body in its own task, straight off the socket (`h1.rs`), so everything one read
//! brings in goes to the client in one write, with no connection task or body channel per
//! stream.
//!
//! An `https://` engine's connections are TLS (`tls.rs`), set up within the connect timeout;
//! the HTTP/1.1 connection on top is the same either way.

use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::tls::EngineTls;
use crate::trace::Outgoing;

pub mod h1;
#[cfg(test)]
mod tests;

use h1::{Framing, HeadBuilder, ProtoError};
pub use h1::{Head, Request, Step};

/// Idle connections kept per engine; more than this are closed on release.
const MAX_IDLE: usize = 512;
/// Bytes asked of the socket per read, at first and at most. A held stream mostly reads one
/// event of a few hundred bytes at a time, so it starts small (its buffer shares pages with
/// other streams'); a read that fills the space doubles it for the next, up to the most.
const READ_FIRST: usize = 1024;
const READ_MOST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Send {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} closed the connection before answering")]
    Closed { addr: String },
    #[error("reading from {addr} failed: {source}")]
    Read {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} closed the connection mid-body")]
    Truncated { addr: String },
    #[error("{addr} broke HTTP/1.1: {source}")]
    Protocol { addr: String, source: ProtoError },
}

/// One engine's base address and its idle connections.
#[derive(Debug)]
pub struct Upstream {
    /// `host:port`, for TCP connect and the `Host` header.
    authority: String,
    connect_timeout: Duration,
    /// How an `https://` engine is reached (`None` for `http://`).
    tls: Option<Tls>,
    idle: Mutex<Vec<Io>>,
}

/// An `https://` engine's connector and server name, or why there is none.
#[derive(Clone)]
enum Tls {
    Ready(TlsConnector, ServerName<'static>),
    Unusable(&'static str),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tls::Ready(_, name) => write!(f, "Tls({name:?})"),
            Tls::Unusable(why) => write!(f, "Tls(unusable: {why})"),
        }
    }
}

/// The socket under a connection.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Io::Plain(_) => "Io::Plain",
            Io::Tls(_) => "Io::Tls",
        })
    }
}

impl Io {
    /// Head and body in as few writes as the socket takes (one, vectored, for plain TCP).
    async fn write_request(&mut self, r: &Request) -> std::io::Result<()> {
        match self {
            Io::Plain(s) => {
                let (mut head, mut body): (&[u8], &[u8]) = (&r.head, &r.body);
                while !head.is_empty() || !body.is_empty() {
                    let n = s
                        .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
                        .await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::WriteZero.into());
                    }
                    let h = n.min(head.len());
                    head = &head[h..];
                    body = &body[n - h..];
                }
                Ok(())
            }
            // rustls gathers both into its records; one flush sends them.
            Io::Tls(s) => {
                s.write_all(&r.head).await?;
                s.write_all(&r.body).await?;
                s.flush().await
            }
        }
    }

    async fn read(&mut self, buf: &mut BytesMut, want: usize) -> std::io::Result<usize> {
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        match self {
            Io::Plain(s) => s.read_buf(buf).await,
            Io::Tls(s) => s.read_buf(buf).await,
        }
    }

    /// An idle connection the engine has closed is not reused, nor a plain one it sent
    /// anything on. The socket is peeked, not read, without waiting. Under TLS, bytes on an
    /// idle connection are normal (a TLS 1.3 server sends its session tickets after the
    /// handshake, and rustls reads them with the next response), so only the close counts.
    fn is_stale(&self) -> bool {
        let (tcp, tls) = match self {
            Io::Plain(s) => (s, false),
            Io::Tls(s) => (s.get_ref().0, true),
        };
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match tcp.poll_peek(&mut cx, &mut buf) {
            std::task::Poll::Pending => false,
            std::task::Poll::Ready(Ok(0)) | std::task::Poll::Ready(Err(_)) => true,
            std::task::Poll::Ready(Ok(_)) => !tls,
        }
    }
}

/// A connection checked out for one request, and the response being read on it.
#[derive(Debug)]
pub struct Conn {
    /// `None` only after `release`.
    io: Option<Io>,
    /// Read but not yet handed out: the rest of the response head, then of the body.
    buf: BytesMut,
    /// Where the current response's body is.
    framing: Framing,
    keep_alive: bool,
    /// How much the next read asks for (see [`READ_FIRST`]).
    read_size: usize,
    upstream: Arc<Upstream>,
}

impl Upstream {
    /// `base` is `http[s]://host:port` (validated by the config); `https://` is TLS from `tls`.
    pub fn new(base: &str, connect_timeout: Duration, tls: &EngineTls) -> Arc<Self> {
        let authority = base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let tls =
            base.starts_with("https://")
                .then(|| match tls.connector(crate::tls::host_of(base)) {
                    Some((c, name)) => Tls::Ready(c, name),
                    None => Tls::Unusable("no TLS client configuration for this host"),
                });
        Arc::new(Upstream {
            authority,
            connect_timeout,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A ready connection: an idle one if any is still open, else a new one.
    pub async fn acquire(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        loop {
            let idle = self.idle.lock().expect("idle pool lock").pop();
            let Some(io) = idle else { break };
            if !io.is_stale() {
                return Ok(self.conn(io));
            }
        }
        self.connect().await
    }

    fn conn(self: &Arc<Self>, io: Io) -> Conn {
        Conn {
            io: Some(io),
            buf: BytesMut::new(),
            framing: Framing::Done,
            keep_alive: false,
            read_size: READ_FIRST,
            upstream: self.clone(),
        }
    }

    /// A new connection, never from the pool.
    pub async fn connect(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        let addr = self.authority.clone();
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(&addr)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr }),
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        // Tokens are small writes; Nagle would hold them back.
        let _ = stream.set_nodelay(true);
        let io = match &self.tls {
            None => Io::Plain(stream),
            Some(Tls::Unusable(why)) => {
                return Err(UpstreamError::Tls {
                    addr,
                    source: std::io::Error::other(*why),
                })
            }
            Some(Tls::Ready(connector, name)) => {
                let tls = connector.connect(name.clone(), stream);
                match tokio::time::timeout_at(deadline, tls).await {
                    Err(_) => return Err(UpstreamError::ConnectTimeout { addr }),
                    Ok(Err(source)) => return Err(UpstreamError::Tls { addr, source }),
                    Ok(Ok(s)) => Io::Tls(Box::new(s)),
                }
            }
        };
        Ok(self.conn(io))
    }

    /// Close every idle connection (an engine left the pool).
    pub fn close_idle(&self) {
        self.idle.lock().expect("idle pool lock").clear();
    }
}

impl Conn {
    /// Build a POST with a JSON body for this engine.
    /// Every leg carries the request id and the trace context (Tandem's span as the parent).
    pub fn post_json(
        &self,
        path: &str,
        body: Bytes,
        request_id: &str,
        trace: &Outgoing,
    ) -> Request {
        let mut b = HeadBuilder::new("POST", path, &self.upstream.authority)
            .header("content-type", b"application/json")
            .header("x-request-id", request_id.as_bytes())
            .header("traceparent", trace.traceparent.as_bytes());
        if let Some(ts) = &trace.tracestate {
            b = b.header("tracestate", ts.as_bytes());
        }
        b.finish(body)
    }

    /// Build a GET for this engine.
    pub fn get(&self, path: &str) -> Request {
        HeadBuilder::new("GET", path, &self.upstream.authority).finish(Bytes::new())
    }

    fn addr(&self) -> String {
        self.upstream.authority.clone()
    }

    /// Send a request and read the response head; the body is then read with [`Conn::data`].
    /// A connection the engine closed while it sat idle (in the pool, or warmed while a prefill
    /// ran; uvicorn's keep-alive timeout is 5 s) is found out before the request is written;
    /// the request then goes out on a fresh connection. A request that may have reached the
    /// engine is never sent twice.
    pub async fn send(&mut self, req: Request) -> Result<Head, UpstreamError> {
        // Checked on every connection, not only pooled ones: one warmed while a prefill ran may
        // have sat idle longer than the engine's keep-alive. (One non-blocking read call.)
        let stale = self.io.as_ref().is_none_or(Io::is_stale);
        if stale {
            *self = self.upstream.connect().await?;
        }
        let io = self
            .io
            .as_mut()
            .expect("a checked-out connection holds its socket");
        if let Err(source) = io.write_request(&req).await {
            return Err(UpstreamError::Send {
                addr: self.addr(),
                source,
            });
        }
        self.buf.clear();
        loop {
            match h1::parse_head(&mut self.buf) {
                Ok(Some(head)) => {
                    self.framing = head.body;
                    self.keep_alive = head.keep_alive;
                    return Ok(head);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(UpstreamError::Protocol {
                        addr: self.addr(),
                        source,
                    })
                }
            }
            match self.read().await {
                Ok(0) => return Err(UpstreamError::Closed { addr: self.addr() }),
                Ok(_) => {}
                Err(source) => {
                    return Err(UpstreamError::Read {
                        addr: self.addr(),
                        source,
                    })
                }
            }
        }
    }

    async fn read(&mut self) -> std::io::Result<usize> {
        let io = self
            .io
            .as_mut()
            .expect("a checked-out connection holds its socket");
        let room = self.buf.capacity() - self.buf.len();
        let n = io.read(&mut self.buf, self.read_size).await?;
        if n >= room.max(self.read_size / 2) {
            self.read_size = (self.read_size * 2).min(READ_MOST);
        }
        Ok(n)
    }

    /// The next piece of body already read, without waiting: [`Step::NeedMore`] when the
    /// socket must be read first.
    pub fn buffered(&mut self) -> Result<Step, UpstreamError> {
        h1::decode(&mut self.framing, &mut self.buf).map_err(|source| UpstreamError::Protocol {
            addr: self.addr(),
            source,
        })
    }

    /// The next piece of body (a slice of what one read brought in), reading when nothing is
    /// buffered; `None` at the body's end.
    pub async fn data(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            match self.buffered()? {
                Step::Data(d) => return Ok(Some(d)),
                Step::End => return Ok(None),
                Step::NeedMore => {}
            }
            match self.read().await {
                Ok(0) if h1::at_eof(&mut self.framing) => return Ok(None),
                Ok(0) => return Err(UpstreamError::Truncated { addr: self.addr() }),
                Ok(_) => {}
                Err(source) => {
                    return Err(UpstreamError::Read {
                        addr: self.addr(),
                        source,
                    })
                }
            }
        }
    }

    /// The whole body.
    pub async fn collect(&mut self) -> Result<Bytes, UpstreamError> {
        let Some(first) = self.data().await? else {
            return Ok(Bytes::new());
        };
        let Some(second) = self.data().await? else {
            return Ok(first);
        };
        let mut all = BytesMut::from(&first[..]);
        all.extend_from_slice(&second);
        while let Some(d) = self.data().await? {
            all.extend_from_slice(&d);
        }
        Ok(all.freeze())
    }

    /// The response's body has been read to its end.
    pub fn body_done(&self) -> bool {
        self.framing == Framing::Done
    }

    /// Return a connection whose last response was read to the end to the idle pool; any
    /// other is closed.
    pub fn release(mut self) {
        let Some(io) = self.io.take() else { return };
        if !(self.body_done() && self.keep_alive && self.buf.is_empty()) {
            return;
        }
        let mut idle = self.upstream.idle.lock().expect("idle pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(io);
        }
    }
}
