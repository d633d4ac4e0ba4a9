//! `tb-pod udp-load`: keeps a window of datagrams in flight from one socket to an echo
//! server (`tb-pod udp-echo`) and counts the echoes, with their round trips.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::json;

pub struct LoadArgs {
    pub connect: SocketAddr,
    pub size: usize,
    pub window: usize,
    pub duration: Duration,
    /// An echo not back this long after its datagram was sent counts as lost.
    pub loss_timeout: Duration,
}

/// `udp-load`: one connected socket; `window` datagrams of `size` bytes in flight (each
/// carries its sequence number in its first 8 bytes); each echo frees a slot for the
/// next datagram. Datagrams whose echo does not come within `loss_timeout` count as
/// lost and free their slots.
pub fn load(a: &LoadArgs) -> serde_json::Value {
    let size = a.size.max(8);
    let window = a.window.max(1);
    let start = Instant::now();
    let mut in_flight: HashMap<u64, Instant> = HashMap::with_capacity(window * 2);
    let (mut sent, mut received, mut lost, mut late) = (0u64, 0u64, 0u64, 0u64);
    let mut rtt_ns: Vec<u64> = Vec::new();
    let outcome = (|| -> io::Result<()> {
        let bind: SocketAddr = if a.connect.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = UdpSocket::bind(bind)?;
        sock.connect(a.connect)?;
        sock.set_read_timeout(Some(Duration::from_millis(10)))?;
        let mut out = vec![0u8; size];
        crate::XorShift::new(size as u64).fill(&mut out);
        let mut back = vec![0u8; 65_536];
        let deadline = start + a.duration;
        while Instant::now() < deadline {
            while in_flight.len() < window {
                out[..8].copy_from_slice(&sent.to_be_bytes());
                // Before the send: on a veth or loopback path the send can carry the
                // datagram through the stack, the echo server included, before it returns.
                let at = Instant::now();
                match sock.send(&out) {
                    Ok(_) => {}
                    // ICMP port unreachable from an earlier datagram: not there yet.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e),
                }
                in_flight.insert(sent, at);
                sent += 1;
            }
            match sock.recv(&mut back) {
                Ok(n) if n >= 8 => {
                    let seq = u64::from_be_bytes(back[..8].try_into().expect("8 bytes"));
                    match in_flight.remove(&seq) {
                        Some(t) if n == size => {
                            received += 1;
                            rtt_ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        }
                        Some(_) => return Err(io::Error::other("an echo of another size")),
                        None => late += 1,
                    }
                }
                Ok(_) => return Err(io::Error::other("an echo shorter than 8 bytes")),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            let before = in_flight.len();
            in_flight.retain(|_, t| now.duration_since(*t) < a.loss_timeout);
            lost += (before - in_flight.len()) as u64;
        }
        Ok(())
    })();
    let elapsed = start.elapsed();
    rtt_ns.sort_unstable();
    let us = |p| crate::percentile(&rtt_ns, p) as f64 / 1000.0;
    json!({
        "connect": a.connect.to_string(),
        "size": size,
        "window": window,
        "sent": sent,
        "received": received,
        "lost": lost,
        "late": late,
        "unanswered_at_end": in_flight.len(),
        "per_second": received as f64 / elapsed.as_secs_f64().max(1e-9),
        "rtt_p50_us": us(50.0),
        "rtt_p99_us": us(99.0),
        "error": outcome.err().map(|e| crate::describe(&e)),
        "elapsed_ms": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}
