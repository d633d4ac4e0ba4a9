//! eBPF mode: the embedded Aya object, attached at a cgroup v2 path and pinned under the
//! agent's own bpffs directory.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SockOps};
use aya::Ebpf;
use interceptor_common::{capacity, config, counters, maps, EnrolledPod};

use super::{Datapath, DatapathCounters, DatapathError, PodDatapath};

/// The object built from `interceptor-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

pub const PROG_CONNECT4: &str = "intercept_connect4";
pub const PROG_SOCK_OPS: &str = "intercept_sock_ops";
pub const PROG_GETSOCKOPT: &str = "intercept_getsockopt";

/// Load, attach at the cgroup, and pin one program. A macro because aya's program
/// types share `load`/`attach`/`pin` by name, not through a trait.
macro_rules! attach_cgroup_program {
    ($ebpf:expr, $kind:ty, $name:expr, $cgroup:expr, $pin_dir:expr) => {{
        let name: &'static str = $name;
        let err = |source| DatapathError::Program { name, source };
        let prog: &mut $kind = program(&mut $ebpf, name)?;
        prog.load().map_err(err)?;
        prog.attach($cgroup, attach_mode()).map_err(err)?;
        let path = $pin_dir.join(name);
        prog.pin(&path).map_err(|source| DatapathError::Pin {
            path: path.display().to_string(),
            source,
        })?;
    }};
}

/// Programs loaded and attached; dropping it detaches them (the links are owned here).
pub struct EbpfDatapath {
    /// Keeps programs and their links alive.
    _ebpf: Ebpf,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    settings: Mutex<Array<MapData, u32>>,
    counters: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl EbpfDatapath {
    /// Load the programs, attach them at `cgroup`, and pin programs and maps in
    /// `pin_dir` (which must not be in use by another agent).
    pub fn attach(cgroup: &Path, pin_dir: &Path, debug: bool) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::Bpffs {
                path: pin_dir.display().to_string(),
                reason: "this binary was built with AYA_BUILD_SKIP: it carries no eBPF object"
                    .into(),
            });
        }
        super::bpffs::ensure_pin_dir(pin_dir)?;
        let cgroup_err = |source| DatapathError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        };
        if !super::cgroup::is_cgroup2(cgroup) {
            return Err(cgroup_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a cgroup v2 directory",
            )));
        }
        let cgroup_file = File::open(cgroup).map_err(cgroup_err)?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(DatapathError::Load)?;

        attach_cgroup_program!(ebpf, CgroupSockAddr, PROG_CONNECT4, &cgroup_file, pin_dir);
        attach_cgroup_program!(ebpf, SockOps, PROG_SOCK_OPS, &cgroup_file, pin_dir);
        attach_cgroup_program!(ebpf, CgroupSockopt, PROG_GETSOCKOPT, &cgroup_file, pin_dir);
        for name in [
            maps::ENROLLED_NETNS,
            maps::ORIG_DST_BY_COOKIE,
            maps::ORIG_DST_BY_FLOW,
            maps::SETTINGS,
            maps::COUNTERS,
        ] {
            let map = ebpf.map(name).ok_or(DatapathError::MissingMap { name })?;
            let path = pin_dir.join(name);
            map.pin(&path).map_err(|source| DatapathError::Pin {
                path: path.display().to_string(),
                source,
            })?;
        }

        let enrolled =
            HashMap::try_from(take_map(&mut ebpf, maps::ENROLLED_NETNS)?).map_err(|source| {
                DatapathError::Map {
                    name: maps::ENROLLED_NETNS,
                    source,
                }
            })?;
        let settings = Array::try_from(take_map(&mut ebpf, maps::SETTINGS)?).map_err(|source| {
            DatapathError::Map {
                name: maps::SETTINGS,
                source,
            }
        })?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, maps::COUNTERS)?).map_err(|source| {
                DatapathError::Map {
                    name: maps::COUNTERS,
                    source,
                }
            })?;
        let datapath = Self {
            _ebpf: ebpf,
            enrolled: Mutex::new(enrolled),
            settings: Mutex::new(settings),
            counters,
            pin_dir: pin_dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        };
        datapath.set_debug(debug)?;
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// netns cookies currently in the enrolled map (for the config dump and tests).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        let map = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().filter_map(Result::ok).collect()
    }
}

/// bpf_link cgroup attachments (kernel ≥ 5.7, what aya uses there) are always
/// multi-attach and reject any flag; older kernels fall back to BPF_PROG_ATTACH, where
/// we must ask for multi-attach so we coexist with other programs on the cgroup.
fn attach_mode() -> CgroupAttachMode {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::MissingMap { name })
}

impl Datapath for EbpfDatapath {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn enroll(&self, pod: PodDatapath) -> Result<(), DatapathError> {
        let mut map = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        let value = EnrolledPod {
            ipv4: u32::from_ne_bytes(pod.ipv4.octets()),
            flags: 0,
        };
        map.insert(pod.netns_cookie, value, 0)
            .map_err(|source| match &source {
                aya::maps::MapError::SyscallError(e)
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    DatapathError::MapFull {
                        map: maps::ENROLLED_NETNS,
                        capacity: capacity::ENROLLED_NETNS,
                    }
                }
                _ => DatapathError::Map {
                    name: maps::ENROLLED_NETNS,
                    source,
                },
            })
    }

    fn unenroll(&self, pod: PodDatapath) -> Result<(), DatapathError> {
        let mut map = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        match map.remove(&pod.netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(DatapathError::Map {
                name: maps::ENROLLED_NETNS,
                source,
            }),
        }
    }

    fn set_debug(&self, on: bool) -> Result<(), DatapathError> {
        let mut settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let flags = if on { config::FLAG_DEBUG } else { 0 };
        settings
            .set(config::FLAGS_INDEX, flags, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::SETTINGS,
                source,
            })
    }

    fn counters(&self) -> DatapathCounters {
        let sum = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        DatapathCounters {
            redirected: sum(counters::REDIRECTED),
            flows_recorded: sum(counters::FLOWS_RECORDED),
            orig_dst_answered: sum(counters::ORIG_DST_ANSWERED),
            record_failed: sum(counters::RECORD_FAILED),
        }
    }
}
