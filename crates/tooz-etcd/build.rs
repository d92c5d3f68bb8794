//! Nothing to build. The build-dependency on `protoc-bin-vendored` (see Cargo.toml) is
//! what matters: it puts a protoc from crates.io where the workspace's `tools/protoc`
//! finds it for etcd-client's build script.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
