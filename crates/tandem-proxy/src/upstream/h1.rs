//! The HTTP/1.1 wire for engine legs, pure (no IO): request heads written straight into one
//! buffer, response heads parsed with `httparse`, and a body decoder that hands out the body as
//! `Bytes` slices of the read buffer itself.
//!
//! Why not a general client: a relay reads a token stream, and a general client's body channel
//! hands the stream over one chunk at a time, through a connection task of its own. Decoding in
//! the reading task instead means that everything one socket read brought in is relayed at
//! once (one client write per read, not per token), with no task, channel or second buffer per
//! connection.

use axum::http::{HeaderValue, StatusCode};
use bytes::{Buf, Bytes, BytesMut};

/// The most a response head may take; vLLM's are a few hundred bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("invalid response head: {0}")]
    Head(&'static str),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("invalid chunked body: {0}")]
    Chunk(&'static str),
}

/// A request head and body, ready to write in one go.
#[derive(Debug)]
pub struct Request {
    pub(crate) head: Vec<u8>,
    pub(crate) body: Bytes,
}

/// Start a request head; finish it with [`HeadBuilder::finish`].
pub struct HeadBuilder {
    buf: Vec<u8>,
}

impl HeadBuilder {
    pub fn new(method: &str, path: &str, host: &str) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(method.as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(path.as_bytes());
        buf.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        buf.extend_from_slice(host.as_bytes());
        buf.extend_from_slice(b"\r\n");
        HeadBuilder { buf }
    }

    /// A header line. Values come from `HeaderValue`s or validated ids; a CR or LF is dropped
    /// rather than let through, so no value can add a line.
    pub fn header(mut self, name: &str, value: &[u8]) -> Self {
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf
            .extend(value.iter().copied().filter(|b| *b != b'\r' && *b != b'\n'));
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    pub fn finish(mut self, body: Bytes) -> Request {
        if !body.is_empty() || self.buf.starts_with(b"POST") {
            let n = itoa_buf(body.len());
            self = self.header("content-length", n.as_bytes());
        }
        self.buf.extend_from_slice(b"\r\n");
        Request {
            head: self.buf,
            body,
        }
    }
}

struct Digits {
    b: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.b[self.start..]
    }
}

fn itoa_buf(mut n: usize) -> Digits {
    let mut b = [0u8; 20];
    let mut i = b.len();
    loop {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Digits { b, start: i }
}

/// What a response head says.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Framing,
    /// The connection may carry another request after this body (no `Connection: close`).
    pub keep_alive: bool,
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the engine closes the connection.
    Close,
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Parse a response head at the start of `buf`, consuming it. `Ok(None)`: not complete yet.
/// Informational (1xx) heads are skipped.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ProtoError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut headers);
        let n = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(ProtoError::HeadTooLong)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ProtoError::Head("too many headers"))
            }
            Err(_) => return Err(ProtoError::Head("unparsable")),
        };
        let code = r.code.ok_or(ProtoError::Head("no status"))?;
        let status = StatusCode::from_u16(code).map_err(|_| ProtoError::Head("bad status"))?;
        let mut content_type = None;
        let mut length = None;
        let mut chunked = false;
        let mut keep_alive = r.version == Some(1);
        for h in r.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-type") {
                content_type = HeaderValue::from_bytes(h.value).ok();
            } else if name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(ProtoError::Head("bad content-length"))?;
                if length.is_some_and(|l| l != v) {
                    return Err(ProtoError::Head("conflicting content-length"));
                }
                length = Some(v);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // Only `chunked` is sent by the engines; it must be the last coding.
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if !chunked {
                    return Err(ProtoError::Head("unsupported transfer-encoding"));
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for t in h.value.split(|b| *b == b',') {
                    let t = t.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
        }
        buf.advance(n);
        if status.is_informational() {
            continue;
        }
        let body = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Done
        } else if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            match length {
                Some(0) => Framing::Done,
                Some(n) => Framing::Length(n),
                None => {
                    keep_alive = false;
                    Framing::Close
                }
            }
        };
        return Ok(Some(Head {
            status,
            content_type,
            body,
            keep_alive,
        }));
    }
}

/// One step of body decoding over what is buffered.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes: a slice of the read buffer, no copy.
    Data(Bytes),
    /// Nothing more without reading.
    NeedMore,
    /// The body is complete.
    End,
}

/// Decode the next piece of body from `buf`. At the connection's end of input, [`at_eof`] says
/// whether that is a clean end.
pub fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Step, ProtoError> {
    loop {
        match framing {
            Framing::Done => return Ok(Step::End),
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                return Ok(Step::Data(buf.split().freeze()));
            }
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                let data = buf.split_to(n as usize).freeze();
                if *left == 0 {
                    *framing = Framing::Done;
                }
                return Ok(Step::Data(data));
            }
            Framing::Chunked(c) => match *c {
                Chunk::Size => {
                    let Some(len) = line_len(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    let line = &buf[..len];
                    let hex = line
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or(b"")
                        .trim_ascii();
                    let size = parse_hex(hex).ok_or(ProtoError::Chunk("bad chunk size"))?;
                    buf.advance(len + 2);
                    *c = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *c = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                    return Ok(Step::Data(data));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ProtoError::Chunk("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    *c = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(len) = line_len(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(len + 2);
                    if len == 0 {
                        *framing = Framing::Done;
                    }
                }
            },
        }
    }
}

