//! Session affinity for the `prefix` policy: a client's session key names one engine by
//! rendezvous (highest random weight) hashing over the candidates' URLs.
//!
//! It needs no state, so it survives a coordinator restart or a second coordinator replica: the
//! first turn after a restart, whose history no prefix index has seen yet, goes where the earlier
//! turns went. Hashes are FNV-1a 64 with a final mix, fixed across processes and builds (no
//! per-process random seed), and adding or removing an engine moves only the sessions that
//! engine wins or won.

/// FNV-1a 64 of `bytes`.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: spreads the bits of a combined key.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The index of the candidate `session` belongs to among `urls` (`None` when empty).
pub fn rendezvous<'a>(session: u64, urls: impl Iterator<Item = &'a str>) -> Option<usize> {
    urls.enumerate()
        .map(|(i, u)| (mix(session ^ hash_key(u.as_bytes()).rotate_left(17)), i))
        .max()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:8000")).collect()
    }

    #[test]
    fn stable_spread_and_minimal_movement() {
        let eight = urls(8);
        let pick = |s: u64, us: &[String]| rendezvous(s, us.iter().map(String::as_str)).unwrap();
        // Fixed across processes: the same key and URLs always give the same engine.
        assert_eq!(hash_key(b"session-1"), 0x1688_595d_cf49_184d);
        let mut per = [0u32; 8];
        for s in 0..8000u64 {
            per[pick(hash_key(&s.to_le_bytes()), &eight)] += 1;
        }
        for n in per {
            assert!((800..1200).contains(&n), "{per:?}");
        }
        // Removing engine 3 moves only the sessions engine 3 had.
        let seven: Vec<String> = eight
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, u)| u.clone())
            .collect();
        for s in 0..2000u64 {
            let k = hash_key(&s.to_le_bytes());
            let before = &eight[pick(k, &eight)];
            let after = &seven[pick(k, &seven)];
            if before != &eight[3] {
                assert_eq!(before, after);
            }
        }
        assert_eq!(rendezvous(1, std::iter::empty()), None);
    }
}
