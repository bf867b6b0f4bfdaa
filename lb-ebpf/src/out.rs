//! What happens to a packet, and why: the verdict every stage returns,
//! and the bench's early stop. A leaf: every other module may use it.

use ::core::ptr::read_volatile;
use aya_ebpf::bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT};
use lb_common::reason;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// To the stack, unchanged (a rewritten packet never goes there).
    Pass,
    Drop,
    Tx,
    /// Already redirected by a helper; `ret` holds its return code.
    Redirect,
}

/// What happens to a packet, and why (the `REASON_STATS` index).
#[derive(Clone, Copy)]
pub struct Out {
    pub verdict: Verdict,
    pub reason: u32,
    pub ret: u32,
}

impl Out {
    /// Leave the packet untouched and let the stack have it.
    #[inline(always)]
    pub fn pass(reason: u32) -> Self {
        Self {
            verdict: Verdict::Pass,
            reason,
            ret: 0,
        }
    }
    #[inline(always)]
    pub fn drop(reason: u32) -> Self {
        Self {
            verdict: Verdict::Drop,
            reason,
            ret: 0,
        }
    }
    #[inline(always)]
    pub fn tx() -> Self {
        Self {
            verdict: Verdict::Tx,
            reason: reason::FWD_TX,
            ret: 0,
        }
    }
    #[inline(always)]
    pub fn redirect(ret: u32) -> Self {
        Self {
            verdict: Verdict::Redirect,
            reason: reason::FWD_REDIRECT,
            ret,
        }
    }

    #[inline(always)]
    pub fn xdp_action(self) -> u32 {
        match self.verdict {
            Verdict::Pass => xdp_action::XDP_PASS,
            Verdict::Drop => xdp_action::XDP_DROP,
            Verdict::Tx => xdp_action::XDP_TX,
            Verdict::Redirect => self.ret,
        }
    }

    #[inline(always)]
    pub fn tc_action(self) -> i32 {
        match self.verdict {
            // TC never returns Tx: `Tc::redirect` always redirects.
            Verdict::Pass | Verdict::Tx => TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
            Verdict::Redirect => self.ret as i32,
        }
    }
}

/// `lb_common::GLOBAL_BENCH_STOP`: the bench's per-step breakdown. The
/// name must stay as it is: userspace finds the global by its symbol.
#[unsafe(no_mangle)]
static BENCH_STOP: u32 = 0;

/// Does the bench's breakdown end the run after `stage`? Never in a normal
/// load: the verifier sees the constant 0 and removes the test.
#[inline(always)]
pub fn stop_after(stage: u32) -> Result<(), Out> {
    // SAFETY: a plain read of a static; volatile so the compiler cannot
    // fold the default in (see `ctx::l4_csum_mode`).
    if unsafe { read_volatile(&BENCH_STOP) } == stage {
        return Err(Out::pass(reason::PASS_NO_SERVICE));
    }
    Ok(())
}
