//! `tb-pod`: the application run inside testbed pods. Servers print `READY <addr>` and one
//! JSON line per event on stdout (none with `--quiet`); the client, `connrate` and `rr`
//! print one JSON report. Bad arguments exit 2 (clap's usage error); connection errors
//! are reported in JSON with exit 0.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};

#[path = "../tb_pod/tls.rs"]
mod tls;
#[path = "../tb_pod/udp.rs"]
mod udp;

#[derive(Parser)]
#[command(
    name = "tb-pod",
    about = "Test application for interceptor testbed pods"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Servers: print only the READY line, no event per connection. A server under a
    /// long high-rate load (the soak) would otherwise stall in its own stdout whenever
    /// the reader falls behind a full pipe, and refuse connections for it.
    #[arg(long, global = true)]
    quiet: bool,
}

/// Set from `--quiet`: [`event`] prints nothing.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: echoes what it reads; on the client's FIN, flushes and sends FIN.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        /// Sent as "<greeting>\n" right after accept.
        #[arg(long)]
        greeting: Option<String>,
    },
    /// Connects, sends pseudo-random bytes, reads until EOF and reports as JSON.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 0)]
        send_bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Shut down the write side right after sending (the default does the same;
        /// the flag states the test's intent and is echoed in the report).
        #[arg(long)]
        half_close: bool,
        /// Read one greeting line before sending.
        #[arg(long)]
        expect_greeting: bool,
        #[arg(long, default_value_t = 10_000)]
        connect_timeout_ms: u64,
        /// Read timeout: a silent peer turns into a "timed out" error.
        #[arg(long, default_value_t = 30_000)]
        io_timeout_ms: u64,
        /// Set IP_OPTIONS (three NOOPs and END) before connecting, so every packet the
        /// client sends carries 4 bytes of IP options (IHL 6). IPv4 only.
        #[arg(long)]
        ip_options: bool,
    },
    /// Connection rate against an echo server: each exchange connects, writes 1 byte,
    /// reads it back and closes. Prints {"connections", "errors", "per_second",
    /// "connect_p50_us" (until connect() returned), "first_echo_p50_us" (from the start of
    /// connect() until the byte came back), their p99s, ...}.
    Connrate {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
        /// Threads, each running exchanges back to back.
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        #[arg(long, default_value_t = 5_000)]
        connect_timeout_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        io_timeout_ms: u64,
        /// Close with SO_LINGER 0 (RST, no TIME_WAIT), for long runs that would otherwise
        /// run out of ephemeral ports.
        #[arg(long)]
        linger_zero: bool,
    },
    /// Load across an agent hand-over, against an echo server: one thread opens new
    /// connections back to back (1 byte each way, closed with RST so no TIME_WAIT piles
    /// up) while `long_lived` connections each exchange a line every `interval_ms`.
    /// Prints {"started_unix_ms", "new": {"ok", "failed", "failures": [{"at_unix_ms",
    /// "error"}], "max_gap_ms", "last_ok_unix_ms"}, "long_lived": [{"exchanges",
    /// "broken_at_unix_ms", "error"}]}.
    Load {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 20)]
        long_lived: u32,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 2_000)]
        connect_timeout_ms: u64,
        #[arg(long, default_value_t = 2_000)]
        io_timeout_ms: u64,
    },
    /// Request/response latency over one persistent connection to an echo server:
    /// writes `size` bytes, reads them back, repeats. Prints {"round_trips", "p50_us",
    /// "p99_us", "mean_us", ...}.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        connect_timeout_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        io_timeout_ms: u64,
    },
    /// What istio/tcp-echo-server does: answers every line it reads with
    /// "<prefix> <line>", so a client sees which version answered.
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        prefix: String,
    },
    /// `count` connections one after another, each sending "<message>\n" and reading one
    /// line back; counts the replies by their first word. Prints {"replies": {word: n},
    /// "errors", "first_error", "elapsed_ms", "max_ms"}.
    Tally {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value = "test")]
        message: String,
        #[arg(long, default_value_t = 5_000)]
        connect_timeout_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        io_timeout_ms: u64,
        /// Wait this long after each connection closed before the next.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// `count` connections, each sending "<message>\n" and reading one line back, all kept
    /// open until every attempt has finished and `hold_ms` have passed since the start.
    /// Opened one after another, or all at once with `--concurrent`. Prints {"replies":
    /// {word: n}, "open" (connections that got a reply and stayed open), "errors",
    /// "first_error"}. With `--silent` a connection sends nothing and expects nothing
    /// (idle from its first moment); "open" then counts those the peer has neither
    /// closed nor reset, checked without sending.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value = "test")]
        message: String,
        #[arg(long)]
        concurrent: bool,
        #[arg(long)]
        silent: bool,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        #[arg(long, default_value_t = 5_000)]
        io_timeout_ms: u64,
    },
    /// UDP echo server (fortio's UDP echo): answers every datagram with the same bytes,
    /// or with "<prefix> <datagram>" when `--prefix` is given, so a client sees which
    /// backend answered.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        prefix: Option<String>,
    },
    /// `clients` UDP sockets (distinct source ports: ephemeral, or `--local-port-base`
    /// and up), each sending `count` datagrams "<message>\n" one after another and
    /// waiting for each reply. Prints {"sent", "received", "lost", "replies": {first
    /// word: n}, "from": [the distinct source addresses of the replies], "first_reply",
    /// "clients": [{"port", "words": [distinct first words, in order]}]}.
    UdpClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        clients: u32,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value = "test")]
        message: String,
        /// Bind the sockets to this port and the next ones (0: ephemeral ports).
        #[arg(long, default_value_t = 0)]
        local_port_base: u16,
        #[arg(long, default_value_t = 2_000)]
        timeout_ms: u64,
    },
    /// Accepts, reads a few bytes, then closes with SO_LINGER 0 (sends RST).
    ResetServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Accepts, reads until the client's FIN, then answers with the byte count.
    HalfCloseServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TLS server (TLS 1.3, rustls): per connection, reads application data until the
    /// client's close_notify, then answers "<bytes read>\n" and closes.
    TlsServer {
        #[arg(long)]
        listen: SocketAddr,
        /// PEM certificate chain, leaf first.
        #[arg(long)]
        cert: std::path::PathBuf,
        /// PEM private key (PKCS#8, SEC1 or PKCS#1).
        #[arg(long)]
        key: std::path::PathBuf,
    },
    /// TLS bulk throughput against `tls-server`: one connection, application data for
    /// `duration_ms`, then close_notify. Prints {"gbit_per_s" (bytes the server counted
    /// over the time until its count came back), "bytes_sent", "bytes_counted",
    /// "handshake_us", "cipher_suite", "error", ...}.
    TlsBulk {
        #[command(flatten)]
        tls: TlsClientArgs,
    },
    /// TLS handshakes per second against `tls-server`: new connections back to back on
    /// one thread, each a full handshake (no resumption), one byte, close_notify and the
    /// server's count. Prints {"handshakes", "errors", "per_second", "handshake_p50_us",
    /// "handshake_p99_us", ...}.
    TlsHandshakes {
        #[command(flatten)]
        tls: TlsClientArgs,
    },
    /// UDP datagrams per second against an echo server: one socket keeps `window`
    /// datagrams of `size` bytes in flight for `duration_ms`. Prints {"sent", "received",
    /// "lost", "per_second" (echoes received per second), "rtt_p50_us", "rtt_p99_us", ...}.
    UdpLoad {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        window: usize,
        #[arg(long)]
        duration_ms: u64,
        /// An echo not back within this many ms counts as lost.
        #[arg(long, default_value_t = 200)]
        loss_timeout_ms: u64,
    },
}

