//! Loads the embedded object into the kernel (verifier included) and exits.
//! `cargo run -p lb-user --example verify` — quick feedback while editing lb-ebpf.
fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/xdplb-verify-{}", std::process::id()));
    let res = lb_user::maps::DataPlane::load(&lb_user::maps::LoadOptions::new(&dir));
    lb_user::maps::DataPlane::unpin_all(&dir)?;
    match res {
        Ok(_) => {
            println!(
                "loaded and verified: {} bytes of object",
                lb_user::maps::EBPF_OBJECT.len()
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}
