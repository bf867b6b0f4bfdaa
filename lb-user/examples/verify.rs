//! Loads the embedded object into the kernel (verifier included) and exits.
//! `cargo run -p lb-user --example verify` — quick feedback while editing lb-ebpf.
fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/xdplb-verify-{}", std::process::id()));
    let res = lb_user::dataplane::maps::DataPlane::load(
        &lb_user::dataplane::maps::LoadOptions::new(&dir),
    );
    let res = res.and_then(|mut dp| {
        // The verifier's work per program (of its 1,000,000-instruction
        // budget): what decides whether older kernels accept the object.
        let xdp = dp.xdp().info()?.verified_instruction_count();
        let tc = dp.tc().info()?.verified_instruction_count();
        Ok((xdp, tc))
    });
    lb_user::dataplane::maps::DataPlane::unpin_all(&dir)?;
    match res {
        Ok((xdp, tc)) => {
            println!(
                "loaded and verified: {} bytes of object; instructions the verifier processed: \
                 xdplb_xdp {}, xdplb_tc {}",
                lb_user::dataplane::maps::EBPF_OBJECT.len(),
                xdp.map_or("?".into(), |n| n.to_string()),
                tc.map_or("?".into(), |n| n.to_string())
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}