/// The TLS clients' arguments.
#[derive(clap::Args)]
struct TlsClientArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// The name sent as SNI and checked against the certificate.
    #[arg(long)]
    server_name: String,
    /// PEM file of the certificates to trust.
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long)]
    duration_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    connect_timeout_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    io_timeout_ms: u64,
}

impl TlsClientArgs {
    fn args(self) -> tls::ClientArgs {
        tls::ClientArgs {
            connect: self.connect,
            server_name: self.server_name,
            ca: self.ca,
            duration: Duration::from_millis(self.duration_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            io_timeout: Duration::from_millis(self.io_timeout_ms),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    raise_open_file_limit();
    let result = match cli.cmd {
        Cmd::Echo { listen, greeting } => serve(listen, move |s| echo(s, greeting.as_deref())),
        Cmd::TcpEcho { listen, prefix } => serve(listen, move |s| tcp_echo(s, &prefix)),
        Cmd::UdpEcho { listen, prefix } => udp_echo(listen, prefix.as_deref()),
        Cmd::UdpClient {
            connect,
            clients,
            count,
            message,
            local_port_base,
            timeout_ms,
        } => udp_client(
            connect,
            clients,
            count,
            &message,
            local_port_base,
            Duration::from_millis(timeout_ms),
        )
        .map(|report| println!("{report}")),
        Cmd::Tally {
            connect,
            count,
            message,
            connect_timeout_ms,
            io_timeout_ms,
            pause_ms,
        } => {
            let report = tally(
                connect,
                count,
                &message,
                Duration::from_millis(connect_timeout_ms),
                Duration::from_millis(io_timeout_ms),
                Duration::from_millis(pause_ms),
            );
            println!("{report}");
            Ok(())
        }
        Cmd::Hold {
            connect,
            count,
            message,
            concurrent,
            silent,
            hold_ms,
            io_timeout_ms,
        } => {
            let message = (!silent).then_some(message.as_str());
            let report = hold(
                connect,
                count,
                message,
                concurrent,
                Duration::from_millis(hold_ms),
                Duration::from_millis(io_timeout_ms),
            );
            println!("{report}");
            Ok(())
        }
        Cmd::ResetServer { listen } => serve(listen, reset),
        Cmd::HalfCloseServer { listen } => serve(listen, half_close),
        Cmd::TlsServer { listen, cert, key } => tls::server_config(&cert, &key)
            .and_then(|config| serve(listen, move |s| tls::serve_one(s, &config))),
        Cmd::TlsBulk { tls } => {
            emit(&tls::bulk(&tls.args()).to_string());
            Ok(())
        }
        Cmd::TlsHandshakes { tls } => {
            emit(&tls::handshakes(&tls.args()).to_string());
            Ok(())
        }
        Cmd::UdpLoad {
            connect,
            size,
            window,
            duration_ms,
            loss_timeout_ms,
        } => {
            emit(
                &udp::load(&udp::LoadArgs {
                    connect,
                    size,
                    window,
                    duration: Duration::from_millis(duration_ms),
                    loss_timeout: Duration::from_millis(loss_timeout_ms),
                })
                .to_string(),
            );
            Ok(())
        }
        Cmd::Client {
            connect,
            send_bytes,
            seed,
            half_close,
            expect_greeting,
            connect_timeout_ms,
            io_timeout_ms,
            ip_options,
        } => {
            let report = client(&ClientArgs {
                connect,
                send_bytes,
                seed,
                half_close,
                expect_greeting,
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                io_timeout: Duration::from_millis(io_timeout_ms),
                ip_options,
            });
            emit(&report.to_string());
            Ok(())
        }
        Cmd::Connrate {
            connect,
            duration_ms,
            concurrency,
            connect_timeout_ms,
            io_timeout_ms,
            linger_zero,
        } => {
            let report = connrate(&ConnrateArgs {
                connect,
                duration: Duration::from_millis(duration_ms),
                concurrency: concurrency.max(1),
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                io_timeout: Duration::from_millis(io_timeout_ms),
                linger_zero,
            });
            emit(&report.to_string());
            Ok(())
        }
        Cmd::Load {
            connect,
            duration_ms,
            long_lived,
            interval_ms,
            connect_timeout_ms,
            io_timeout_ms,
        } => {
            let report = load(&LoadArgs {
                connect,
                duration: Duration::from_millis(duration_ms),
                long_lived,
                interval: Duration::from_millis(interval_ms),
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                io_timeout: Duration::from_millis(io_timeout_ms),
            });
            emit(&report.to_string());
            Ok(())
        }
        Cmd::Rr {
            connect,
            size,
            duration_ms,
            connect_timeout_ms,
            io_timeout_ms,
        } => {
            let report = rr(
                connect,
                size.max(1),
                Duration::from_millis(duration_ms),
                Duration::from_millis(connect_timeout_ms),
                Duration::from_millis(io_timeout_ms),
            );
            emit(&report.to_string());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tb-pod: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The open-file soft limit up to the hard one: a server or `hold` with thousands of
/// connections needs more than the 1,024 runtimes default to. Best effort.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            eprintln!("tb-pod: raising the open-file limit: {e}");
        }
    }
}

/// One line to stdout, flushed at once: tests read these while the process runs.
fn emit(line: &str) {
    let mut out = io::stdout().lock();
    // A test that stopped reading is not this process's problem.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A server's event line, unless `--quiet`.
fn event(value: serde_json::Value) {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        emit(&value.to_string());
    }
}

fn addr_string(r: io::Result<SocketAddr>) -> Option<String> {
    r.ok().map(|a| a.to_string())
}

/// Listen backlog of the servers. std's 128 overflows when hundreds of connections arrive
/// at once through a proxy, and then a handshake the kernel finished with a SYN cookie is
/// lost for good if its final ACK meets the full accept queue and the client never sends.
const BACKLOG: i32 = 4096;

/// `TcpListener::bind` with [`BACKLOG`] (the kernel caps it at `net.core.somaxconn`).
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    // What std sets before binding, so a restarted server can take its port at once.
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(TcpListener::from(fd))
}

/// The accepted socket's `SO_MARK`: with `tcp_fwmark_accept` on in the pod (the mesh
/// preserving client addresses), the mark of the SYN, so a test tells a connection from
/// the inbound proxy (0x1501, or 0x1500 from the pod's own address) from a direct one (0).
fn socket_mark(stream: &TcpStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    const SOL_SOCKET: i32 = 1;
    const SO_MARK: i32 = 36;
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as u32;
    // SAFETY: a valid fd, and a u32 buffer of the length passed.
    let rc = unsafe {
        getsockopt(
            stream.as_raw_fd(),
            SOL_SOCKET,
            SO_MARK,
            std::ptr::from_mut(&mut mark).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(mark)
}

/// Binds, announces READY and hands each connection to `handle` on its own thread.
fn serve<F>(listen: SocketAddr, handle: F) -> io::Result<()>
where
    F: Fn(TcpStream) + Send + Sync + Clone + 'static,
{
    let listener = bind_listener(listen)?;
    emit(&format!("READY {}", listener.local_addr()?));
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            // The peer may reset between SYN and accept; keep serving.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        event(json!({
            "event": "accept",
            "peer": peer.to_string(),
            "local": addr_string(stream.local_addr()),
            "mark": socket_mark(&stream),
        }));
        let handle = handle.clone();
        std::thread::spawn(move || handle(stream));
    }
}

