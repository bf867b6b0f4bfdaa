//! The clsact ingress filter that carries the TC program on kernels without
//! tcx (before 6.6), and a netlink dump to find it.
//!
//! A netlink filter is not a BPF link: it has no fd and cannot be pinned.
//! xdplb therefore gives its filter a fixed place, [`PRIORITY`] and
//! [`HANDLE`] on the interface's clsact ingress, where it can be found
//! again, and it is ours only if it also runs a program named
//! `lb_common::PROG_TC`. The record that xdplb attached one (what `down`
//! and a restart look for) is the program pinned at
//! `<pin_dir>/links/<iface>@clsact` (see `attach`).
//!
//! - `kill -9`: the filter holds its program, so it keeps forwarding.
//! - Restart: the filter at our place is re-created with the new program
//!   in one netlink request (`RTM_NEWTFILTER` on the same priority and
//!   handle, without `NLM_F_EXCL`). cls_bpf swaps the program in with
//!   `list_replace_rcu` (net/sched/cls_bpf.c, `cls_bpf_change`), so no
//!   packet sees no program.
//! - `down` and a clean stop: the filter at our place, if it runs
//!   `xdplb_tc`, is deleted; the clsact qdisc stays (other tools may have
//!   filters on it, and an empty one costs nothing).

use std::{io, os::fd::AsRawFd as _};

use nix::{
    errno::Errno,
    sys::socket::{recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType},
};

/// Our filter's priority on clsact ingress (`tc filter show` calls it
/// `pref`). Unusual on purpose: tools that pick fixed priorities pick small
/// ones.
pub const PRIORITY: u16 = 0x7864;
/// Our filter's handle at [`PRIORITY`].
pub const HANDLE: u32 = 0x7864;

/// A filter on an interface's clsact ingress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// `TCA_KIND` (`bpf` for cls_bpf).
    pub kind: String,
    /// cls_bpf: the program name given at attach time.
    pub name: Option<String>,
    /// cls_bpf: the program's id.
    pub prog_id: Option<u32>,
}

impl Filter {
    /// Is this the filter xdplb attaches?
    pub fn is_ours(&self) -> bool {
        self.priority == PRIORITY
            && self.handle == HANDLE
            && self.kind == "bpf"
            && self.name.as_deref() == Some(lb_common::PROG_TC)
    }
}

/// The filter at our priority and handle on `ifindex`'s clsact ingress,
/// whoever made it.
pub fn at_our_place(ifindex: u32) -> io::Result<Option<Filter>> {
    Ok(ingress_filters(ifindex)?
        .into_iter()
        .find(|f| f.priority == PRIORITY && f.handle == HANDLE))
}

// uapi linux/rtnetlink.h, linux/pkt_sched.h, linux/pkt_cls.h
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR_LEN: usize = 16;
const TCMSG_LEN: usize = 20;

/// Every filter on `ifindex`'s clsact ingress (none without a clsact qdisc).
pub fn ingress_filters(ifindex: u32) -> io::Result<Vec<Filter>> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;

    let mut req = Vec::with_capacity(NLMSG_HDR_LEN + TCMSG_LEN);
    req.extend_from_slice(&((NLMSG_HDR_LEN + TCMSG_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETTFILTER.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
                                                // struct tcmsg { family, pad1, pad2, ifindex, handle, parent, info }
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&CLSACT_INGRESS.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    send(sock.as_raw_fd(), &req, MsgFlags::empty())?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if parse_dump(&buf[..n], &mut out)? {
            return Ok(out);
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Netlink attributes in `b`: (type, payload).
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u16_at(b, at)? as usize;
        let ty = u16_at(b, at + 2)? & NLA_TYPE_MASK;
        let data = b.get(at + 4..at + len)?;
        at += len.max(4).next_multiple_of(4);
        Some((ty, data))
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses one datagram of the dump into `out`; `true` once it is complete.
fn parse_dump(mut b: &[u8], out: &mut Vec<Filter>) -> io::Result<bool> {
    let truncated = || io::Error::other("truncated netlink message in a tc filter dump");
    while b.len() >= NLMSG_HDR_LEN {
        let len = u32_at(b, 0).ok_or_else(truncated)? as usize;
        let ty = u16_at(b, 4).ok_or_else(truncated)?;
        if len < NLMSG_HDR_LEN || len > b.len() {
            return Err(truncated());
        }
        let body = &b[NLMSG_HDR_LEN..len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or_else(truncated)? as i32;
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            RTM_NEWTFILTER if body.len() >= TCMSG_LEN => {
                let handle = u32_at(body, 8).ok_or_else(truncated)?;
                let info = u32_at(body, 16).ok_or_else(truncated)?;
                let mut f = Filter {
                    priority: (info >> 16) as u16,
                    handle,
                    kind: String::new(),
                    name: None,
                    prog_id: None,
                };
                for (t, data) in attrs(&body[TCMSG_LEN..]) {
                    match t {
                        TCA_KIND => f.kind = c_string(data),
                        TCA_OPTIONS => {
                            for (t, data) in attrs(data) {
                                match t {
                                    TCA_BPF_NAME => f.name = Some(c_string(data)),
                                    TCA_BPF_ID => f.prog_id = u32_at(data, 0),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                // Each priority also reports its chain head (handle 0).
                if f.handle != 0 {
                    out.push(f);
                }
            }
            _ => {}
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    fn filter_msg(prio: u16, handle: u32, name: &str, id: u32) -> Vec<u8> {
        let mut body = vec![0u8; TCMSG_LEN];
        body[8..12].copy_from_slice(&handle.to_ne_bytes());
        body[12..16].copy_from_slice(&CLSACT_INGRESS.to_ne_bytes());
        body[16..20].copy_from_slice(&((prio as u32) << 16 | 0x0300).to_ne_bytes());
        body.extend(attr(TCA_KIND, b"bpf\0"));
        let mut opts = attr(TCA_BPF_NAME, format!("{name}\0").as_bytes());
        opts.extend(attr(TCA_BPF_ID, &id.to_ne_bytes()));
        body.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        msg(RTM_NEWTFILTER, &body)
    }

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_dump_yields_our_filter_and_skips_chain_heads() {
        let mut dgram = filter_msg(PRIORITY, 0, "", 0);
        dgram.extend(filter_msg(PRIORITY, HANDLE, "xdplb_tc", 42));
        dgram.extend(filter_msg(1, 1, "other", 7));
        let mut out = Vec::new();
        assert!(!parse_dump(&dgram, &mut out).unwrap());
        assert!(parse_dump(&msg(NLMSG_DONE, &[0; 4]), &mut out).unwrap());
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].is_ours(), "{:?}", out[0]);
        assert_eq!(out[0].prog_id, Some(42));
        assert!(!out[1].is_ours());
        assert_eq!(out[1].name.as_deref(), Some("other"));
    }

    #[test]
    fn an_error_message_is_an_error() {
        let mut out = Vec::new();
        let e = parse_dump(&msg(NLMSG_ERROR, &(-libc::ENODEV).to_ne_bytes()), &mut out)
            .expect_err("ENODEV");
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn a_cut_message_is_an_error() {
        let m = filter_msg(PRIORITY, HANDLE, "xdplb_tc", 42);
        assert!(parse_dump(&m[..m.len() - 4], &mut Vec::new()).is_err());
    }
}
