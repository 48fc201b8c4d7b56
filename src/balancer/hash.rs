//! Deterministic hashing for `source` scheduling.
//!
//! The mapping from client IP to backend must agree between two instances of
//! an HA pair and survive restarts and upgrades, so it cannot use a randomly
//! keyed hasher (std's `RandomState`) or one whose algorithm may change
//! between Rust releases (`DefaultHasher`). FNV-1a over the bytes followed by
//! the SplitMix64 finalizer is fixed forever, fast on short keys (an IP
//! address, a backend name) and well mixed in every bit.

use std::net::IpAddr;

/// FNV-1a 64-bit offset basis and prime (from the FNV specification).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// SplitMix64's finalizer (Steele, Lea, Flood 2014): a bijection on u64 with
/// full avalanche, so neighbouring inputs land far apart.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A stable 64-bit hash of a byte string.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix64(h)
}

/// A stable hash of a client address. IPv4-mapped IPv6 addresses (what a
/// dual-stack socket reports for IPv4 clients) hash as the IPv4 address, so a
/// client keeps its backend whichever way the listener is bound.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_fixed() {
        // Pinned: changing these moves every source-hash client after an
        // upgrade and splits an HA pair running two versions.
        assert_eq!(hash_bytes(b""), mix64(FNV_OFFSET));
        assert_eq!(hash_bytes(b"pg1"), 0x93d9_43ba_f17f_8590);
        assert_eq!(
            hash_ip("10.0.0.1".parse().unwrap()),
            hash_ip("::ffff:10.0.0.1".parse().unwrap())
        );
        assert_ne!(
            hash_ip("10.0.0.1".parse().unwrap()),
            hash_ip("10.0.0.2".parse().unwrap())
        );
    }
}
