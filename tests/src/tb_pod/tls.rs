//! TLS endpoints of `tb-pod` (rustls with ring, TLS 1.3): `tls-server` reads application
//! data until the client's close_notify and answers with the byte count; `tls-bulk`
//! streams application data over one connection for a while; `tls-handshakes` opens new
//! connections back to back, each with a full handshake (no resumption) and one byte.
//! Both clients verify the server's certificate chain and name against a CA file.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{StreamOwned, SupportedCipherSuite};
use serde_json::json;

/// Application data written per call by `tls-bulk` (one full TLS record).
const CHUNK: usize = 16 * 1024;

fn invalid(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's configuration: the certificate chain of `cert` and the key of `key`
/// (PEM files, e.g. from `openssl req`).
pub fn server_config(cert: &Path, key: &Path) -> io::Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid("certificate file", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("certificate", e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("key file", e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid("certificate and key", e))?;
    Ok(Arc::new(config))
}

/// What the clients need: whom to trust and the name to ask for.
pub struct ClientArgs {
    pub connect: SocketAddr,
    pub server_name: String,
    pub ca: std::path::PathBuf,
    pub duration: Duration,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

/// A client configuration trusting only the certificates of `ca`, with session
/// resumption off: every connection makes a full handshake.
fn client_config(ca: &Path) -> io::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| invalid("CA file", e))? {
        roots
            .add(cert.map_err(|e| invalid("CA certificate", e))?)
            .map_err(|e| invalid("CA certificate", e))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("protocol versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

type Client = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes a handshake.
fn handshake(a: &ClientArgs, config: &Arc<ClientConfig>) -> io::Result<Client> {
    let name = ServerName::try_from(a.server_name.clone()).map_err(|e| invalid("name", e))?;
    let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    let sock = TcpStream::connect_timeout(&a.connect, a.connect_timeout)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(a.io_timeout))?;
    sock.set_write_timeout(Some(a.io_timeout))?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Ends the client's sending with close_notify and reads the server's byte count.
fn finish(tls: &mut Client) -> io::Result<u64> {
    tls.conn.send_close_notify();
    tls.flush()?;
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    let mut line = String::new();
    BufReader::new(&mut *tls).read_line(&mut line)?;
    // Until the server's close_notify, so nothing is left unread when the socket closes
    // (which would send a reset instead of a FIN).
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    line.trim()
        .parse()
        .map_err(|e| invalid(&format!("server's count {line:?}"), e))
}

fn suite_name(suite: Option<SupportedCipherSuite>) -> Option<String> {
    suite.map(|s| format!("{:?}", s.suite()))
}

/// `tls-server`, one connection: reads until close_notify (or EOF), then writes the
/// number of application bytes it read, "<n>\n", and its own close_notify.
pub fn serve_one(sock: TcpStream, config: &Arc<ServerConfig>) {
    let Ok(conn) = ServerConnection::new(Arc::clone(config)) else {
        return;
    };
    let _ = sock.set_nodelay(true);
    let mut tls = StreamOwned::new(conn, sock);
    let mut buf = vec![0u8; 64 * 1024];
    let mut count = 0u64;
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => count += n as u64,
            Err(_) => return,
        }
    }
    if tls.write_all(format!("{count}\n").as_bytes()).is_ok() {
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }
}

/// `tls-bulk`: one connection, application data for `duration`, then close_notify; the
/// rate is what the server counted over the time until its count came back.
pub fn bulk(a: &ClientArgs) -> serde_json::Value {
    let start = Instant::now();
    let mut report = json!({ "connect": a.connect.to_string(), "server_name": a.server_name });
    let outcome = (|| -> io::Result<()> {
        let config = client_config(&a.ca)?;
        let mut tls = handshake(a, &config)?;
        report["handshake_us"] = json!(start.elapsed().as_secs_f64() * 1e6);
        report["protocol"] = json!(tls.conn.protocol_version().map(|v| format!("{v:?}")));
        report["cipher_suite"] = json!(suite_name(tls.conn.negotiated_cipher_suite()));
        let mut chunk = vec![0u8; CHUNK];
        crate::XorShift::new(7).fill(&mut chunk);
        let data_start = Instant::now();
        let deadline = data_start + a.duration;
        let mut sent = 0u64;
        while Instant::now() < deadline {
            tls.write_all(&chunk)?;
            sent += CHUNK as u64;
        }
        let counted = finish(&mut tls)?;
        let elapsed = data_start.elapsed().as_secs_f64();
        report["bytes_sent"] = json!(sent);
        report["bytes_counted"] = json!(counted);
        report["data_s"] = json!(elapsed);
        report["gbit_per_s"] = json!(counted as f64 * 8.0 / elapsed.max(1e-9) / 1e9);
        if counted != sent {
            return Err(io::Error::other(format!(
                "the server counted {counted} bytes of {sent} sent"
            )));
        }
        Ok(())
    })();
    report["error"] = json!(outcome.err().map(|e| crate::describe(&e)));
    report["elapsed_ms"] = json!(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
    report
}

/// One `tls-handshakes` exchange: connect, full handshake, one byte, close_notify, the
/// server's count of 1. Returns how long the handshake took, from the start of connect.
fn one_handshake(a: &ClientArgs, config: &Arc<ClientConfig>) -> io::Result<u64> {
    let t0 = Instant::now();
    let mut tls = handshake(a, config)?;
    let handshake_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    tls.write_all(b"x")?;
    match finish(&mut tls)? {
        1 => Ok(handshake_ns),
        n => Err(io::Error::other(format!(
            "the server counted {n} bytes of 1"
        ))),
    }
}

/// `tls-handshakes`: full handshakes back to back on one thread for `duration`.
pub fn handshakes(a: &ClientArgs) -> serde_json::Value {
    let start = Instant::now();
    let config = match client_config(&a.ca) {
        Ok(c) => c,
        Err(e) => return json!({ "handshakes": 0, "errors": 1, "first_error": e.to_string() }),
    };
    let deadline = start + a.duration;
    let (mut ns, mut errors, mut first_error) = (Vec::new(), 0u64, None);
    while Instant::now() < deadline {
        match one_handshake(a, &config) {
            Ok(t) => ns.push(t),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| crate::describe(&e));
            }
        }
    }
    let elapsed = start.elapsed();
    ns.sort_unstable();
    let us = |p| crate::percentile(&ns, p) as f64 / 1000.0;
    json!({
        "connect": a.connect.to_string(),
        "server_name": a.server_name,
        "handshakes": ns.len(),
        "errors": errors,
        "first_error": first_error,
        "per_second": ns.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        "handshake_p50_us": us(50.0),
        "handshake_p99_us": us(99.0),
        "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}
