//! The two hooks behind one interface: packet bounds, checksum patching and
//! the final forwarding step are the only things XDP and TC do differently.

use ::core::mem::size_of;
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT,
    },
    helpers::generated::{bpf_csum_update, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};
use lb_common::{csum, reason, L4_CSUM_COMPENSATE, L4_CSUM_FAULT};

use crate::{maps::TX_PORTS, out::Out};

/// `BPF_F_IPV6` for `bpf_l4_csum_replace`: the pseudo-header is IPv6, so a
/// CHECKSUM_COMPLETE skb->csum must not be adjusted. Kernel 6.16, commit
/// ead7f9b8de65 ("bpf: Fix L4 csum update on IPv6 in CHECKSUM_COMPLETE");
/// stable 6.1.142 (Debian 6.1.147-1). Older kernels refuse it with -EINVAL
/// (the flags are checked before anything is written).
const BPF_F_IPV6: u64 = 1 << 7;

/// A flag bit no kernel defines: `L4_CSUM_FAULT` adds it to make the
/// checksum helper fail on purpose (tests only; see lb-common).
const FAULT_FLAG: u64 = 1 << 62;

/// `-ENOTSUPP` (524, kernel-internal errno): `bpf_csum_update` on an skb
/// that is not CHECKSUM_COMPLETE, where there is no `skb->csum` to correct.
const ENOTSUPP: i64 = -524;

/// One of `lb_common::L4_CSUM_*`, set by the loader (`GLOBAL_L4_CSUM`). The
/// name must stay as it is: userspace finds the global by its symbol.
#[unsafe(no_mangle)]
static L4_CSUM_MODE: u32 = lb_common::L4_CSUM_IPV6_FLAG;

#[inline(always)]
fn l4_csum_mode() -> u32 {
    // SAFETY: a plain read of a static; volatile so the compiler cannot fold
    // the default in (the loader rewrites the value in the object's
    // read-only data, and the verifier then sees a constant).
    unsafe { ::core::ptr::read_volatile(&L4_CSUM_MODE) }
}

/// Bytes a TC program must see linearly: Ethernet + IPv6 + ICMPv6 + inner
/// IPv6 + a full inner TCP header (14 + 40 + 8 + 40 + 20).
const TC_PULL_LEN: u32 = 122;

pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Frame length for byte counters.
    fn frame_len(&self) -> u64;
    fn ingress_ifindex(&self) -> u32;
    /// The raw context pointer, for helpers such as `bpf_fib_lookup`.
    fn raw(&self) -> *mut ::core::ffi::c_void;
    /// Makes the headers directly readable (TC: `bpf_skb_pull_data`).
    /// `None`: they could not be made readable (nothing was changed).
    fn prepare(&mut self) -> Option<()>;
    /// Patches the TCP/UDP checksum at `off` for a change of pseudo-header
    /// words (`acc_pseudo`: addresses) and of header words (`acc_plain`: ports).
    /// `None`: the checksum could not be updated (a helper failed); the
    /// packet must not be sent.
    fn patch_l4_csum(
        &mut self,
        off: usize,
        acc_pseudo: u32,
        acc_plain: u32,
        udp: bool,
        v6: bool,
    ) -> Option<()>;
    /// `tot_len` for `bpf_fib_lookup`: what the kernel checks the MTU with.
    fn fib_tot_len(&self, ip_len: u16) -> u16;
    /// Can this hook send the packet on the route `bpf_fib_lookup` returned
    /// (`rc`)? `tx_port`: the egress is the ingress or in `TX_PORTS` (what
    /// XDP can redirect to; `fwd::route` caches it with the next hop).
    /// Called before the rewrite: `Err` leaves the packet untouched.
    fn can_send(&self, rc: i64, fib: &bpf_fib_lookup, tx_port: bool) -> Result<(), Out>;
    /// Sends the rewritten packet out of `fib.ifindex`.
    fn send(&mut self, fib: &bpf_fib_lookup) -> Out;
}