fn tcp_echo(s: TcpStream, prefix: &str) {
    let Ok(mut writer) = s.try_clone() else {
        return;
    };
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{prefix} {line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

fn udp_echo(listen: SocketAddr, prefix: Option<&str>) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind(listen)?;
    emit(&format!("READY {}", socket.local_addr()?));
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, peer) = socket.recv_from(&mut buf)?;
        event(json!({"event": "datagram", "peer": peer.to_string(), "len": len}));
        let reply = match prefix {
            Some(prefix) => [prefix.as_bytes(), b" ", &buf[..len]].concat(),
            None => buf[..len].to_vec(),
        };
        socket.send_to(&reply, peer)?;
    }
}

fn udp_client(
    connect: SocketAddr,
    clients: u32,
    count: u32,
    message: &str,
    local_port_base: u16,
    timeout: Duration,
) -> io::Result<serde_json::Value> {
    use std::collections::BTreeMap;
    let datagram = format!("{message}\n");
    let (mut sent, mut received) = (0u64, 0u64);
    let mut replies: BTreeMap<String, u64> = BTreeMap::new();
    let mut from: Vec<String> = Vec::new();
    let mut first_reply = None;
    let mut per_client = Vec::new();
    let mut buf = vec![0u8; 65_536];
    for i in 0..clients {
        let port = match local_port_base {
            0 => 0,
            base => u16::try_from(u32::from(base) + i)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "port beyond 65535"))?,
        };
        let socket = std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
        socket.set_read_timeout(Some(timeout))?;
        let mut words: Vec<String> = Vec::new();
        for _ in 0..count {
            socket.send_to(datagram.as_bytes(), connect)?;
            sent += 1;
            // Until the reply, or the timeout (lost); an ICMP error counts as lost too.
            let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                continue;
            };
            received += 1;
            let text = String::from_utf8_lossy(&buf[..len]).trim_end().to_owned();
            let word = text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            *replies.entry(word.clone()).or_default() += 1;
            if !words.contains(&word) {
                words.push(word);
            }
            if !from.contains(&peer.to_string()) {
                from.push(peer.to_string());
            }
            first_reply.get_or_insert(text);
        }
        per_client.push(json!({"port": socket.local_addr()?.port(), "words": words}));
    }
    Ok(json!({
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "replies": replies,
        "from": from,
        "first_reply": first_reply,
        "clients": per_client,
    }))
}

