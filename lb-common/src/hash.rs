//! The flow hash: picks the Maglev slot of a new flow and the first SNAT port
//! it tries. Lives here so `xdplb explain` computes exactly what the kernel
//! computes. Only the 5-tuple and a secret key go in, so every balancer
//! instance with the same table and the same key sends a flow to the same
//! backend, and nobody without the key can tell which backend or SNAT port
//! a 5-tuple gets (or aim packets at one).
//!
//! SipHash-1-3 (Aumasson and Bernstein, 2012; what Rust's `HashMap` uses
//! against hash flooding) over the bytes `src dst sport dport proto family`,
//! addresses cut to 4 bytes for IPv4, ports as on the wire: 14 bytes for
//! IPv4, 38 for IPv6. It runs once per new flow, never for an established
//! one.

use crate::FlowKey;

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// One message word, one compression round (the "1" of SipHash-1-3).
#[inline(always)]
fn compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    round(v);
    v[0] ^= m;
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u64 {
    u64::from_le_bytes([
        b[i],
        b[i + 1],
        b[i + 2],
        b[i + 3],
        b[i + 4],
        b[i + 5],
        b[i + 6],
        b[i + 7],
    ])
}

/// Hash of a flow's 5-tuple under `key` (`Config::hash_key`).
#[inline(always)]
pub fn flow_hash(k: &FlowKey, key: &[u64; 2]) -> u32 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let len: u64 = if k.family == crate::FAMILY_V6 {
        compress(&mut v, word(&k.src, 0));
        compress(&mut v, word(&k.src, 8));
        compress(&mut v, word(&k.dst, 0));
        compress(&mut v, word(&k.dst, 8));
        38
    } else {
        let src = u32::from_le_bytes([k.src[0], k.src[1], k.src[2], k.src[3]]) as u64;
        let dst = u32::from_le_bytes([k.dst[0], k.dst[1], k.dst[2], k.dst[3]]) as u64;
        compress(&mut v, src | dst << 32);
        14
    };
    // The last 6 bytes and the length, as SipHash ends every message.
    // Ports are kept as on the wire, so their in-memory bytes are the
    // message bytes (little-endian: host and BPF alike).
    let ports = k.sport_be as u64
        | (k.dport_be as u64) << 16
        | (k.proto as u64) << 32
        | (k.family as u64) << 40;
    compress(&mut v, ports | len << 56);
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    let h = v[0] ^ v[1] ^ v[2] ^ v[3];
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

    const KEY: [u64; 2] = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];

    /// SipHash-c-d over bytes, written from the paper, independent of the
    /// word-wise code above.
    fn reference(c: usize, d: usize, key: [u64; 2], msg: &[u8]) -> u64 {
        let mut v = [
            key[0] ^ 0x736f6d6570736575,
            key[1] ^ 0x646f72616e646f6d,
            key[0] ^ 0x6c7967656e657261,
            key[1] ^ 0x7465646279746573,
        ];
        let mut blocks: Vec<u64> = msg
            .chunks(8)
            .filter(|b| b.len() == 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut last = [0u8; 8];
        let tail = &msg[msg.len() / 8 * 8..];
        last[..tail.len()].copy_from_slice(tail);
        last[7] = msg.len() as u8;
        blocks.push(u64::from_le_bytes(last));
        for m in blocks {
            v[3] ^= m;
            for _ in 0..c {
                round(&mut v);
            }
            v[0] ^= m;
        }
        v[2] ^= 0xff;
        for _ in 0..d {
            round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    #[test]
    fn the_reference_is_siphash() {
        // The SipHash-2-4 test vector of the paper (appendix A).
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(reference(2, 4, KEY, &msg), 0xa129_ca61_49be_45e5);
    }

    fn fold(h: u64) -> u32 {
        (h ^ (h >> 32)) as u32
    }

    #[test]
    fn flow_hash_is_siphash_1_3_of_the_tuple_bytes() {
        let mut k = key(40_000);
        let mut msg = Vec::new();
        msg.extend_from_slice(&k.src[..4]);
        msg.extend_from_slice(&k.dst[..4]);
        msg.extend_from_slice(&40_000u16.to_be_bytes());
        msg.extend_from_slice(&80u16.to_be_bytes());
        msg.extend_from_slice(&[PROTO_TCP, FAMILY_V4]);
        assert_eq!(flow_hash(&k, &KEY), fold(reference(1, 3, KEY, &msg)));

        k.family = FAMILY_V6;
        k.proto = PROTO_UDP;
        for (i, b) in k.src.iter_mut().enumerate() {
            *b = 0xf0 ^ i as u8;
        }
        for (i, b) in k.dst.iter_mut().enumerate() {
            *b = 0x30 + i as u8;
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&k.src);
        msg.extend_from_slice(&k.dst);
        msg.extend_from_slice(&40_000u16.to_be_bytes());
        msg.extend_from_slice(&80u16.to_be_bytes());
        msg.extend_from_slice(&[PROTO_UDP, FAMILY_V6]);
        assert_eq!(flow_hash(&k, &KEY), fold(reference(1, 3, KEY, &msg)));
    }

    #[test]
    fn the_key_changes_every_choice() {
        let other = [KEY[0] ^ 1, KEY[1]];
        let same = (0..1000u16)
            .filter(|&p| {
                flow_hash(&key(30_000 + p), &KEY) % 97 == flow_hash(&key(30_000 + p), &other) % 97
            })
            .count();
        assert!(
            same < 30,
            "{same} of 1000 flows kept their bucket under another key"
        );
    }

    fn key(sport: u16) -> FlowKey {
        let mut k = FlowKey {
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[10, 0, 0, 2]);
        k.dst[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.sport_be = sport.to_be();
        k.dport_be = 80u16.to_be();
        k
    }

    #[test]
    fn source_ports_spread_evenly_over_buckets() {
        let mut buckets = [0u32; 16];
        for p in 0..16_000u16 {
            buckets[(flow_hash(&key(10_000 + p), &KEY) % 16) as usize] += 1;
        }
        for (i, b) in buckets.iter().enumerate() {
            assert!(
                (800..1200).contains(b),
                "bucket {i} holds {b} of 16000, expected about 1000"
            );
        }
    }

    #[test]
    fn hash_is_stable() {
        // Pinned so a change to the hash (which would remap live flows on
        // mixed-version balancer fleets) is a deliberate, visible decision.
        assert_eq!(flow_hash(&key(40_000), &KEY), 0x7426_6196);
        assert_ne!(flow_hash(&key(40_000), &KEY), flow_hash(&key(40_001), &KEY));
    }
}