/// Bounds-checked pointer into the packet: the one place the verifier sees a
/// packet access checked.
#[inline(always)]
pub fn ptr_at<C: Packet, T>(ctx: &C, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<C: Packet, T>(ctx: &C, offset: usize) -> Option<*mut T> {
    ptr_at::<C, T>(ctx, offset).map(|p| p as *mut T)
}

/// Reads a big-endian u16 at `offset`.
#[inline(always)]
pub fn read16<C: Packet>(ctx: &C, offset: usize) -> Option<u16> {
    let p = ptr_at::<C, [u8; 2]>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that 2 bytes at `offset` are inside the packet.
    Some(u16::from_be_bytes(unsafe { *p }))
}

/// Writes a big-endian u16 at `offset`.
#[inline(always)]
pub fn write16<C: Packet>(ctx: &C, offset: usize, v: u16) -> Option<()> {
    let p = ptr_at_mut::<C, [u8; 2]>(ctx, offset)?;
    // SAFETY: `ptr_at_mut` checked that 2 bytes at `offset` are inside the packet.
    unsafe { *p = v.to_be_bytes() };
    Some(())
}

pub struct Xdp(pub XdpContext);

impl Packet for Xdp {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        (self.0.data_end() - self.0.data()) as u64
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn raw(&self) -> *mut ::core::ffi::c_void {
        self.0.as_ptr()
    }
    #[inline(always)]
    fn prepare(&mut self) -> Option<()> {
        Some(())
    }

    /// XDP frames carry complete checksums: patch the field in place.
    #[inline(always)]
    fn patch_l4_csum(
        &mut self,
        off: usize,
        acc_pseudo: u32,
        acc_plain: u32,
        udp: bool,
        _v6: bool,
    ) -> Option<()> {
        let old = read16(self, off)?;
        let acc = acc_pseudo + acc_plain;
        let new = if udp {
            csum::apply_udp(old, acc)
        } else {
            csum::apply(old, acc)
        };
        write16(self, off, new)
    }

    /// No GSO in XDP: the IP length is the packet's length.
    #[inline(always)]
    fn fib_tot_len(&self, ip_len: u16) -> u16 {
        ip_len
    }

    /// XDP forwards only what it can send itself: a known neighbour on an
    /// interface in TX_PORTS. Anything else goes on untouched; the TC program
    /// attached beside it (the daemon always attaches both in XDP mode)
    /// resolves neighbours with `bpf_redirect_neigh` or drops and counts.
    #[inline(always)]
    fn can_send(&self, rc: i64, _fib: &bpf_fib_lookup, tx_port: bool) -> Result<(), Out> {
        if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            return Err(Out::pass(reason::PASS_XDP_NO_NEIGH));
        }
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
            return Err(Out::pass(reason::PASS_XDP_FIB));
        }
        if !tx_port {
            return Err(Out::pass(reason::PASS_XDP_NO_TXPORT));
        }
        Ok(())
    }

    #[inline(always)]
    fn send(&mut self, fib: &bpf_fib_lookup) -> Out {
        if let Some(eth) = ptr_at_mut::<Self, [u8; 12]>(self, 0) {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&fib.dmac);
            macs[6..].copy_from_slice(&fib.smac);
            // SAFETY: `ptr_at_mut` checked the 12 MAC bytes are in the packet.
            unsafe { *eth = macs };
        }
        if fib.ifindex == self.ingress_ifindex() {
            return Out::tx();
        }
        match TX_PORTS.redirect(fib.ifindex, xdp_action::XDP_DROP as u64) {
            Ok(action) => Out::redirect(action),
            // Checked in `can_send` (from the next-hop cache): only an
            // interface removed from TX_PORTS less than `NEXT_HOP_TTL_NS`
            // ago gets here.
            Err(_) => Out::drop(reason::DROP_NO_ROUTE),
        }
    }
}

pub struct Tc(pub TcContext);

