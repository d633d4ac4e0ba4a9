//! The parts of xtask that the testbed's tests share: the image build (`cargo xtask
//! image`, which `tests/tests/e2e_podman_node.rs` runs too), and what it needs.
pub mod cmd;
pub mod image;
pub mod setup;
