//! How idle CPUs wait during a run, and holding them to polling.
//!
//! On a VM whose idle CPUs halt (the cpuidle `haltpoll` driver with
//! `guest_halt_poll_ns=0`, as on the machines these sessions run on), waking a sleeping
//! CPU is an exit to the hypervisor and back. A 64-byte round trip between two pods of
//! one node measured 67.7 µs direct and 51.6 µs through our proxy (a busier path leaves
//! fewer CPUs halted; bench/results/2026-12-07-vm-system-idle.md), so the figures ranked
//! paths by the halts they hit rather than by their own work. tb-bench therefore holds a
//! PM QoS request of 0 µs on `/dev/cpu_dma_latency` for the run, as tuned's
//! `latency-performance` profile does (with 3 µs): the cpuidle governor then polls
//! instead of halting, and the same direct round trip measured 11.4 µs
//! (bench/results/2026-12-07-vm.md). The kernel drops the request when the file is closed, also when tb-bench
//! dies. `--cpu-idle system` measures with the machine's own idle states instead.

use std::fs::File;
use std::io::Write;

use anyhow::{Context, Result};

const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";

/// The latency held while open; dropping it hands idle back to the system.
#[derive(Debug)]
pub struct LatencyHold {
    _device: File,
    us: u32,
}

impl LatencyHold {
    /// Requests that no CPU take an idle state slower to leave than `us` microseconds.
    pub fn hold(us: u32) -> Result<Self> {
        let value = i32::try_from(us).context("PM QoS latency out of range")?;
        let mut device = File::options()
            .write(true)
            .open(PM_QOS_DEVICE)
            .with_context(|| format!("opening {PM_QOS_DEVICE}"))?;
        // The device takes the value as a native s32 (or as hex text); the request
        // lives as long as this descriptor.
        device
            .write_all(&value.to_ne_bytes())
            .with_context(|| format!("writing {us} to {PM_QOS_DEVICE}"))?;
        Ok(Self {
            _device: device,
            us,
        })
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// One line for the result files: the cpuidle driver and governor, the guest halt
/// polling window when the driver is `haltpoll`, and whether tb-bench held idle to
/// polling.
pub fn describe(hold: Option<&LatencyHold>) -> String {
    let driver = read_trimmed("/sys/devices/system/cpu/cpuidle/current_driver");
    let governor = read_trimmed("/sys/devices/system/cpu/cpuidle/current_governor_ro")
        .or_else(|| read_trimmed("/sys/devices/system/cpu/cpuidle/current_governor"));
    let halt_poll = read_trimmed("/sys/module/haltpoll/parameters/guest_halt_poll_ns");
    let mut s = format!(
        "cpuidle driver {}, governor {}",
        driver.as_deref().unwrap_or("none"),
        governor.as_deref().unwrap_or("none")
    );
    if let (Some("haltpoll"), Some(ns)) = (driver.as_deref(), halt_poll) {
        s.push_str(&format!(", guest_halt_poll_ns {ns}"));
    }
    match hold {
        Some(h) => s.push_str(&format!(
            "; tb-bench held {PM_QOS_DEVICE} at {} µs for the run (idle CPUs poll instead \
             of halting)",
            h.us
        )),
        None => s.push_str("; idle left to the system (--cpu-idle system)"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Privileged, like the testbed: it fails without root rather than skip.
    #[test]
    fn the_hold_is_visible_in_the_device_and_gone_with_it() {
        assert!(
            rustix::process::geteuid().is_root(),
            "writing {PM_QOS_DEVICE} needs root"
        );
        let read = || {
            let bytes = std::fs::read(PM_QOS_DEVICE).expect("reading the PM QoS device");
            i32::from_ne_bytes(bytes[..4].try_into().expect("an s32"))
        };
        let before = read();
        let hold = LatencyHold::hold(0).expect("holding 0 µs");
        assert_eq!(read(), 0, "the machine-wide request is the lowest one held");
        assert!(describe(Some(&hold)).contains("held /dev/cpu_dma_latency at 0 µs"));
        drop(hold);
        assert_eq!(read(), before, "closing the device drops the request");
        assert!(describe(None).contains("--cpu-idle system"));
    }
}
