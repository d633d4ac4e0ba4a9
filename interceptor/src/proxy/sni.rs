//! TLS passthrough's one look at a connection: the server name (SNI) of the client's
//! ClientHello, read with `MSG_PEEK` so that every byte stays in the socket and the
//! backend receives the stream untouched. [`parse_client_hello`] is a bounds-checked
//! parser of the TLS record and handshake framing (RFC 8446 section 4.1.2, RFC 6066
//! section 3) that reassembles a ClientHello split over several records; [`peek_sni`]
//! peeks until the hello is complete (it may arrive over several TCP segments), within a
//! size bound and a deadline. Anything else (not TLS, malformed, too large, too late) is
//! an error with a reason: the caller refuses the connection, never forwards it blind.
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The most bytes peeked for one ClientHello: a record holds at most 2^14 bytes, and
/// real hellos (with post-quantum key shares) are 2 KiB or less.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// How long a client has to send its whole ClientHello, unless configured.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The first peek's buffer; grown to what the record headers say is needed.
const FIRST_PEEK: usize = 2048;

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Extension `server_name`.
const SERVER_NAME: u16 = 0;
/// `NameType` `host_name`.
const HOST_NAME: u8 = 0;
/// The largest record payload (`TLSPlaintext.length`).
const MAX_RECORD: usize = 1 << 14;

/// Why no server name was read from a connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientHelloError {
    /// The first bytes are not a TLS handshake record.
    #[error("not TLS: the first bytes {0:02x?} are not a TLS handshake record")]
    NotTls(Vec<u8>),
    /// TLS framing whose content is not a well-formed ClientHello.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello needs more bytes than the bound.
    #[error("the ClientHello needs {needed} bytes, more than the {limit} allowed")]
    TooLarge { needed: usize, limit: usize },
    /// No complete ClientHello arrived in time.
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    /// The client closed its side before its ClientHello was complete.
    #[error("the client closed after {0} bytes, before a complete ClientHello")]
    Closed(usize),
    #[error("peeking the ClientHello: {0}")]
    Io(#[source] std::io::Error),
}

impl ClientHelloError {
    /// The `reason` label of the TLS refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ClientHelloError::NotTls(_) => "not_tls",
            ClientHelloError::Malformed(_) => "malformed",
            ClientHelloError::TooLarge { .. } => "too_large",
            ClientHelloError::Timeout(_) => "timeout",
            ClientHelloError::Closed(_) => "closed",
            ClientHelloError::Io(_) => "io",
        }
    }
}

/// What the bytes so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a ClientHello: at least `needed` bytes in all are required.
    Incomplete { needed: usize },
    /// A complete ClientHello and its server name (lower-cased), if it sent one.
    Hello { sni: Option<String> },
}

/// Parse the start of a client's stream as a TLS ClientHello, possibly split over
/// several handshake records. Never reads past `data`; a prefix that is not yet wrong is
/// [`Parsed::Incomplete`].
pub fn parse_client_hello(data: &[u8]) -> Result<Parsed, ClientHelloError> {
    // Say "not TLS" from the first bytes, before waiting for a whole header.
    let prefix = &data[..data.len().min(2)];
    if prefix.first().is_some_and(|b| *b != HANDSHAKE) || prefix.get(1).is_some_and(|b| *b != 3) {
        return Err(ClientHelloError::NotTls(data[..data.len().min(8)].to_vec()));
    }
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = data.get(pos..pos + 5) else {
            return incomplete(pos + 5);
        };
        if header[0] != HANDSHAKE {
            return Err(ClientHelloError::Malformed(
                "a record that is not a handshake record inside the ClientHello",
            ));
        }
        if header[1] != 3 {
            return Err(ClientHelloError::Malformed("record version is not 3.x"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(ClientHelloError::Malformed(
                "record length is 0 or over 2^14",
            ));
        }
        let Some(payload) = data.get(pos + 5..pos + 5 + len) else {
            return incomplete(pos + 5 + len);
        };
        handshake.extend_from_slice(payload);
        pos += 5 + len;
        if handshake.len() < 4 {
            continue;
        }
        if handshake[0] != CLIENT_HELLO {
            return Err(ClientHelloError::Malformed(
                "the first handshake message is not a ClientHello",
            ));
        }
        let body_len = usize::from(handshake[1]) << 16
            | usize::from(handshake[2]) << 8
            | usize::from(handshake[3]);
        if let Some(body) = handshake.get(4..4 + body_len) {
            return client_hello_body(body).map(|sni| Parsed::Hello { sni });
        }
        // Every further byte of the hello costs at least its own byte and, per record, a
        // header: this is a lower bound of what is still needed.
        let missing = 4 + body_len - handshake.len();
        if pos + missing > MAX_CLIENT_HELLO {
            return Err(ClientHelloError::TooLarge {
                needed: pos + missing,
                limit: MAX_CLIENT_HELLO,
            });
        }
    }
}

fn incomplete(needed: usize) -> Result<Parsed, ClientHelloError> {
    if needed > MAX_CLIENT_HELLO {
        return Err(ClientHelloError::TooLarge {
            needed,
            limit: MAX_CLIENT_HELLO,
        });
    }
    Ok(Parsed::Incomplete { needed })
}

/// A bounds-checked reader of one handshake body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        if n > self.0.len() {
            return Err(ClientHelloError::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ClientHelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ClientHelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// The server name of a ClientHello body (after the handshake header).
fn client_hello_body(body: &[u8]) -> Result<Option<String>, ClientHelloError> {
    let mut r = Reader(body);
    r.take(2, "truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec8("truncated legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(ClientHelloError::Malformed(
            "legacy_session_id is longer than 32 bytes",
        ));
    }
    let suites = r.vec16("truncated cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(ClientHelloError::Malformed(
            "cipher_suites is empty or of odd length",
        ));
    }
    if r.vec8("truncated legacy_compression_methods")?.is_empty() {
        return Err(ClientHelloError::Malformed(
            "legacy_compression_methods is empty",
        ));
    }
    if r.0.is_empty() {
        // A hello without extensions (TLS 1.2 and older allow it): no server name.
        return Ok(None);
    }
    let extensions = Reader(r.vec16("truncated extensions")?);
    if !r.0.is_empty() {
        return Err(ClientHelloError::Malformed(
            "bytes after the extensions of the ClientHello",
        ));
    }
    only_entry(
        extensions,
        |r| r.u16("truncated extension type"),
        SERVER_NAME,
        "truncated extension data",
        "two server_name extensions",
    )?
    .map(server_name)
    .transpose()
}