impl Packet for Tc {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        self.0.len() as u64
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context the kernel handed us.
        unsafe { (*self.0.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn raw(&self) -> *mut ::core::ffi::c_void {
        self.0.as_ptr()
    }

    #[inline(always)]
    fn prepare(&mut self) -> Option<()> {
        let len = self.0.len();
        let want = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
        if self.data_end() - self.data() < want as usize {
            self.0.pull_data(want).ok()?;
        }
        Some(())
    }

    /// skbs may be CHECKSUM_PARTIAL (veth from a local sender), where only the
    /// pseudo-header part may change: the kernel helper knows which case
    /// applies, so TC always goes through it. Any helper error means the
    /// checksum is not what the new headers need: `None`, and the caller
    /// drops the packet (`drop_csum_failed`).
    ///
    /// IPv6 without `BPF_F_IPV6` (`L4_CSUM_COMPENSATE`): for a
    /// CHECKSUM_COMPLETE skb the helper then also subtracts the address
    /// change from `skb->csum`, as is right for IPv4, whose header checksum
    /// absorbs the address change. IPv6 has no header checksum: the new
    /// addresses (written directly, so `skb->csum` did not see them) and the
    /// new L4 checksum cancel out, and `skb->csum` must stay as it was.
    /// `bpf_csum_update` adds the change back; on any other skb it answers
    /// -ENOTSUPP and there is nothing to correct. A UDP checksum of 0 (none)
    /// is left alone by the helper (`BPF_F_MARK_MANGLED_0`), and then so is
    /// `skb->csum`.
    #[inline(always)]
    fn patch_l4_csum(
        &mut self,
        off: usize,
        acc_pseudo: u32,
        acc_plain: u32,
        udp: bool,
        v6: bool,
    ) -> Option<()> {
        let mode = l4_csum_mode();
        let fault = if mode == L4_CSUM_FAULT { FAULT_FLAG } else { 0 };
        let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        if acc_pseudo != 0 {
            let diff = to_wsum(acc_pseudo);
            let flags = BPF_F_PSEUDO_HDR as u64 | mangled | fault;
            if !v6 {
                self.0.l4_csum_replace(off, 0, diff, flags).ok()?;
            } else if mode == L4_CSUM_COMPENSATE {
                let no_csum = udp && read16(self, off)? == 0;
                self.0.l4_csum_replace(off, 0, diff, flags).ok()?;
                if !no_csum {
                    // SAFETY: plain helper call on the live skb of this run.
                    let rc = unsafe { bpf_csum_update(self.0.skb.skb, diff as _) };
                    if rc < 0 && rc != ENOTSUPP {
                        return None;
                    }
                }
            } else {
                self.0
                    .l4_csum_replace(off, 0, diff, flags | BPF_F_IPV6)
                    .ok()?;
            }
        }
        if acc_plain != 0 {
            self.0
                .l4_csum_replace(off, 0, to_wsum(acc_plain), mangled | fault)
                .ok()?;
        }
        Some(())
    }

    /// 0: the kernel then checks the skb itself with `is_skb_forwardable`,
    /// which knows GSO (a GSO packet's IP length is the whole super-packet,
    /// far above any MTU, though each segment fits).
    #[inline(always)]
    fn fib_tot_len(&self, _ip_len: u16) -> u16 {
        0
    }

    #[inline(always)]
    fn can_send(&self, rc: i64, _fib: &bpf_fib_lookup, _tx_port: bool) -> Result<(), Out> {
        if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            Ok(())
        } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
            Err(Out::drop(reason::DROP_FRAG_NEEDED))
        } else {
            Err(Out::drop(reason::DROP_NO_ROUTE))
        }
    }

    /// `bpf_redirect_neigh` fills in the MACs and resolves unknown neighbours.
    #[inline(always)]
    fn send(&mut self, fib: &bpf_fib_lookup) -> Out {
        // SAFETY: plain helper call; a null params pointer asks the kernel to
        // do its own next-hop lookup.
        let rc = unsafe { bpf_redirect_neigh(fib.ifindex, ::core::ptr::null_mut(), 0, 0) };
        if rc == TC_ACT_REDIRECT as i64 {
            Out::redirect(rc as u32)
        } else {
            Out::drop(reason::DROP_NO_ROUTE)
        }
    }
}

/// Converts a big-endian word accumulator into the `__wsum` the checksum
/// helpers expect (sums of native little-endian loads on bpfel).
#[inline(always)]
fn to_wsum(acc: u32) -> u64 {
    csum::fold(acc).swap_bytes() as u64
}
