//! Builds the eBPF crate with nightly + bpf-linker (through aya-build) and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it for
//! metadata-only work (check, clippy without bpf-linker); an empty object is left then.
use anyhow::{anyhow, Context as _};
use cargo_metadata::MetadataCommand;

fn main() -> anyhow::Result<()> {
    let metadata = MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "interceptor-ebpf")
        .ok_or_else(|| anyhow!("interceptor-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("interceptor-ebpf manifest has no parent"))?
        .as_str();
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let object = std::path::Path::new(&out_dir).join("interceptor");
    if !object.exists() {
        // aya-build writes nothing when skipped; keep include_bytes! compiling.
        std::fs::write(&object, []).context("placeholder eBPF object")?;
    }
    println!("cargo:rerun-if-changed=../interceptor-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "interceptor-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
