use lb_user::maps::L4Csum;
use tests::packet::*;
#[test]
fn insns() {
    for m in [L4Csum::Ipv6Flag, L4Csum::Compensate, L4Csum::FailForTest] {
        let mut lab = PacketLab::with_l4_csum("insn", m);
        let tc = lab
            .dp_mut()
            .tc()
            .info()
            .unwrap()
            .verified_instruction_count();
        let xdp = lab
            .dp_mut()
            .xdp()
            .info()
            .unwrap()
            .verified_instruction_count();
        eprintln!("{m:?}: tc {tc:?} xdp {xdp:?}");
    }
}
