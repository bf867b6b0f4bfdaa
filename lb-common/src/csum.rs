//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! Pure functions so the data plane's checksum fixes are unit-tested on the
//! host. Words are big-endian `u16` values as they sit in the packet.
//!
//! A change is collected in a `u32` accumulator (`acc`) of `~old + new` terms
//! and applied once to every checksum that covers the changed words. The
//! accumulator stays far from overflow for the few dozen words a NAT touches.

/// Adds the change `old -> new` of one 16-bit word.
#[inline(always)]
pub fn add16(acc: u32, old: u16, new: u16) -> u32 {
    acc + (!old as u32) + new as u32
}

/// Adds the change of a 32-bit field (two words).
#[inline(always)]
pub fn add32(acc: u32, old: [u8; 4], new: [u8; 4]) -> u32 {
    let acc = add16(
        acc,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    add16(
        acc,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// Adds the change of an address: the first 4 bytes (IPv4) or all 16 (IPv6).
#[inline(always)]
pub fn add_addr(acc: u32, old: &[u8; 16], new: &[u8; 16], v6: bool) -> u32 {
    let mut acc = add32(
        acc,
        [old[0], old[1], old[2], old[3]],
        [new[0], new[1], new[2], new[3]],
    );
    if v6 {
        acc = add32(
            acc,
            [old[4], old[5], old[6], old[7]],
            [new[4], new[5], new[6], new[7]],
        );
        acc = add32(
            acc,
            [old[8], old[9], old[10], old[11]],
            [new[8], new[9], new[10], new[11]],
        );
        acc = add32(
            acc,
            [old[12], old[13], old[14], old[15]],
            [new[12], new[13], new[14], new[15]],
        );
    }
    acc
}

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Applies an accumulated change to a stored checksum: HC' = ~(~HC + acc).
#[inline(always)]
pub fn apply(check: u16, acc: u32) -> u16 {
    !fold((!check as u32) + fold(acc) as u32)
}

/// Same as [`apply`] for a UDP checksum: 0 means "no checksum" over IPv4 and
/// stays 0; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn apply_udp(check: u16, acc: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match apply(check, acc) {
        0 => 0xffff,
        c => c,
    }
}

/// Full checksum of a buffer (host-side helper for tests and tools).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn incremental_update_matches_full_recompute() {
        let mut h = ipv4_header([10, 0, 0, 1], [192, 168, 1, 1]);
        let old = u16::from_be_bytes([h[10], h[11]]);
        let acc = add32(0, [10, 0, 0, 1], [172, 16, 5, 9]);
        let acc = add32(acc, [192, 168, 1, 1], [10, 255, 0, 3]);
        let new = apply(old, acc);
        let expect = ipv4_header([172, 16, 5, 9], [10, 255, 0, 3]);
        h[10..12].copy_from_slice(&new.to_be_bytes());
        assert_eq!(
            &h[10..12],
            &expect[10..12],
            "incremental {new:#06x} differs from recomputed checksum"
        );
        assert_eq!(checksum(&expect), 0, "a valid header sums to zero");
    }

    #[test]
    fn ipv6_address_change_touches_all_words() {
        let a = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let b = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 0, 2];
        assert_ne!(
            fold(add_addr(0, &a, &b, true)),
            fold(add_addr(0, &a, &b, false))
        );
    }

    #[test]
    fn udp_zero_checksum_is_kept_and_zero_result_becomes_ffff() {
        assert_eq!(apply_udp(0, add16(0, 1, 2)), 0);
        // ~(~HC + ~old + new) == 0 needs ~HC + ~old + new == 0xffff.
        let hc = 0x1234;
        let acc = add16(0, 0x0000, 0xffff - !hc);
        assert_eq!(apply(hc, acc), 0);
        assert_eq!(apply_udp(hc, acc), 0xffff);
    }
}
