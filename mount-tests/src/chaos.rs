//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of a local server (moto), for fault
//! campaigns against a real S3 protocol stack.
//!
//! Unlike [`FaultProxy`](crate::FaultProxy), which relays raw bytes, this proxy understands
//! HTTP/1.1 framing: it reads each request whole (request line, headers, a body framed by
//! `Content-Length` or `Transfer-Encoding: chunked`), decides one [`Fault`] for it from
//! configured weights with a seeded xorshift generator, and then forwards, answers, delays,
//! breaks or drops it. A client may send several requests on one connection (keep-alive);
//! every request is forwarded on a fresh upstream connection, so a stale upstream connection can
//! never turn into a fault nobody chose. Responses framed by `Content-Length`, chunked, or ended
//! by the server closing are all relayed byte for byte.
//!
//! Every thread ends when either side closes; dropping the [`ChaosProxy`] stops the listener and
//! cuts every open connection. Counters ([`ChaosProxy::counts`]) say what was injected, and the
//! event log ([`ChaosProxy::events`]) says which request met which fault, for reproductions.

use crate::S3Server;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------------------
// Faults and configuration
// ---------------------------------------------------------------------------------------------------------

/// What the proxy does to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Forward the request, relay the response.
    Pass,
    /// Close the client connection (with a TCP reset) right after reading the request; nothing
    /// reaches the server.
    Reset,
    /// Read the request, never answer; the connection stays open until the client closes it.
    Hang,
    /// Answer 500 InternalError (S3 XML body) without forwarding.
    Error500,
    /// Answer 503 ServiceUnavailable (S3 XML body) without forwarding.
    Error503,
    /// Answer 429 SlowDown (S3 XML body) without forwarding.
    SlowDown429,
    /// Forward the request (it takes effect), then close the client connection without relaying
    /// the response: the ambiguous case.
    LostResponse,
    /// Relay the response head and half of the body, then close. A response without a body is
    /// cut half-way through its head.
    ResetMidResponse,
    /// Relay the response, the body trickled in small pieces with delays.
    SlowBody,
    /// Wait a while, then forward and relay normally.
    Latency,
}

impl Fault {
    /// Every fault, `Pass` first.
    pub const ALL: [Fault; 10] = [
        Fault::Pass,
        Fault::Reset,
        Fault::Hang,
        Fault::Error500,
        Fault::Error503,
        Fault::SlowDown429,
        Fault::LostResponse,
        Fault::ResetMidResponse,
        Fault::SlowBody,
        Fault::Latency,
    ];

    /// A short stable name (used as the key of [`ChaosProxy::counts`] and in reports).
    pub fn name(self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Reset => "reset",
            Fault::Hang => "hang",
            Fault::Error500 => "http500",
            Fault::Error503 => "http503",
            Fault::SlowDown429 => "http429",
            Fault::LostResponse => "lost_response",
            Fault::ResetMidResponse => "reset_mid_response",
            Fault::SlowBody => "slow_body",
            Fault::Latency => "latency",
        }
    }

    /// Whether the request reaches the server under this fault.
    pub fn forwards(self) -> bool {
        matches!(
            self,
            Fault::Pass
                | Fault::LostResponse
                | Fault::ResetMidResponse
                | Fault::SlowBody
                | Fault::Latency
        )
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Settings of a [`ChaosProxy`].
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// Seed of the xorshift generator that picks faults (0 is replaced by a fixed constant).
    pub seed: u64,
    /// Weight of each fault in per-mille of requests; what is left of 1000 passes. A weight for
    /// `Pass` is ignored. The sum of the others must not exceed 1000.
    pub weights: Vec<(Fault, u32)>,
    /// [`Fault::Latency`]: the delay, drawn uniformly from this range.
    pub latency: (Duration, Duration),
    /// [`Fault::SlowBody`]: bytes written at a time.
    pub slow_piece: usize,
    /// [`Fault::SlowBody`]: pause after each piece.
    pub slow_delay: Duration,
    /// [`Fault::Hang`]: the connection is closed after this long even if the client never gives
    /// up (a bound, not a behaviour anyone should rely on).
    pub hang_max: Duration,
    /// How long the proxy waits for the upstream server's answer before it gives the client a 502.
    pub upstream_timeout: Duration,
    /// How long a client connection may sit idle between requests before the proxy closes it.
    pub idle_timeout: Duration,
    /// Events kept in the log (oldest dropped first).
    pub max_events: usize,
    /// Keep client connections open across requests even when the upstream server closes
    /// every connection (moto answers `Connection: close` to everything; real S3 keeps
    /// connections alive, so clients reuse pooled connections and faults meet reused ones).
    /// The proxy drops `Connection: close` from relayed response heads whose body is framed
    /// (Content-Length or chunked). Upstream connections are per request either way.
    pub keep_alive: bool,
}

impl Default for ChaosConfig {
    /// The campaign mix: about a third of requests meet a fault, hangs rarer (2%) since each one
    /// costs a client timeout.
    fn default() -> Self {
        ChaosConfig {
            seed: 1,
            weights: vec![
                (Fault::Reset, 50),
                (Fault::Hang, 20),
                (Fault::Error500, 40),
                (Fault::Error503, 40),
                (Fault::SlowDown429, 30),
                (Fault::LostResponse, 50),
                (Fault::ResetMidResponse, 40),
                (Fault::SlowBody, 30),
                (Fault::Latency, 30),
            ],
            latency: (Duration::from_millis(100), Duration::from_millis(1500)),
            slow_piece: 16 * 1024,
            slow_delay: Duration::from_millis(50),
            hang_max: Duration::from_secs(300),
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            max_events: 1_000_000,
            keep_alive: true,
        }
    }
}