fn tally(
    connect: SocketAddr,
    count: u32,
    message: &str,
    connect_timeout: Duration,
    io_timeout: Duration,
    pause: Duration,
) -> serde_json::Value {
    let mut replies: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut errors, mut first_error) = (0u64, None);
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..count {
        if i > 0 && !pause.is_zero() {
            std::thread::sleep(pause);
        }
        let began = Instant::now();
        let one = ask(connect, message, connect_timeout, io_timeout).map(|(word, _)| word);
        slowest = slowest.max(began.elapsed());
        match one {
            Ok(word) => *replies.entry(word).or_default() += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| describe(&e));
            }
        }
    }
    json!({
        "replies": replies,
        "errors": errors,
        "first_error": first_error,
        "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
        "max_ms": slowest.as_secs_f64() * 1000.0,
    })
}

/// One connection that sent "<message>\n" and read a line back: the line's first word,
/// and the still open connection.
fn ask(
    connect: SocketAddr,
    message: &str,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> io::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&connect, connect_timeout)?;
    s.set_read_timeout(Some(io_timeout))?;
    s.write_all(format!("{message}\n").as_bytes())?;
    let mut line = String::new();
    // One byte at a time: nothing past the line is consumed, and the stream stays ours.
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0] as char),
        }
    }
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"));
    }
    let word = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok((word, s))
}