/// The data of the one entry of `list` of type `wanted`, if any: each entry is its type
/// (read by `kind`) and its data (a `vec16`, `truncated` when cut short); a second entry of
/// that type is an error, `twice`.
fn only_entry<'a, T: PartialEq>(
    mut list: Reader<'a>,
    kind: impl Fn(&mut Reader<'a>) -> Result<T, ClientHelloError>,
    wanted: T,
    truncated: &'static str,
    twice: &'static str,
) -> Result<Option<&'a [u8]>, ClientHelloError> {
    let mut found = None;
    while !list.0.is_empty() {
        let entry = kind(&mut list)?;
        let data = list.vec16(truncated)?;
        if entry != wanted {
            continue;
        }
        if found.is_some() {
            return Err(ClientHelloError::Malformed(twice));
        }
        found = Some(data);
    }
    Ok(found)
}

/// The `host_name` of a `server_name` extension's data.
fn server_name(data: &[u8]) -> Result<String, ClientHelloError> {
    let mut outer = Reader(data);
    let list = Reader(outer.vec16("truncated server_name_list")?);
    if !outer.0.is_empty() {
        return Err(ClientHelloError::Malformed(
            "bytes after the server_name_list",
        ));
    }
    // RFC 6066: at most one name of a type.
    let name = only_entry(
        list,
        |r| r.u8("truncated server name type"),
        HOST_NAME,
        "truncated server name",
        "two host_name entries",
    )?
    .ok_or(ClientHelloError::Malformed(
        "server_name without a host_name",
    ))?;
    if !is_dns_name(name) {
        return Err(ClientHelloError::Malformed(
            "the host_name is not a DNS hostname",
        ));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1 to 63 bytes, at most 253
/// bytes in all, no trailing dot (RFC 6066 names are sent without one).
fn is_dns_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split(|b| *b == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        })
}

/// The server name of the ClientHello at the start of `stream`, without consuming any
/// of it: peek, and while the hello is incomplete wait for more bytes and peek again,
/// up to [`MAX_CLIENT_HELLO`] bytes and `timeout` in all. `Ok(None)`: a complete hello
/// without a server name.
pub async fn peek_sni(
    stream: &TcpStream,
    timeout: Duration,
) -> Result<Option<String>, ClientHelloError> {
    tokio::time::timeout(timeout, peek_until_complete(stream))
        .await
        .unwrap_or(Err(ClientHelloError::Timeout(timeout)))
}

async fn peek_until_complete(stream: &TcpStream) -> Result<Option<String>, ClientHelloError> {
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0;
    loop {
        let ready = stream
            .ready(Interest::READABLE)
            .await
            .map_err(ClientHelloError::Io)?;
        // A peek leaves the socket readable; reporting "would block" when no new byte
        // came clears tokio's readiness, so the next `ready` waits for new data.
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = peek(stream, &mut buf)?;
            if n == seen && n != 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match peeked {
            Ok(n) => n,
            // The peer's FIN is queued behind the bytes a peek sees again and again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                return Err(ClientHelloError::Closed(seen));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ClientHelloError::Io(e)),
        };
        if n == 0 {
            return Err(ClientHelloError::Closed(seen));
        }
        seen = n;
        match parse_client_hello(&buf[..n])? {
            Parsed::Hello { sni } => return Ok(sni),
            Parsed::Incomplete { needed } if needed > buf.len() => {
                buf.resize(needed.max(buf.len() * 2).min(MAX_CLIENT_HELLO), 0);
            }
            Parsed::Incomplete { .. } => {}
        }
    }
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: the bytes queued on the socket, left there.
fn peek(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the whole call,
    // and the descriptor belongs to `stream`, which outlives the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests;
