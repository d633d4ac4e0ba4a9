//! The ClientHello parser on hellos captured from `openssl s_client` (3.0), cut, split,
//! and broken; and the peek on real sockets.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// `openssl s_client -servername a.example.com` (TLS 1.3 offer, one record).
const TLS13_SNI: &[u8] = include_bytes!("openssl_tls13_sni.bin");
/// `openssl s_client -noservername -tls1_2`.
const TLS12_NO_SNI: &[u8] = include_bytes!("openssl_tls12_no_sni.bin");

fn sni(data: &[u8]) -> Option<String> {
    match parse_client_hello(data).expect("parses") {
        Parsed::Hello { sni } => sni,
        Parsed::Incomplete { needed } => panic!("incomplete, needs {needed}"),
    }
}

/// The hello's handshake message re-framed into records of at most `size` bytes.
fn split_records(hello: &[u8], size: usize) -> Vec<u8> {
    let handshake = &hello[5..];
    let mut out = Vec::new();
    for chunk in handshake.chunks(size) {
        out.extend_from_slice(&[HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn real_hellos_give_their_server_name_or_none() {
    assert_eq!(sni(TLS13_SNI).as_deref(), Some("a.example.com"));
    assert_eq!(sni(TLS12_NO_SNI), None);
}

#[test]
fn every_prefix_of_a_hello_is_incomplete_and_asks_for_more() {
    for hello in [TLS13_SNI, TLS12_NO_SNI] {
        for len in 0..hello.len() {
            match parse_client_hello(&hello[..len]) {
                Ok(Parsed::Incomplete { needed }) => assert!(needed > len, "prefix {len}"),
                other => panic!("prefix {len} of {}: {other:?}", hello.len()),
            }
        }
    }
}

#[test]
fn a_hello_split_over_several_records_is_reassembled() {
    for size in [1, 3, 4, 50, 200] {
        let split = split_records(TLS13_SNI, size);
        assert_eq!(sni(&split).as_deref(), Some("a.example.com"), "size {size}");
        // Its prefixes still only ask for more.
        for len in 0..split.len() {
            assert!(
                matches!(
                    parse_client_hello(&split[..len]),
                    Ok(Parsed::Incomplete { .. })
                ),
                "size {size} prefix {len}"
            );
        }
    }
}

#[test]
fn bytes_after_the_hello_are_left_alone() {
    let mut data = TLS13_SNI.to_vec();
    data.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    assert_eq!(sni(&data).as_deref(), Some("a.example.com"));
}

#[test]
fn non_tls_clients_are_told_apart_from_the_first_byte() {
    for data in [
        &b"G"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"SSH-2.0-OpenSSH",
        b"\x16\x02",
    ] {
        let error = parse_client_hello(data).unwrap_err();
        assert!(
            matches!(error, ClientHelloError::NotTls(_)),
            "{data:?}: {error}"
        );
        assert_eq!(error.reason(), "not_tls");
    }
}

#[test]
fn broken_hellos_are_malformed_with_a_reason() {
    let mut not_hello = TLS13_SNI.to_vec();
    not_hello[5] = 2; // ServerHello
    let mut long_session = TLS13_SNI.to_vec();
    long_session[5 + 4 + 34] = 33;
    let mut zero_record = TLS13_SNI[..5].to_vec();
    zero_record[3..5].copy_from_slice(&[0, 0]);
    let mut alert_inside = split_records(TLS13_SNI, 100);
    alert_inside[105] = 21; // the second record claims to be an alert
    let mut body_short = TLS13_SNI.to_vec();
    // The handshake length says one byte less than the extensions need.
    let len = TLS13_SNI.len() - 5;
    body_short[3..5].copy_from_slice(&((len - 1) as u16).to_be_bytes());
    body_short[6..9].copy_from_slice(&((len - 5) as u32).to_be_bytes()[1..]);
    body_short.pop();
    for (what, data) in [
        ("not a ClientHello", not_hello),
        ("session id", long_session),
        ("empty record", zero_record),
        ("alert record", alert_inside),
        ("short body", body_short),
    ] {
        let error = parse_client_hello(&data).unwrap_err();
        assert!(
            matches!(error, ClientHelloError::Malformed(_)),
            "{what}: {error}"
        );
    }
}

/// A minimal ClientHello with one `server_name` extension holding `names`.
fn hello_with_names(names: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in names {
        list.push(*kind);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut ext = (list.len() as u16).to_be_bytes().to_vec();
    ext.extend(list);
    let mut extensions = vec![0, 0];
    extensions.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    extensions.extend(ext);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![CLIENT_HELLO];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![HANDSHAKE, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[test]
fn server_names_are_lower_cased_and_checked() {
    assert_eq!(
        sni(&hello_with_names(&[(0, b"B.Example.COM")])).as_deref(),
        Some("b.example.com")
    );
    // Another name type is skipped.
    assert_eq!(
        sni(&hello_with_names(&[(1, b"x"), (0, b"b.example.com")])).as_deref(),
        Some("b.example.com")
    );
    for bad in [
        &[(0u8, &b""[..])][..],
        &[(0, b"a..b")],
        &[(0, b"trailing.dot.")],
        &[(0, b"sp ace.example.com")],
        &[(0, b"nul\0.example.com")],
        &[(0, b"a.example.com"), (0, b"b.example.com")],
        &[(1, b"only.another.type")],
    ] {
        let error = parse_client_hello(&hello_with_names(bad)).unwrap_err();
        assert!(
            matches!(error, ClientHelloError::Malformed(_)),
            "{bad:?}: {error}"
        );
    }
}

#[test]
fn a_hello_announcing_more_than_the_bound_is_too_large() {
    // One record header, a handshake header announcing 1 MiB.
    let data = [HANDSHAKE, 3, 1, 0, 4, CLIENT_HELLO, 0x10, 0, 0];
    let error = parse_client_hello(&data).unwrap_err();
    assert!(
        matches!(error, ClientHelloError::TooLarge { .. }),
        "{error}"
    );
}

#[test]
fn garbage_never_panics() {
    // A cheap deterministic sweep (the fuzz target `client_hello` goes further).
    let mut x: u64 = 0x1234_5678;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 300) as usize;
        let mut data: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
        if x.is_multiple_of(3) && data.len() > 2 {
            data[0] = HANDSHAKE;
            data[1] = 3;
        }
        let _ = parse_client_hello(&data);
    }
    // Mutations of a real hello: every byte flipped in turn.
    for i in 0..TLS13_SNI.len() {
        let mut data = TLS13_SNI.to_vec();
        data[i] ^= 0xff;
        let _ = parse_client_hello(&data);
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

#[tokio::test]
async fn peek_waits_for_a_hello_split_over_segments_and_consumes_nothing() {
    let (mut client, mut server) = pair().await;
    client.set_nodelay(true).unwrap();
    let hello = split_records(TLS13_SNI, 100);
    let sent = hello.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(60) {
            client.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client
    });
    let sni = peek_sni(&server, Duration::from_secs(5)).await.unwrap();
    assert_eq!(sni.as_deref(), Some("a.example.com"));
    let _client = writer.await.unwrap();
    // Every byte is still there for the backend.
    let mut read = vec![0; hello.len()];
    server.read_exact(&mut read).await.unwrap();
    assert_eq!(read, hello);
}

#[tokio::test]
async fn a_silent_client_times_out_and_a_closing_one_is_closed() {
    let (_client, server) = pair().await;
    let error = peek_sni(&server, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "timeout", "{error}");

    let (mut client, server) = pair().await;
    client.write_all(&TLS13_SNI[..40]).await.unwrap();
    client.shutdown().await.unwrap();
    let error = peek_sni(&server, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(error, ClientHelloError::Closed(40)), "{error}");

    let (mut client, server) = pair().await;
    client.write_all(b"hello\n").await.unwrap();
    let error = peek_sni(&server, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(error.reason(), "not_tls", "{error}");
}