/// Whether the engine closing the connection here ends the body cleanly.
pub fn at_eof(framing: &mut Framing) -> bool {
    match framing {
        Framing::Close | Framing::Done => {
            *framing = Framing::Done;
            true
        }
        _ => false,
    }
}

/// The length of the CRLF-terminated line at the start of `buf`, without its CRLF; `None`
/// when incomplete. (A plain byte search: a substring searcher costs more to build than these
/// few bytes take to scan.)
fn line_len(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    match memchr::memchr(b'\n', buf) {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(ProtoError::Chunk("a line ends without CR")),
        None if buf.len() > MAX_LINE => Err(ProtoError::Chunk("line too long")),
        None => Ok(None),
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 15 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(16)?;
        Some(acc * 16 + d as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        let mut b = BytesMut::from(text);
        parse_head(&mut b).expect("valid").expect("complete")
    }

    #[test]
    fn request_heads_are_one_buffer_with_a_length() {
        let r = HeadBuilder::new("POST", "/v1/completions", "e:8000")
            .header("x-request-id", b"a\r\nevil: 1")
            .finish(Bytes::from_static(b"{}"));
        assert_eq!(
            r.head,
            b"POST /v1/completions HTTP/1.1\r\nhost: e:8000\r\nx-request-id: aevil: 1\r\ncontent-length: 2\r\n\r\n"
        );
        let g = HeadBuilder::new("GET", "/health", "e:8000").finish(Bytes::new());
        assert_eq!(g.head, b"GET /health HTTP/1.1\r\nhost: e:8000\r\n\r\n");
        assert_eq!(itoa_buf(0).as_bytes(), b"0");
        assert_eq!(itoa_buf(1234567).as_bytes(), b"1234567");
    }

    #[test]
    fn heads_give_status_type_framing_and_keep_alive() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.content_type.unwrap(), "text/event-stream");
        assert_eq!(h.body, Framing::Chunked(Chunk::Size));
        assert!(h.keep_alive);
        let h = head(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\nconnection: close\r\n\r\n",
        );
        assert_eq!(h.body, Framing::Length(3));
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.body, Framing::Close);
        assert!(!h.keep_alive, "a body ended by close cannot be followed");
        let h = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.status, StatusCode::NO_CONTENT);
        assert_eq!(h.body, Framing::Done);
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-le");
        assert!(parse_head(&mut partial).unwrap().is_none());
        let mut bad =
            BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n");
        assert!(parse_head(&mut bad).is_err());
        let mut gz = BytesMut::from("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert!(parse_head(&mut gz).is_err());
    }

    /// Decode everything, feeding `wire` in pieces of `step` bytes.
    fn decode_all(mut framing: Framing, wire: &[u8], step: usize) -> (Vec<u8>, bool, usize) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pieces = 0;
        for part in wire.chunks(step) {
            buf.extend_from_slice(part);
            loop {
                match decode(&mut framing, &mut buf).expect("valid") {
                    Step::Data(d) => {
                        out.extend_from_slice(&d);
                        pieces += 1;
                    }
                    Step::NeedMore => break,
                    Step::End => return (out, true, pieces),
                }
            }
        }
        (out, at_eof(&mut framing), pieces)
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let wire = b"6\r\ndata: \r\n1;ext=1\r\nx\r\n0\r\ntrailer: y\r\n\r\n";
        for step in 1..wire.len() {
            let (out, done, _) = decode_all(Framing::Chunked(Chunk::Size), wire, step);
            assert_eq!(out, b"data: x", "step {step}");
            assert!(done);
        }
        // All in one read: one slice per chunk, nothing copied.
        let (_, _, pieces) = decode_all(Framing::Chunked(Chunk::Size), wire, wire.len());
        assert_eq!(pieces, 2);
        let (out, done, _) = decode_all(Framing::Length(3), b"abcdef", 2);
        assert_eq!((out.as_slice(), done), (&b"abc"[..], true));
        let (out, done, _) = decode_all(Framing::Close, b"abc", 2);
        assert_eq!((out.as_slice(), done), (&b"abc"[..], true));
        let (_, done, _) = decode_all(Framing::Chunked(Chunk::Size), b"5\r\nab", 10);
        assert!(!done, "a chunked body cut short is not complete");
        let mut f = Framing::Chunked(Chunk::Size);
        assert!(decode(&mut f, &mut BytesMut::from("zz\r\n")).is_err());
        let (mut f, mut b) = (Framing::Chunked(Chunk::Size), BytesMut::from("1\r\nabc"));
        assert_eq!(
            decode(&mut f, &mut b),
            Ok(Step::Data(Bytes::from_static(b"a")))
        );
        assert!(decode(&mut f, &mut b).is_err(), "no CRLF after the chunk");
    }
}