/// A connection that sends nothing: connected, and the word "" for the tally.
fn connect_silent(connect: SocketAddr, timeout: Duration) -> io::Result<(String, TcpStream)> {
    Ok((
        String::new(),
        TcpStream::connect_timeout(&connect, timeout)?,
    ))
}

/// Whether the peer has neither closed nor reset `stream`, seen without sending: a
/// non-blocking peek that finds nothing to read.
fn open_without_sending(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let open = matches!(stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    let _ = stream.set_nonblocking(false);
    open
}

/// `message` `None`: silent connections (see `Cmd::Hold`).
fn hold(
    connect: SocketAddr,
    count: u32,
    message: Option<&str>,
    concurrent: bool,
    hold: Duration,
    io_timeout: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    let ask = |connect, message: Option<&str>, connect_timeout, io_timeout| match message {
        Some(message) => ask(connect, message, connect_timeout, io_timeout),
        None => connect_silent(connect, connect_timeout),
    };
    let results: Vec<io::Result<(String, TcpStream)>> = if concurrent {
        let barrier = std::sync::Barrier::new(count as usize);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..count)
                .map(|_| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        // Every thread is ready before any connects: the attempts overlap.
                        barrier.wait();
                        ask(connect, message, io_timeout, io_timeout)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
                })
                .collect()
        })
    } else {
        (0..count)
            .map(|_| ask(connect, message, io_timeout, io_timeout))
            .collect()
    };
    let mut replies: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut errors, mut first_error) = (0u64, None);
    let mut open = Vec::new();
    for result in results {
        match result {
            Ok((word, stream)) => {
                if message.is_some() {
                    *replies.entry(word).or_default() += 1;
                }
                open.push(stream);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| describe(&e));
            }
        }
    }
    // Still open: a connection the proxy reset after its reply would fail to write now.
    let mut still_open = 0u64;
    for stream in &mut open {
        let alive = if message.is_some() {
            stream.write_all(b"x\n").is_ok() && stream.flush().is_ok()
        } else {
            open_without_sending(stream)
        };
        if alive {
            still_open += 1;
        }
    }
    if let Some(rest) = hold.checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    json!({
        "replies": replies,
        "open": still_open,
        "errors": errors,
        "first_error": first_error,
        "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
    })
}

fn echo(mut s: TcpStream, greeting: Option<&str>) {
    let peer = addr_string(s.peer_addr());
    let mut total: u64 = 0;
    let outcome = (|| -> io::Result<()> {
        if let Some(g) = greeting {
            s.write_all(format!("{g}\n").as_bytes())?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            s.write_all(&buf[..n])?;
            total += n as u64;
        }
        // The client's FIN has arrived; everything is written, so pass the FIN on.
        s.flush()?;
        s.shutdown(Shutdown::Write)
    })();
    event(json!({
        "event": "close",
        "peer": peer,
        "bytes": total,
        "error": outcome.err().map(|e| describe(&e)),
    }));
}

fn reset(mut s: TcpStream) {
    let peer = addr_string(s.peer_addr());
    let mut buf = [0u8; 64];
    let read = s.read(&mut buf).unwrap_or(0);
    // Linger 0 makes close() send RST instead of FIN.
    let linger = rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO));
    drop(s);
    event(json!({
        "event": "reset",
        "peer": peer,
        "read": read,
        "error": linger.err().map(|e| e.to_string()),
    }));
}

fn half_close(mut s: TcpStream) {
    let peer = addr_string(s.peer_addr());
    let mut got = Vec::new();
    let outcome = s.read_to_end(&mut got).and_then(|n| {
        s.write_all(format!("got {n} bytes after your FIN\n").as_bytes())?;
        s.flush()?;
        s.shutdown(Shutdown::Write)
    });
    event(json!({
        "event": "close",
        "peer": peer,
        "bytes": got.len(),
        "error": outcome.err().map(|e| describe(&e)),
    }));
}

/// Short, stable words for the errors tests assert on.
fn describe(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        BrokenPipe => "broken pipe".into(),
        TimedOut | WouldBlock => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        UnexpectedEof => "unexpected eof".into(),
        _ => e.to_string(),
    }
}