impl ChaosConfig {
    /// No faults at all (every request passes).
    pub fn none() -> ChaosConfig {
        ChaosConfig {
            weights: Vec::new(),
            ..ChaosConfig::default()
        }
    }

    /// Only `fault`, for `per_mille` of requests.
    pub fn only(fault: Fault, per_mille: u32) -> ChaosConfig {
        ChaosConfig {
            weights: vec![(fault, per_mille)],
            ..ChaosConfig::default()
        }
    }

    /// Per-mille of requests that meet some fault.
    pub fn fault_per_mille(&self) -> u32 {
        self.weights
            .iter()
            .filter(|(f, _)| *f != Fault::Pass)
            .map(|(_, w)| w)
            .sum()
    }
}

/// A tiny xorshift64* generator: deterministic for a seed, no dependencies.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // Never zero (xorshift would stay at zero); spread small seeds.
        let s = seed ^ 0x9E37_79B9_7F4A_7C15;
        XorShift(if s == 0 { 0x2545_F491_4F6C_DD1D } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n` > 0; the tiny modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks a fault for one request: `r` in `0..1000` against the cumulative weights.
pub fn pick_fault(weights: &[(Fault, u32)], r: u32) -> Fault {
    let mut acc = 0u32;
    for &(f, w) in weights {
        if f == Fault::Pass {
            continue;
        }
        acc += w;
        if r < acc {
            return f;
        }
    }
    Fault::Pass
}

// ---------------------------------------------------------------------------------------------------------
// HTTP/1.1 parsing (generic over BufRead so it is testable without a network)
// ---------------------------------------------------------------------------------------------------------

/// Bound on a request or response head.
const MAX_HEAD: usize = 64 * 1024;
/// Bound on a request or response body the proxy buffers.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// A parsed message head: the start line split in three, and the header fields in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Request: method, target, version. Response: version, status code, reason.
    pub start: [String; 3],
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header `name` contains `token` (case-insensitive), in any of
    /// its occurrences.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `Transfer-Encoding` ends in `chunked`.
    pub fn is_chunked(&self) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(','))
            .last()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
    }

    /// The `Content-Length`, if present. Conflicting values are an error.
    pub fn content_length(&self) -> io::Result<Option<u64>> {
        let mut found: Option<u64> = None;
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("content-length") {
                continue;
            }
            for part in v.split(',') {
                let n: u64 = part
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("bad Content-Length: {v:?}")))?;
                if found.is_some_and(|f| f != n) {
                    return Err(bad(format!("conflicting Content-Length: {v:?}")));
                }
                found = Some(n);
            }
        }
        Ok(found)
    }

    /// The HTTP version of a request (`start[2]`) or response (`start[0]`).
    fn version(&self, is_request: bool) -> &str {
        if is_request {
            &self.start[2]
        } else {
            &self.start[0]
        }
    }

    /// Whether the connection stays open after this message (HTTP/1.1 default keep-alive,
    /// HTTP/1.0 only with `Connection: keep-alive`).
    pub fn keep_alive(&self, is_request: bool) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        if self.version(is_request).eq_ignore_ascii_case("HTTP/1.0") {
            return self.has_token("connection", "keep-alive");
        }
        true
    }

    /// The response status code (responses only).
    pub fn status(&self) -> u16 {
        self.start[1].parse().unwrap_or(0)
    }

    /// Serializes the head (start line, headers, blank line).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.start[0], self.start[1], self.start[2]);
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one line ending in LF (CRLF expected; a bare LF is tolerated) into `out` (raw bytes,
/// terminator included), at most `limit` bytes. Returns the bytes read (0 at EOF).
fn read_line_raw<R: BufRead>(r: &mut R, out: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    let start = out.len();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(out.len() - start);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        out.extend_from_slice(&buf[..take]);
        r.consume(take);
        if out.len() - start > limit {
            return Err(bad("line too long"));
        }
        if done {
            return Ok(out.len() - start);
        }
    }
}

/// Reads a message head (start line, headers, blank line). `Ok(None)` at a clean EOF before the
/// first byte (the peer closed an idle keep-alive connection). Leading empty lines are skipped,
/// as RFC 9112 allows. Returns the parsed head and its raw bytes.
pub fn read_head<R: BufRead>(r: &mut R) -> io::Result<Option<(Head, Vec<u8>)>> {
    let mut raw = Vec::new();
    // Start line (skipping stray CRLFs between messages).
    loop {
        raw.clear();
        let n = read_line_raw(r, &mut raw, MAX_HEAD)?;
        if n == 0 {
            return Ok(None);
        }
        if !raw.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside the start line",
            ));
        }
        if trim_eol(&raw).is_empty() {
            continue;
        }
        break;
    }
    let start_line = String::from_utf8_lossy(trim_eol(&raw)).into_owned();
    let mut parts = start_line.splitn(3, ' ');
    let a = parts.next().unwrap_or_default().to_string();
    let b = parts.next().unwrap_or_default().to_string();
    let c = parts.next().unwrap_or_default().to_string();
    if a.is_empty() || b.is_empty() {
        return Err(bad(format!("malformed start line: {start_line:?}")));
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let before = raw.len();
        let n = read_line_raw(r, &mut raw, MAX_HEAD)?;
        if n == 0 || !raw.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside the headers",
            ));
        }
        if raw.len() > MAX_HEAD {
            return Err(bad("head too long"));
        }
        let line = trim_eol(&raw[before..]);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if text.starts_with(' ') || text.starts_with('\t') {
            // Obsolete line folding: append to the previous field.
            match headers.last_mut() {
                Some((_, v)) => {
                    v.push(' ');
                    v.push_str(text.trim());
                }
                None => return Err(bad("folded line before any header")),
            }
            continue;
        }
        let (k, v) = text
            .split_once(':')
            .ok_or_else(|| bad(format!("header without a colon: {text:?}")))?;
        if k.is_empty() || k.ends_with(' ') || k.ends_with('\t') {
            return Err(bad(format!("malformed header name: {text:?}")));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(Some((
        Head {
            start: [a, b, c],
            headers,
        },
        raw,
    )))
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the server closes the connection (responses only).
    UntilClose,
}

/// Body framing of a request (RFC 9112 §6.3): chunked beats Content-Length; neither means no body.
pub fn request_framing(h: &Head) -> io::Result<Framing> {
    if h.headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
    {
        if h.is_chunked() {
            return Ok(Framing::Chunked);
        }
        return Err(bad("request Transfer-Encoding without chunked last"));
    }
    Ok(match h.content_length()? {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// Body framing of a response to a request with `method` (RFC 9112 §6.3).
pub fn response_framing(method: &str, h: &Head) -> io::Result<Framing> {
    let status = h.status();
    if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304
    {
        return Ok(Framing::None);
    }
    if method.eq_ignore_ascii_case("CONNECT") && (200..300).contains(&status) {
        return Err(bad("CONNECT is not supported"));
    }
    if h.headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Ok(if h.is_chunked() {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    Ok(match h.content_length()? {
        Some(0) => Framing::None,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// Reads a body with `framing`, appending its raw bytes (chunk framing included) to `out`.
pub fn read_body<R: BufRead>(r: &mut R, framing: Framing, out: &mut Vec<u8>) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => {
            if n > MAX_BODY as u64 {
                return Err(bad(format!("body of {n} bytes is too large")));
            }
            let start = out.len();
            out.resize(start + n as usize, 0);
            r.read_exact(&mut out[start..])
        }
        Framing::Chunked => read_chunked_raw(r, out),
        Framing::UntilClose => {
            let start = out.len();
            r.take(MAX_BODY as u64 + 1).read_to_end(out)?;
            if out.len() - start > MAX_BODY {
                return Err(bad("body too large"));
            }
            Ok(())
        }
    }
}

/// Reads a chunked body through its last chunk and trailers, appending the raw bytes.
pub fn read_chunked_raw<R: BufRead>(r: &mut R, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    loop {
        let before = out.len();
        let n = read_line_raw(r, out, 4096)?;
        if n == 0 || !out.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside a chunk size line",
            ));
        }
        let line = String::from_utf8_lossy(trim_eol(&out[before..])).into_owned();
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(hex, 16)
            .map_err(|_| bad(format!("bad chunk size line: {line:?}")))?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let t = out.len();
                let n = read_line_raw(r, out, MAX_HEAD)?;
                if n == 0 || !out.ends_with(b"\n") {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF inside chunked trailers",
                    ));
                }
                if trim_eol(&out[t..]).is_empty() {
                    return Ok(());
                }
            }
        }
        if (out.len() - start) as u64 + size > MAX_BODY as u64 {
            return Err(bad("chunked body too large"));
        }
        let at = out.len();
        out.resize(at + size as usize, 0);
        r.read_exact(&mut out[at..])?;
        let crlf_at = out.len();
        let n = read_line_raw(r, out, 2)?;
        if n == 0 || !trim_eol(&out[crlf_at..]).is_empty() {
            return Err(bad("chunk data not followed by CRLF"));
        }
    }
}

/// Decodes a raw chunked body (as [`read_chunked_raw`] collected it) into its payload.
pub fn dechunk(raw: &[u8]) -> io::Result<Vec<u8>> {
    let mut r = io::Cursor::new(raw);
    let mut out = Vec::new();
    loop {
        let mut line = Vec::new();
        read_line_raw(&mut r, &mut line, 4096)?;
        let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
        let hex = text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| bad(format!("bad chunk size line: {text:?}")))?;
        if size == 0 {
            return Ok(out);
        }
        let at = out.len();
        out.resize(at + size, 0);
        r.read_exact(&mut out[at..])?;
        let mut crlf = Vec::new();
        read_line_raw(&mut r, &mut crlf, 2)?;
    }
}

/// A whole request as read from the client.
#[derive(Clone, Debug)]
pub struct Request {
    pub head: Head,
    /// The head as the client sent it.
    pub raw_head: Vec<u8>,
    /// The body's raw bytes (chunk framing included when chunked).
    pub body: Vec<u8>,
    /// The client asked for `100-continue` (already answered by the proxy).
    pub expect_continue: bool,
}

impl Request {
    pub fn method(&self) -> &str {
        &self.head.start[0]
    }

    pub fn target(&self) -> &str {
        &self.head.start[1]
    }

    /// The head to send upstream: as received, minus `Expect: 100-continue` (answered here).
    pub fn upstream_head(&self) -> Vec<u8> {
        if !self.expect_continue {
            return self.raw_head.clone();
        }
        let mut h = self.head.clone();
        h.headers.retain(|(k, _)| !k.eq_ignore_ascii_case("expect"));
        h.to_bytes()
    }
}

/// Reads one request from a client. `interim` receives `100 Continue` when the client expects
/// it (before the body is read). `Ok(None)` when the client closed an idle connection.
pub fn read_request<R: BufRead, W: Write>(
    r: &mut R,
    interim: &mut W,
) -> io::Result<Option<Request>> {
    let Some((head, raw_head)) = read_head(r)? else {
        return Ok(None);
    };
    let framing = request_framing(&head)?;
    let expect_continue = head
        .header("expect")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    if expect_continue && framing != Framing::None {
        interim.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        interim.flush()?;
    }
    let mut body = Vec::new();
    read_body(r, framing, &mut body)?;
    Ok(Some(Request {
        head,
        raw_head,
        body,
        expect_continue,
    }))
}

/// A whole response as read from the server.
#[derive(Clone, Debug)]
pub struct Response {
    pub head: Head,
    pub raw_head: Vec<u8>,
    pub body: Vec<u8>,
    pub framing: Framing,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status()
    }

    /// Whether the connection may carry another request after this response.
    pub fn keep_alive(&self) -> bool {
        self.framing != Framing::UntilClose && self.head.keep_alive(false)
    }

    /// The head to relay to the client, and whether the client connection stays open after
    /// it. With `force_keep_alive`, an HTTP/1.1 response whose body is framed loses its
    /// `Connection: close` (see [`ChaosConfig::keep_alive`]).
    pub fn client_head(&self, force_keep_alive: bool) -> (Vec<u8>, bool) {
        let can = force_keep_alive
            && self.framing != Framing::UntilClose
            && self.head.start[0].eq_ignore_ascii_case("HTTP/1.1");
        if !can || self.keep_alive() {
            return (self.raw_head.clone(), self.keep_alive());
        }
        let mut h = self.head.clone();
        h.headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("connection"));
        (h.to_bytes(), true)
    }
}

/// Reads the final response to a request with `method` (interim 1xx responses are skipped,
/// except 101, which is refused).
pub fn read_response<R: BufRead>(r: &mut R, method: &str) -> io::Result<Response> {
    loop {
        let Some((head, raw_head)) = read_head(r)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed before answering",
            ));
        };
        let status = head.status();
        if !head.start[0].starts_with("HTTP/") || !(100..600).contains(&status) {
            return Err(bad(format!("malformed status line: {:?}", head.start)));
        }
        if status == 101 {
            return Err(bad("protocol switch is not supported"));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let framing = response_framing(method, &head)?;
        let mut body = Vec::new();
        read_body(r, framing, &mut body)?;
        return Ok(Response {
            head,
            raw_head,
            body,
            framing,
        });
    }
}

/// An S3-style error response (XML body, keep-alive).
pub fn s3_error_response(status: u16, code: &str, message: &str, resource: &str) -> Vec<u8> {
    let reason = match status {
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let resource = resource
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource><RequestId>chaos-proxy</RequestId></Error>"
    );
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: chaos-proxy\r\n",
        body.len()
    );
    if status == 503 || status == 429 {
        out.push_str("Retry-After: 1\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------------------

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct ChaosEvent {
    /// Sequence number of the request (0-based, in the order faults were decided).
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the request was read.
    pub unix_ms: u64,
    /// Client connection number and request number on it.
    pub conn: u64,
    pub nth_on_conn: u64,
    pub method: String,
    pub target: String,
    pub request_bytes: usize,
    pub fault: Fault,
    /// The status of the upstream response, or of the one the proxy made up; 0 if none.
    pub status: u16,
    /// Something went wrong that no fault asked for (upstream unreachable, bad framing).
    pub note: String,
}

impl ChaosEvent {
    /// One line: `seq unix_ms conn/nth METHOD target fault status note`.
    pub fn line(&self) -> String {
        format!(
            "#{} t={} c{}/{} {} {} ({} B) fault={} status={}{}{}",
            self.seq,
            self.unix_ms,
            self.conn,
            self.nth_on_conn,
            self.method,
            self.target,
            self.request_bytes,
            self.fault,
            self.status,
            if self.note.is_empty() { "" } else { " note=" },
            self.note
        )
    }
}

struct Shared {
    upstream: SocketAddr,
    cfg: ChaosConfig,
    enabled: AtomicBool,
    stop: AtomicBool,
    rng: Mutex<XorShift>,
    seq: AtomicU64,
    next_conn: AtomicU64,
    counts: Mutex<BTreeMap<&'static str, u64>>,
    events: Mutex<std::collections::VecDeque<ChaosEvent>>,
    conns: Mutex<HashMap<u64, TcpStream>>,
    live: AtomicU64,
    started: Instant,
}

impl Shared {
    fn decide(&self) -> (u64, Fault) {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        // One draw per request, enabled or not (latency delays draw from the same sequence).
        let r = rng.below(1000) as u32;
        let fault = if self.enabled.load(Ordering::SeqCst) {
            pick_fault(&self.cfg.weights, r)
        } else {
            Fault::Pass
        };
        (seq, fault)
    }

    fn random_latency(&self) -> Duration {
        let (lo, hi) = self.cfg.latency;
        if hi <= lo {
            return lo;
        }
        let f = self.rng.lock().unwrap_or_else(|p| p.into_inner()).unit();
        lo + (hi - lo).mul_f64(f)
    }

    fn count(&self, what: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what)
            .or_default() += 1;
    }

    fn record(&self, ev: ChaosEvent) {
        let mut evs = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if self.cfg.max_events == 0 {
            return;
        }
        while evs.len() >= self.cfg.max_events {
            evs.pop_front();
        }
        evs.push_back(ev);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps `d` in small steps; false if the proxy is stopping.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.stopping() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

/// A fault-injecting HTTP/1.1 proxy on 127.0.0.1. See the module documentation.
pub struct ChaosProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ChaosProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:upstream_port`.
    /// Faults are enabled from the start.
    pub fn start(upstream_port: u16, cfg: ChaosConfig) -> ChaosProxy {
        assert!(
            cfg.fault_per_mille() <= 1000,
            "fault weights sum to {} per mille (> 1000)",
            cfg.fault_per_mille()
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind chaos proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            rng: Mutex::new(XorShift::new(cfg.seed)),
            cfg,
            enabled: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
            counts: Mutex::default(),
            events: Mutex::default(),
            conns: Mutex::default(),
            live: AtomicU64::new(0),
            started: Instant::now(),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("chaos-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .expect("spawn chaos accept thread");
        ChaosProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Faults on (the configured mix) or off (every request passes).
    pub fn set_enabled(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::SeqCst);
    }

    pub fn enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::SeqCst)
    }

    /// How many requests met each fault (`pass` included; kinds never met are absent), plus
    /// `upstream_error` for requests whose upstream exchange failed with no fault asked for, and
    /// `client_gone` for clients that closed while the proxy was answering.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// Requests decided so far (the next event's sequence number).
    pub fn requests(&self) -> u64 {
        self.shared.seq.load(Ordering::SeqCst)
    }

    /// The event log, oldest first (bounded by [`ChaosConfig::max_events`]).
    pub fn events(&self) -> Vec<ChaosEvent> {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Events with `from <= seq < to`.
    pub fn events_between(&self, from: u64, to: u64) -> Vec<ChaosEvent> {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.seq >= from && e.seq < to)
            .cloned()
            .collect()
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.next_conn.load(Ordering::SeqCst)
    }

    /// The most requests one client connection carried (keep-alive at work when above 1).
    pub fn max_requests_per_connection(&self) -> u64 {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| e.nth_on_conn)
            .max()
            .unwrap_or(0)
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Cuts every open client connection (threads end; clients see a closed connection).
    pub fn cut_all(&self) {
        let list = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        for s in list.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// How long the proxy has been running.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.cut_all();
        // Connection threads notice within a poll interval; wait (bounded) for them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            self.cut_all();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl S3Server {
    /// [`env`](S3Server::env) with the endpoint pointed at a [`ChaosProxy`] in front of this
    /// server.
    pub fn env_through_chaos(&self, proxy: &ChaosProxy) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in env.iter_mut() {
            if k == "AWS_ENDPOINT" || k == "AWS_ENDPOINT_URL" {
                *v = proxy.endpoint();
            }
        }
        env
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    for conn in listener.incoming() {
        if sh.stopping() {
            break;
        }
        let Ok(client) = conn else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let id = sh.next_conn.fetch_add(1, Ordering::SeqCst);
        if let Ok(c) = client.try_clone() {
            sh.conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, c);
        }
        sh.live.fetch_add(1, Ordering::SeqCst);
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("chaos-conn-{id}"))
            .spawn(move || {
                serve_connection(&sh2, id, client);
                sh2.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                sh2.live.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            if let Some(c) = sh
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id)
            {
                let _ = c.shutdown(Shutdown::Both);
            }
            sh.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Closes `s` with a TCP reset (SO_LINGER 0) rather than a FIN.
fn reset(s: &TcpStream) {
    #[repr(C)]
    struct Linger {
        l_onoff: i32,
        l_linger: i32,
    }
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, val: *const Linger, len: u32) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_LINGER: i32 = 13;
    use std::os::fd::AsRawFd;
    let l = Linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd owned by `s`, and a properly laid out `struct linger`.
    unsafe {
        setsockopt(
            s.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            &l,
            std::mem::size_of::<Linger>() as u32,
        );
    }
    // The reset is sent when the last descriptor closes (this one and the registry's clone,
    // both dropped when the connection thread ends). No shutdown: that would send a FIN first.
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One upstream exchange on a fresh connection: the whole response, or why not.
fn exchange(sh: &Shared, req: &Request) -> io::Result<Response> {
    let up = TcpStream::connect_timeout(&sh.upstream, Duration::from_secs(5))?;
    up.set_read_timeout(Some(sh.cfg.upstream_timeout))?;
    up.set_write_timeout(Some(sh.cfg.upstream_timeout))?;
    let _ = up.set_nodelay(true);
    let mut w = &up;
    let mut msg = req.upstream_head();
    msg.extend_from_slice(&req.body);
    w.write_all(&msg)?;
    w.flush()?;
    let mut r = BufReader::with_capacity(64 * 1024, &up);
    let resp = read_response(&mut r, req.method())?;
    let _ = up.shutdown(Shutdown::Both);
    Ok(resp)
}

fn serve_connection(sh: &Shared, id: u64, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = client.set_read_timeout(Some(sh.cfg.idle_timeout));
    let _ = client.set_write_timeout(Some(Duration::from_secs(60)));
    let mut reader = BufReader::with_capacity(64 * 1024, &client);
    let mut writer = &client;
    let mut nth = 0u64;
    loop {
        if sh.stopping() {
            return;
        }
        let req = match read_request(&mut reader, &mut writer) {
            Ok(Some(r)) => r,
            // Closed, idle too long, or not HTTP we understand: end the connection.
            Ok(None) | Err(_) => return,
        };
        nth += 1;
        let (seq, fault) = sh.decide();
        sh.count(fault.name());
        let mut ev = ChaosEvent {
            seq,
            unix_ms: unix_ms(),
            conn: id,
            nth_on_conn: nth,
            method: req.method().to_string(),
            target: req.target().to_string(),
            request_bytes: req.raw_head.len() + req.body.len(),
            fault,
            status: 0,
            note: String::new(),
        };
        let client_keep_alive = req.head.keep_alive(true);
        let keep_going = handle(sh, &client, &mut writer, &mut reader, &req, fault, &mut ev);
        sh.record(ev);
        if fault == Fault::Reset {
            return;
        }
        if !keep_going || !client_keep_alive {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Carries out `fault` for `req`; false when the client connection must end.
fn handle(
    sh: &Shared,
    client: &TcpStream,
    writer: &mut &TcpStream,
    reader: &mut BufReader<&TcpStream>,
    req: &Request,
    fault: Fault,
    ev: &mut ChaosEvent,
) -> bool {
    let made_up =
        |status: u16, code: &str, msg: &str| s3_error_response(status, code, msg, req.target());
    match fault {
        Fault::Reset => {
            reset(client);
            false
        }
        Fault::Hang => {
            // Never answer; read (and drop) whatever the client sends until it closes.
            let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
            let end = Instant::now() + sh.cfg.hang_max;
            let mut buf = [0u8; 8192];
            while Instant::now() < end && !sh.stopping() {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::TimedOut
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            false
        }
        Fault::Error500 | Fault::Error503 | Fault::SlowDown429 => {
            let (status, code, msg) = match fault {
                Fault::Error500 => (
                    500,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                ),
                Fault::Error503 => (
                    503,
                    "ServiceUnavailable",
                    "Service is unable to handle request.",
                ),
                _ => (429, "SlowDown", "Please reduce your request rate."),
            };
            ev.status = status;
            if writer.write_all(&made_up(status, code, msg)).is_err() {
                sh.count("client_gone");
                return false;
            }
            true
        }
        Fault::Pass
        | Fault::Latency
        | Fault::LostResponse
        | Fault::ResetMidResponse
        | Fault::SlowBody => {
            if fault == Fault::Latency && !sh.sleep(sh.random_latency()) {
                return false;
            }
            let resp = match exchange(sh, req) {
                Ok(r) => r,
                Err(e) => {
                    sh.count("upstream_error");
                    ev.note = format!("upstream: {e}");
                    ev.status = 502;
                    let _ = writer.write_all(&made_up(
                        502,
                        "BadGateway",
                        "chaos proxy: upstream failed",
                    ));
                    return false;
                }
            };
            ev.status = resp.status();
            let (head, keep) = resp.client_head(sh.cfg.keep_alive);
            match fault {
                Fault::LostResponse => false,
                Fault::ResetMidResponse => {
                    if resp.body.is_empty() {
                        let half = head.len() / 2;
                        let _ = writer.write_all(&head[..half]);
                    } else {
                        let mut out = head;
                        out.extend_from_slice(&resp.body[..resp.body.len() / 2]);
                        let _ = writer.write_all(&out);
                    }
                    let _ = writer.flush();
                    false
                }
                Fault::SlowBody => {
                    if writer.write_all(&head).is_err() {
                        sh.count("client_gone");
                        return false;
                    }
                    let piece = sh.cfg.slow_piece.max(1);
                    for (i, part) in resp.body.chunks(piece).enumerate() {
                        if i > 0 && !sh.sleep(sh.cfg.slow_delay) {
                            return false;
                        }
                        if writer.write_all(part).is_err() {
                            sh.count("client_gone");
                            return false;
                        }
                    }
                    keep
                }
                _ => {
                    let mut out = head;
                    out.extend_from_slice(&resp.body);
                    if writer.write_all(&out).is_err() {
                        sh.count("client_gone");
                        return false;
                    }
                    keep
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn req(bytes: &[u8]) -> (Option<Request>, Vec<u8>, usize) {
        let mut r = Cursor::new(bytes.to_vec());
        let mut interim = Vec::new();
        let out = read_request(&mut r, &mut interim).expect("parse");
        (out, interim, r.position() as usize)
    }

    #[test]
    fn request_with_content_length_and_keep_alive() {
        let wire = b"PUT /b/p/wal/0001 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 5\r\nIf-None-Match: *\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut r = Cursor::new(wire.to_vec());
        let mut interim = Vec::new();
        let a = read_request(&mut r, &mut interim).unwrap().unwrap();
        assert_eq!(a.method(), "PUT");
        assert_eq!(a.target(), "/b/p/wal/0001");
        assert_eq!(a.body, b"hello");
        assert_eq!(a.head.header("if-none-match"), Some("*"));
        assert!(a.head.keep_alive(true));
        assert_eq!(a.upstream_head(), a.raw_head);
        let b = read_request(&mut r, &mut interim).unwrap().unwrap();
        assert_eq!(b.method(), "GET");
        assert!(b.body.is_empty());
        assert!(read_request(&mut r, &mut interim).unwrap().is_none());
        assert!(interim.is_empty());
    }

    #[test]
    fn chunked_request_body_is_kept_raw_and_decodes() {
        let wire = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let (r, _, pos) = req(wire);
        let r = r.unwrap();
        assert_eq!(
            r.body,
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec()
        );
        assert_eq!(dechunk(&r.body).unwrap(), b"hello world");
        assert_eq!(&wire[pos..], b"NEXT");
    }

    #[test]
    fn expect_continue_is_answered_and_stripped() {
        let wire = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
        let (r, interim, _) = req(wire);
        let r = r.unwrap();
        assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(r.body, b"abc");
        let up = String::from_utf8(r.upstream_head()).unwrap();
        assert!(!up.to_ascii_lowercase().contains("expect"), "{up}");
        assert!(up.starts_with("PUT /x HTTP/1.1\r\n"));
        assert!(up.ends_with("Content-Length: 3\r\n\r\n"));
    }

    #[test]
    fn malformed_requests_are_errors() {
        let mut interim = Vec::new();
        for wire in [
            &b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort"[..],
            b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"GET /x HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\n",
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"GET\r\n\r\n",
        ] {
            let mut r = Cursor::new(wire.to_vec());
            assert!(
                read_request(&mut r, &mut interim).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn leading_blank_lines_and_folding() {
        let wire = b"\r\nGET /x HTTP/1.1\r\nX-A: one\r\n  two\r\n\r\n";
        let (r, _, _) = req(wire);
        let r = r.unwrap();
        assert_eq!(r.head.header("x-a"), Some("one two"));
    }

    fn resp(method: &str, wire: &[u8]) -> (Response, usize) {
        let mut r = Cursor::new(wire.to_vec());
        let out = read_response(&mut r, method).expect("parse response");
        (out, r.position() as usize)
    }

    #[test]
    fn response_framings() {
        // Content-Length.
        let (r, pos) = resp(
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbodyEXTRA",
        );
        assert_eq!(
            (r.status(), r.body.as_slice(), pos),
            (200, &b"body"[..], 42)
        );
        assert_eq!(r.framing, Framing::Length(4));
        assert!(r.keep_alive());
        // HEAD: Content-Length describes the object, no body follows.
        let (r, _) = resp("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
        assert!(r.body.is_empty());
        assert_eq!(r.framing, Framing::None);
        // 204 and 304 have no body.
        let (r, _) = resp("DELETE", b"HTTP/1.1 204 No Content\r\n\r\n");
        assert!(r.body.is_empty());
        // Chunked, relayed raw.
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (r, pos) = resp("GET", wire);
        assert_eq!(pos, wire.len());
        assert_eq!(r.body, b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(dechunk(&r.body).unwrap(), b"abc");
        assert!(r.keep_alive());
        // Neither: until the server closes, and the connection cannot be reused.
        let (r, _) = resp("GET", b"HTTP/1.0 200 OK\r\n\r\nall of it");
        assert_eq!(r.body, b"all of it");
        assert_eq!(r.framing, Framing::UntilClose);
        assert!(!r.keep_alive());
        // Interim responses are skipped.
        let (r, _) = resp(
            "PUT",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(r.status(), 200);
        // Connection: close.
        let (r, _) = resp(
            "GET",
            b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno",
        );
        assert!(!r.keep_alive());
        // HTTP/1.0 keep-alive.
        let (r, _) = resp(
            "GET",
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
        );
        assert!(r.keep_alive());
    }

    #[test]
    fn connection_close_is_dropped_for_clients_when_asked() {
        let wire = b"HTTP/1.1 404 NOT FOUND\r\nContent-Type: application/xml\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno";
        let (r, _) = resp("GET", wire);
        assert!(!r.keep_alive());
        let (head, keep) = r.client_head(false);
        assert_eq!((head.as_slice(), keep), (r.raw_head.as_slice(), false));
        let (head, keep) = r.client_head(true);
        assert!(keep);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 404 NOT FOUND\r\nContent-Type: application/xml\r\nContent-Length: 2\r\n\r\n"
        );
        // A body that ends with the connection cannot be kept alive.
        let (r, _) = resp("GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall");
        assert_eq!(r.client_head(true), (r.raw_head.clone(), false));
        // Nor can HTTP/1.0 without keep-alive.
        let (r, _) = resp("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx");
        assert!(!r.client_head(true).1);
        // Already keep-alive: relayed as is.
        let (r, _) = resp("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(r.client_head(true), (r.raw_head.clone(), true));
    }

    #[test]
    fn truncated_responses_are_errors() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"",
            b"garbage\r\n\r\n",
        ] {
            let mut r = Cursor::new(wire.to_vec());
            assert!(
                read_response(&mut r, "GET").is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn made_up_errors_parse_as_s3_errors() {
        for (status, code) in [
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
            (429, "SlowDown"),
        ] {
            let wire = s3_error_response(status, code, "m", "/b/k&x");
            let (r, pos) = resp("PUT", &wire);
            assert_eq!(pos, wire.len());
            assert_eq!(r.status(), status);
            let body = String::from_utf8(r.body.clone()).unwrap();
            assert!(body.contains(&format!("<Code>{code}</Code>")), "{body}");
            assert!(body.contains("/b/k&amp;x"), "{body}");
            assert!(r.keep_alive());
        }
    }

    #[test]
    fn rng_and_fault_choice() {
        let mut a = XorShift::new(7);
        let mut b = XorShift::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(XorShift::new(8).next_u64(), xs[0]);
        assert!(XorShift::new(0).next_u64() != 0);
        let cfg = ChaosConfig::default();
        let total = cfg.fault_per_mille();
        assert!((300..=370).contains(&total), "{total}");
        // Cumulative choice: the first weight covers 0..w.
        let w = &cfg.weights;
        assert_eq!(pick_fault(w, 0), w[0].0);
        assert_eq!(pick_fault(w, w[0].1 - 1), w[0].0);
        assert_eq!(pick_fault(w, w[0].1), w[1].0);
        assert_eq!(pick_fault(w, total), Fault::Pass);
        assert_eq!(pick_fault(w, 999), Fault::Pass);
        // Frequencies follow the weights.
        let mut rng = XorShift::new(42);
        let mut hist: BTreeMap<Fault, u32> = BTreeMap::new();
        for _ in 0..100_000 {
            *hist
                .entry(pick_fault(w, rng.below(1000) as u32))
                .or_default() += 1;
        }
        for &(f, wt) in w {
            let got = f64::from(hist[&f]) / 100.0;
            assert!(
                (got - f64::from(wt)).abs() < f64::from(wt) * 0.2 + 2.0,
                "{f}: {got} vs {wt}"
            );
        }
    }

    /// End to end on loopback (no moto): a tiny upstream that answers with Content-Length and
    /// chunked bodies, and the proxy passing, failing and dropping requests.
    #[test]
    fn proxy_relays_and_injects_on_loopback() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_port = upstream.local_addr().unwrap().port();
        let hits = Arc::new(AtomicU64::new(0));
        let h2 = hits.clone();
        std::thread::spawn(move || {
            for c in upstream.incoming() {
                let Ok(c) = c else { break };
                let h3 = h2.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(&c);
                    let mut w = &c;
                    let mut sink = Vec::new();
                    while let Ok(Some(q)) = read_request(&mut r, &mut sink) {
                        h3.fetch_add(1, Ordering::SeqCst);
                        if q.target() == "/close" {
                            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nclose");
                            break;
                        }
                        let out: Vec<u8> = if q.target() == "/chunked" {
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n".to_vec()
                        } else {
                            let body = vec![b'z'; 100_000];
                            let mut o = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            o.extend_from_slice(&body);
                            o
                        };
                        if w.write_all(&out).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let get = |port: u16, path: &str, n: usize| -> Vec<io::Result<Response>> {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut r = BufReader::new(&s);
            let mut w = &s;
            let mut out = Vec::new();
            for _ in 0..n {
                if let Err(e) =
                    w.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                {
                    out.push(Err(e));
                    break;
                }
                let r = read_response(&mut r, "GET");
                let stop = r.is_err();
                out.push(r);
                if stop {
                    break;
                }
            }
            out
        };
        // Pass, keep-alive, both framings.
        let p = ChaosProxy::start(up_port, ChaosConfig::none());
        let rs = get(p.port(), "/big", 3);
        assert_eq!(rs.len(), 3);
        for r in &rs {
            assert_eq!(r.as_ref().unwrap().body.len(), 100_000);
        }
        let rs = get(p.port(), "/chunked", 2);
        assert_eq!(
            dechunk(&rs[1].as_ref().unwrap().body).unwrap(),
            b"wikipedia"
        );
        assert_eq!(p.counts().get("pass"), Some(&5));
        assert_eq!(hits.load(Ordering::SeqCst), 5);
        // The upstream closes after every response; the client connection stays open.
        let rs = get(p.port(), "/close", 3);
        assert_eq!(rs.len(), 3);
        for r in &rs {
            let r = r.as_ref().unwrap();
            assert_eq!(r.body, b"close");
            assert!(r.keep_alive());
        }
        assert_eq!(p.max_requests_per_connection(), 3);
        assert_eq!(hits.load(Ordering::SeqCst), 8);
        drop(p);
        // Unless asked to relay the upstream's Connection: close.
        let p = ChaosProxy::start(
            up_port,
            ChaosConfig {
                keep_alive: false,
                ..ChaosConfig::none()
            },
        );
        let rs = get(p.port(), "/close", 2);
        assert!(!rs[0].as_ref().unwrap().keep_alive());
        assert!(rs.len() < 2 || rs[1].is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 9);
        drop(p);
        // 503 without forwarding, connection kept.
        let p = ChaosProxy::start(up_port, ChaosConfig::only(Fault::Error503, 1000));
        let rs = get(p.port(), "/big", 2);
        assert!(rs.iter().all(|r| r.as_ref().unwrap().status() == 503));
        assert_eq!(hits.load(Ordering::SeqCst), 9);
        p.set_enabled(false);
        let rs = get(p.port(), "/big", 1);
        assert_eq!(rs[0].as_ref().unwrap().status(), 200);
        assert_eq!(hits.load(Ordering::SeqCst), 10);
        drop(p);
        // Lost response: forwarded, the client sees the connection end.
        let p = ChaosProxy::start(up_port, ChaosConfig::only(Fault::LostResponse, 1000));
        let rs = get(p.port(), "/big", 1);
        assert!(rs[0].is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 11);
        drop(p);
        // Mid-response: a truncated body.
        let p = ChaosProxy::start(up_port, ChaosConfig::only(Fault::ResetMidResponse, 1000));
        assert!(get(p.port(), "/big", 1)[0].is_err());
        drop(p);
        // Reset: nothing forwarded.
        let p = ChaosProxy::start(up_port, ChaosConfig::only(Fault::Reset, 1000));
        assert!(get(p.port(), "/big", 1)[0].is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 12);
        drop(p);
        // Slow body: complete, but takes pieces × delay.
        let mut cfg = ChaosConfig::only(Fault::SlowBody, 1000);
        cfg.slow_piece = 16 * 1024;
        cfg.slow_delay = Duration::from_millis(20);
        let p = ChaosProxy::start(up_port, cfg);
        let t0 = Instant::now();
        let rs = get(p.port(), "/big", 1);
        assert_eq!(rs[0].as_ref().unwrap().body.len(), 100_000);
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        drop(p);
        // Hang: no answer until the client gives up; the proxy thread ends when it does.
        let p = ChaosProxy::start(up_port, ChaosConfig::only(Fault::Hang, 1000));
        let s = TcpStream::connect(("127.0.0.1", p.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        (&s).write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 16];
        let e = (&s).read(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert_eq!(p.open_connections(), 1);
        drop(s);
        assert!(crate::poll_until(Duration::from_secs(5), || p
            .open_connections()
            == 0));
        let evs = p.events();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].fault, Fault::Hang);
        drop(p);
        assert_eq!(hits.load(Ordering::SeqCst), 13);
    }
}
