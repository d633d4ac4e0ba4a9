//! The SOCKS5 `CONNECT` exchange (RFC 1928, no authentication) between the outbound proxy
//! and an egress gateway (FSM 8.2 carries the original destination to its egress gateway
//! this way): [`connect`] is the proxy's side, [`accept`] and [`reply`] the gateway's.
//! Only IP destinations: the proxy always knows the address the application dialled, and
//! a gateway that resolved names would be a resolver for anyone who can reach it. A leaf.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
const IPV4: u8 = 1;
const DOMAIN: u8 = 3;
const IPV6: u8 = 4;

/// Reply codes (RFC 1928 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

impl Reply {
    fn of(code: u8) -> Option<Reply> {
        Some(match code {
            0 => Reply::Succeeded,
            1 => Reply::GeneralFailure,
            3 => Reply::NetworkUnreachable,
            4 => Reply::HostUnreachable,
            5 => Reply::ConnectionRefused,
            6 => Reply::TtlExpired,
            7 => Reply::CommandNotSupported,
            8 => Reply::AddressTypeNotSupported,
            _ => return None,
        })
    }

    /// The reply for a failed connect to the destination.
    pub fn of_connect_error(error: &std::io::Error) -> Reply {
        match error.kind() {
            std::io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
            std::io::ErrorKind::HostUnreachable => Reply::HostUnreachable,
            std::io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
            std::io::ErrorKind::TimedOut => Reply::TtlExpired,
            _ => Reply::GeneralFailure,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("SOCKS5 I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    #[error("no acceptable authentication method (only \"no authentication\" is served)")]
    NoAcceptableMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is not an IP address")]
    AddressType(u8),
    #[error("the gateway answered {0:?}")]
    Refused(Reply),
    #[error("the gateway answered the unknown reply code {0}")]
    UnknownReply(u8),
}

/// The proxy's side: ask the gateway on `stream` to connect to `destination`; `Ok` once
/// it has, and then the stream carries the application's bytes both ways.
pub async fn connect<S>(stream: &mut S, destination: SocketAddr) -> Result<(), Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Greeting and request in one write: a gateway that offers no-authentication (the
    // only method asked for) reads them in order; one round trip instead of two.
    let mut out = vec![VERSION, 1, NO_AUTHENTICATION, VERSION, CONNECT, 0];
    push_addr(&mut out, destination);
    stream.write_all(&out).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice[0] != VERSION {
        return Err(Socks5Error::Version(choice[0]));
    }
    if choice[1] != NO_AUTHENTICATION {
        return Err(Socks5Error::NoAcceptableMethod);
    }
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(Socks5Error::Version(head[0]));
    }
    // The bound address that follows is read whatever the reply, so nothing of it is
    // taken for the application's bytes.
    read_addr(stream, head[3]).await?;
    match Reply::of(head[1]) {
        Some(Reply::Succeeded) => Ok(()),
        Some(reply) => Err(Socks5Error::Refused(reply)),
        None => Err(Socks5Error::UnknownReply(head[1])),
    }
}

/// The gateway's side: read a client's greeting and CONNECT request and return the
/// destination. A request the gateway does not serve is answered (no acceptable method,
/// command or address type not supported) before the error is returned.
pub async fn accept<S>(stream: &mut S) -> Result<SocketAddr, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 2];
    stream.read_exact(&mut greeting).await?;
    if greeting[0] != VERSION {
        return Err(Socks5Error::Version(greeting[0]));
    }
    let mut methods = vec![0u8; usize::from(greeting[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTHENTICATION) {
        stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    stream.write_all(&[VERSION, NO_AUTHENTICATION]).await?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(Socks5Error::Version(head[0]));
    }
    if head[1] != CONNECT {
        reply(stream, Reply::CommandNotSupported, None).await?;
        return Err(Socks5Error::Command(head[1]));
    }
    match read_addr(stream, head[3]).await {
        Err(Socks5Error::AddressType(kind)) => {
            reply(stream, Reply::AddressTypeNotSupported, None).await?;
            Err(Socks5Error::AddressType(kind))
        }
        other => other,
    }
}

/// The gateway's answer to a CONNECT: `bound` is the address it connected from.
pub async fn reply<S>(
    stream: &mut S,
    reply: Reply,
    bound: Option<SocketAddr>,
) -> Result<(), Socks5Error>
where
    S: AsyncWrite + Unpin,
{
    let mut out = vec![VERSION, reply as u8, 0];
    push_addr(
        &mut out,
        bound.unwrap_or(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
    );
    stream.write_all(&out).await?;
    Ok(())
}

fn push_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// An address of type `kind` and its port. A domain name is read whole (so the stream
/// stays in step) and refused.
async fn read_addr<S: AsyncRead + Unpin>(
    stream: &mut S,
    kind: u8,
) -> Result<SocketAddr, Socks5Error> {
    let ip = match kind {
        IPV4 => {
            let mut octets = [0u8; 4];
            stream.read_exact(&mut octets).await?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        IPV6 => {
            let mut octets = [0u8; 16];
            stream.read_exact(&mut octets).await?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        DOMAIN => {
            let len = stream.read_u8().await?;
            let mut name = vec![0u8; usize::from(len) + 2];
            stream.read_exact(&mut name).await?;
            return Err(Socks5Error::AddressType(kind));
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let port = stream.read_u16().await?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_sides_agree_on_a_destination_of_either_family() {
        for destination in ["203.0.113.9:443", "[2001:db8::9]:22"] {
            let destination: SocketAddr = destination.parse().unwrap();
            let (mut proxy, mut gateway) = tokio::io::duplex(1024);
            let gateway_side = tokio::spawn(async move {
                let asked = accept(&mut gateway).await.unwrap();
                reply(
                    &mut gateway,
                    Reply::Succeeded,
                    Some("10.0.0.5:40000".parse().unwrap()),
                )
                .await
                .unwrap();
                gateway.write_all(b"hello").await.unwrap();
                asked
            });
            connect(&mut proxy, destination).await.unwrap();
            // What follows the reply is the destination's bytes, none eaten.
            let mut hello = [0u8; 5];
            proxy.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"hello");
            assert_eq!(gateway_side.await.unwrap(), destination);
        }
    }

    #[tokio::test]
    async fn a_failed_connect_reaches_the_proxy_as_its_reply() {
        let (mut proxy, mut gateway) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            accept(&mut gateway).await.unwrap();
            reply(&mut gateway, Reply::ConnectionRefused, None)
                .await
                .unwrap();
        });
        let error = connect(&mut proxy, "203.0.113.9:443".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(error, Socks5Error::Refused(Reply::ConnectionRefused)),
            "{error}"
        );
    }

    #[tokio::test]
    async fn what_the_gateway_does_not_serve_is_answered_and_refused() {
        // A domain name: read whole, answered "address type not supported".
        let (mut client, mut gateway) = tokio::io::duplex(1024);
        let mut request = vec![5, 1, 0, 5, 1, 0, DOMAIN, 11];
        request.extend_from_slice(b"example.com");
        request.extend_from_slice(&443u16.to_be_bytes());
        client.write_all(&request).await.unwrap();
        let error = accept(&mut gateway).await.unwrap_err();
        assert!(matches!(error, Socks5Error::AddressType(DOMAIN)), "{error}");
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [5, 0, 5, Reply::AddressTypeNotSupported as u8]);

        // BIND instead of CONNECT.
        let (mut client, mut gateway) = tokio::io::duplex(1024);
        client
            .write_all(&[5, 1, 0, 5, 2, 0, IPV4, 10, 0, 0, 1, 0, 80])
            .await
            .unwrap();
        let error = accept(&mut gateway).await.unwrap_err();
        assert!(matches!(error, Socks5Error::Command(2)), "{error}");

        // Only username/password offered.
        let (mut client, mut gateway) = tokio::io::duplex(1024);
        client.write_all(&[5, 1, 2]).await.unwrap();
        let error = accept(&mut gateway).await.unwrap_err();
        assert!(matches!(error, Socks5Error::NoAcceptableMethod), "{error}");
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [5, 0xff]);

        // Not SOCKS at all.
        let (mut client, mut gateway) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(
            accept(&mut gateway).await.unwrap_err(),
            Socks5Error::Version(b'G')
        ));
    }
}