struct ClientArgs {
    connect: SocketAddr,
    send_bytes: u64,
    seed: u64,
    half_close: bool,
    expect_greeting: bool,
    connect_timeout: Duration,
    io_timeout: Duration,
    ip_options: bool,
}

/// xorshift64*: deterministic bytes from a seed, so both ends can agree on content.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn client(a: &ClientArgs) -> serde_json::Value {
    let start = Instant::now();
    let mut report = json!({
        "connect": a.connect.to_string(),
        "local": null, "peer": null, "greeting": null,
        "sent": 0, "received": 0,
        "sent_sha256": hex(Sha256::digest(b"")),
        "received_sha256": hex(Sha256::digest(b"")),
        "half_close": a.half_close,
        "ip_options": a.ip_options,
        "error": null, "elapsed_ms": 0,
    });
    let error = run_client(a, &mut report).err();
    report["error"] = json!(error.map(|e| describe(&e)));
    report["elapsed_ms"] = json!(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
    report
}

fn run_client(a: &ClientArgs, report: &mut serde_json::Value) -> io::Result<()> {
    let stream = if a.ip_options {
        connect_with_ip_options(a.connect, a.connect_timeout)?
    } else {
        TcpStream::connect_timeout(&a.connect, a.connect_timeout)?
    };
    report["local"] = json!(addr_string(stream.local_addr()));
    report["peer"] = json!(addr_string(stream.peer_addr()));
    stream.set_read_timeout(Some(a.io_timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if a.expect_greeting {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        report["greeting"] = json!(line.trim_end_matches('\n'));
    }
    // The writer runs on its own thread: a peer that echoes fills our receive buffer,
    // and only concurrent reading keeps it from stalling the send.
    let mut writer = stream;
    let (send_bytes, seed) = (a.send_bytes, a.seed);
    let sender = std::thread::spawn(move || {
        let mut rng = XorShift::new(seed);
        let mut hash = Sha256::new();
        let mut sent: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let mut result = Ok(());
        while sent < send_bytes {
            let n = usize::try_from((send_bytes - sent).min(buf.len() as u64)).unwrap_or(0);
            rng.fill(&mut buf[..n]);
            if let Err(e) = writer.write_all(&buf[..n]) {
                result = Err(e);
                break;
            }
            hash.update(&buf[..n]);
            sent += n as u64;
        }
        if result.is_ok() {
            result = writer.shutdown(Shutdown::Write);
        }
        (sent, hex(hash.finalize()), result)
    });
    let mut hash = Sha256::new();
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hash.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    report["received"] = json!(received);
    report["received_sha256"] = json!(hex(hash.finalize()));
    if read_result.is_err() {
        // Unblock a writer stuck on a peer that stopped reading.
        let _ = reader.get_ref().shutdown(Shutdown::Both);
    }
    let (sent, sent_sha, write_result) = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    report["sent"] = json!(sent);
    report["sent_sha256"] = json!(sent_sha);
    // What the reader saw is the more telling error (a RST shows up there as a reset,
    // on the writer only as a broken pipe).
    read_result.and(write_result)
}

/// Three IPOPT_NOOP and IPOPT_END: 4 bytes of valid options that mean nothing.
const NOOP_OPTIONS: [u8; 4] = [1, 1, 1, 0];

/// Linux's `IP_OPTIONS` (level `IPPROTO_IP`, 0).
const IP_OPTIONS: std::os::raw::c_int = 4;

extern "C" {
    // From the C library std already links; rustix has no SO_MARK getter.
    fn getsockopt(
        fd: std::os::raw::c_int,
        level: std::os::raw::c_int,
        name: std::os::raw::c_int,
        value: *mut std::os::raw::c_void,
        len: *mut u32,
    ) -> std::os::raw::c_int;
    // From the C library std already links; rustix has no IP_OPTIONS setter.
    fn setsockopt(
        fd: std::os::raw::c_int,
        level: std::os::raw::c_int,
        name: std::os::raw::c_int,
        value: *const std::os::raw::c_void,
        len: u32,
    ) -> std::os::raw::c_int;
}

fn set_ip_options(fd: std::os::fd::BorrowedFd<'_>, options: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = u32::try_from(options.len()).map_err(|_| io::Error::other("options too long"))?;
    // SAFETY: `fd` is a live socket for the duration of the call, and the kernel reads
    // exactly `len` bytes from `options`, which is that long.
    let rc = unsafe { setsockopt(fd.as_raw_fd(), 0, IP_OPTIONS, options.as_ptr().cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP connection whose packets all carry [`NOOP_OPTIONS`]: the option is set before
/// connect, so the SYN has it too. The connect timeout is SO_SNDTIMEO, which a blocking
/// connect honours (it then fails with EINPROGRESS).
fn connect_with_ip_options(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    use std::os::fd::AsFd;
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::other("--ip-options needs an IPv4 address"));
    };
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    set_ip_options(fd.as_fd(), &NOOP_OPTIONS)?;
    if !timeout.is_zero() {
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(timeout))?;
    }
    match rustix::net::connect(&fd, &v4) {
        Ok(()) => {}
        Err(rustix::io::Errno::INPROGRESS) => return Err(io::ErrorKind::TimedOut.into()),
        Err(e) => return Err(e.into()),
    }
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, None)?;
    Ok(TcpStream::from(fd))
}

struct ConnrateArgs {
    connect: SocketAddr,
    duration: Duration,
    concurrency: u32,
    connect_timeout: Duration,
    io_timeout: Duration,
    linger_zero: bool,
}

/// How long one exchange's steps took, from the start of `connect` (nanoseconds).
#[derive(Clone, Copy)]
struct ExchangeTimes {
    /// Until `connect` returned: through a proxy, the handshake with its listener.
    connect_ns: u64,
    /// Until the echoed byte was read: the round trip to the server itself, which through
    /// a proxy includes the proxy choosing and reaching the endpoint.
    first_echo_ns: u64,
}

/// One connection: connect, 1 byte out, the same byte back, close.
fn one_exchange(a: &ConnrateArgs) -> io::Result<ExchangeTimes> {
    let t0 = Instant::now();
    let ns = || u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut s = TcpStream::connect_timeout(&a.connect, a.connect_timeout)?;
    let connect_ns = ns();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(a.io_timeout))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let first_echo_ns = ns();
    if b != *b"x" {
        return Err(io::Error::other("echoed byte differs"));
    }
    if a.linger_zero {
        rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO))?;
    }
    Ok(ExchangeTimes {
        connect_ns,
        first_echo_ns,
    })
}

/// What one connrate worker saw.
#[derive(Default)]
struct ConnrateWorker {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    connect_ns: Vec<u64>,
    first_echo_ns: Vec<u64>,
}

fn connrate(a: &ConnrateArgs) -> serde_json::Value {
    let start = Instant::now();
    let deadline = start + a.duration;
    let per_thread: Vec<ConnrateWorker> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..a.concurrency)
            .map(|_| {
                s.spawn(|| {
                    let mut w = ConnrateWorker::default();
                    while Instant::now() < deadline {
                        match one_exchange(a) {
                            Ok(times) => {
                                w.ok += 1;
                                w.connect_ns.push(times.connect_ns);
                                w.first_echo_ns.push(times.first_echo_ns);
                            }
                            Err(e) => {
                                w.errors += 1;
                                w.first_error.get_or_insert_with(|| describe(&e));
                            }
                        }
                    }
                    w
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| ConnrateWorker {
                    errors: 1,
                    first_error: Some("worker panicked".into()),
                    ..ConnrateWorker::default()
                })
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let connections: u64 = per_thread.iter().map(|t| t.ok).sum();
    let errors: u64 = per_thread.iter().map(|t| t.errors).sum();
    let mut connect_ns: Vec<u64> = per_thread
        .iter()
        .flat_map(|t| t.connect_ns.iter().copied())
        .collect();
    connect_ns.sort_unstable();
    let mut first_echo_ns: Vec<u64> = per_thread
        .iter()
        .flat_map(|t| t.first_echo_ns.iter().copied())
        .collect();
    first_echo_ns.sort_unstable();
    let first_error = per_thread.into_iter().find_map(|t| t.first_error);
    json!({
        "connect": a.connect.to_string(),
        "concurrency": a.concurrency,
        "connections": connections,
        "errors": errors,
        "first_error": first_error,
        "connect_p50_us": percentile(&connect_ns, 50.0) as f64 / 1000.0,
        "connect_p99_us": percentile(&connect_ns, 99.0) as f64 / 1000.0,
        "first_echo_p50_us": percentile(&first_echo_ns, 50.0) as f64 / 1000.0,
        "first_echo_p99_us": percentile(&first_echo_ns, 99.0) as f64 / 1000.0,
        "per_second": connections as f64 / elapsed.as_secs_f64().max(1e-9),
        "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}

struct LoadArgs {
    connect: SocketAddr,
    duration: Duration,
    long_lived: u32,
    interval: Duration,
    connect_timeout: Duration,
    io_timeout: Duration,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One long-lived connection: a numbered line every `interval`, echoed back, until the
/// deadline or the first failure (when it is reported broken).
fn long_lived(a: &LoadArgs, index: u32, deadline: Instant) -> serde_json::Value {
    let mut exchanges = 0u64;
    let result = (|| -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&a.connect, a.connect_timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(a.io_timeout))?;
        while Instant::now() < deadline {
            let line = format!("long-lived {index} exchange {exchanges}\n");
            s.write_all(line.as_bytes())?;
            let mut back = vec![0u8; line.len()];
            s.read_exact(&mut back)?;
            if back != line.as_bytes() {
                return Err(io::Error::other("echoed line differs"));
            }
            exchanges += 1;
            std::thread::sleep(a.interval);
        }
        Ok(())
    })();
    match result {
        Ok(()) => json!({"exchanges": exchanges, "broken_at_unix_ms": null, "error": null}),
        Err(e) => json!({"exchanges": exchanges, "broken_at_unix_ms": unix_ms(),
            "error": describe(&e)}),
    }
}

fn load(a: &LoadArgs) -> serde_json::Value {
    let started_unix_ms = unix_ms();
    let deadline = Instant::now() + a.duration;
    let exchange = ConnrateArgs {
        connect: a.connect,
        duration: a.duration,
        concurrency: 1,
        connect_timeout: a.connect_timeout,
        io_timeout: a.io_timeout,
        linger_zero: true,
    };
    std::thread::scope(|scope| {
        let long: Vec<_> = (0..a.long_lived)
            .map(|i| scope.spawn(move || long_lived(a, i, deadline)))
            .collect();
        let (mut ok, mut failed, mut failures) = (0u64, 0u64, Vec::new());
        let (mut last_ok, mut max_gap_ms) = (Instant::now(), 0u64);
        let mut last_ok_unix_ms = 0;
        while Instant::now() < deadline {
            match one_exchange(&exchange) {
                Ok(_) => {
                    ok += 1;
                    let gap = u64::try_from(last_ok.elapsed().as_millis()).unwrap_or(u64::MAX);
                    max_gap_ms = max_gap_ms.max(gap);
                    last_ok = Instant::now();
                    last_ok_unix_ms = unix_ms();
                }
                Err(e) => {
                    failed += 1;
                    // The first ones say what went wrong; a flood of them adds nothing.
                    if failures.len() < 50 {
                        failures.push(json!({"at_unix_ms": unix_ms(), "error": describe(&e)}));
                    }
                }
            }
        }
        let long: Vec<serde_json::Value> = long
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| json!({"error": "thread panicked"}))
            })
            .collect();
        json!({
            "started_unix_ms": started_unix_ms,
            "new": {"ok": ok, "failed": failed, "failures": failures,
                "max_gap_ms": max_gap_ms, "last_ok_unix_ms": last_ok_unix_ms},
            "long_lived": long,
        })
    })
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rr(
    connect: SocketAddr,
    size: usize,
    duration: Duration,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> serde_json::Value {
    let start = Instant::now();
    let mut samples: Vec<u64> = Vec::new();
    let outcome = (|| -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&connect, connect_timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(io_timeout))?;
        let mut request = vec![0u8; size];
        XorShift::new(size as u64).fill(&mut request);
        let mut response = vec![0u8; size];
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            let t0 = Instant::now();
            s.write_all(&request)?;
            s.read_exact(&mut response)?;
            samples.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
            if response != request {
                return Err(io::Error::other("echoed bytes differ"));
            }
        }
        s.shutdown(Shutdown::Write)
    })();
    let elapsed = start.elapsed();
    samples.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let mean = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|&n| n as f64).sum::<f64>() / samples.len() as f64 / 1000.0
    };
    json!({
        "connect": connect.to_string(),
        "size": size,
        "round_trips": samples.len(),
        "p50_us": us(percentile(&samples, 50.0)),
        "p99_us": us(percentile(&samples, 99.0)),
        "mean_us": mean,
        "min_us": us(samples.first().copied().unwrap_or(0)),
        "max_us": us(samples.last().copied().unwrap_or(0)),
        "error": outcome.err().map(|e| describe(&e)),
        "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_deterministic() {
        let mut a = vec![0u8; 100];
        XorShift::new(7).fill(&mut a);
        let mut b = vec![0u8; 100];
        XorShift::new(7).fill(&mut b);
        assert_eq!(a, b);
        let mut c = vec![0u8; 100];
        XorShift::new(8).fill(&mut c);
        assert_ne!(a, c);
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn describes_errors_in_stable_words() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(describe(&e), "connection refused");
        let e = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(describe(&e), "connection reset");
    }
}
