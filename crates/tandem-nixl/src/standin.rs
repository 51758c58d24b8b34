//! The stand-in bytes of one KV block in one layer region (pure).
//!
//! A simulated engine has no KV tensors, so each registered block holds bytes derived from the
//! block's 32-byte token digest (the same digest the TCP stand-in moves): byte `i` of layer `r`
//! is `digest[i % 32] ^ mix(r, i / 32)`. Two properties matter:
//! - the decode side, which knows the prompt, rebuilds the exact bytes and compares them, so a
//!   recycled, unwritten or corrupted block fails;
//! - a reader that does not know the tokens (`tandem kv-probe`) can still check that a block is
//!   a whole stand-in of *some* digest: the digest comes back out of the first 32 bytes and every
//!   other byte must follow from it. A zeroed or flipped byte fails that too.

/// Bytes of a digest; a layer block must hold at least one copy of it.
pub const DIGEST_LEN: usize = 32;

/// The mask of one 32-byte chunk of one layer: it varies by layer (a block read from the wrong
/// layer region fails) and by chunk (a misplaced chunk fails).
fn mix(layer: u32, chunk: usize) -> u8 {
    let x = (layer as u64)
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add((chunk as u64).wrapping_mul(0x85eb_ca6b))
        .wrapping_add(0x5a);
    (x ^ (x >> 8) ^ (x >> 16)) as u8
}

/// Fill `out` with the stand-in of `digest` for layer `layer`.
pub fn fill(digest: &[u8; DIGEST_LEN], layer: u32, out: &mut [u8]) {
    for (chunk, bytes) in out.chunks_mut(DIGEST_LEN).enumerate() {
        let m = mix(layer, chunk);
        for (b, d) in bytes.iter_mut().zip(digest) {
            *b = d ^ m;
        }
    }
}

/// The stand-in of `digest` for `layer`, `len` bytes.
pub fn standin(digest: &[u8; DIGEST_LEN], layer: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(digest, layer, &mut v);
    v
}

/// Offset of the first byte of `got` that differs from the stand-in of `digest`.
pub fn first_mismatch(digest: &[u8; DIGEST_LEN], layer: u32, got: &[u8]) -> Option<usize> {
    for (chunk, bytes) in got.chunks(DIGEST_LEN).enumerate() {
        let m = mix(layer, chunk);
        if let Some(j) = bytes.iter().zip(digest).position(|(&b, &d)| b != d ^ m) {
            return Some(chunk * DIGEST_LEN + j);
        }
    }
    None
}

/// The digest a layer block stands in for, if `got` is a whole stand-in of one; else the offset
/// of the first inconsistent byte. A block of 0 bytes or all zeros is never whole.
pub fn recover(layer: u32, got: &[u8]) -> Result<[u8; DIGEST_LEN], usize> {
    if got.len() < DIGEST_LEN {
        return Err(got.len());
    }
    let mut digest = [0u8; DIGEST_LEN];
    for (i, d) in digest.iter_mut().enumerate() {
        *d = got[i] ^ mix(layer, 0);
    }
    if let Some(at) = first_mismatch(&digest, layer, got) {
        return Err(at);
    }
    // An unwritten block reads as zeros, which recovers a "digest" too; reject it by name.
    if got.iter().all(|&b| b == 0) {
        return Err(0);
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_catches_one_flipped_byte() {
        let d = [7u8; 32];
        for layer in [0, 1, 31] {
            let mut b = standin(&d, layer, 200);
            assert_eq!(recover(layer, &b), Ok(d));
            assert_eq!(first_mismatch(&d, layer, &b), None);
            b[150] ^= 0xff;
            assert_eq!(recover(layer, &b), Err(150));
            assert_eq!(first_mismatch(&d, layer, &b), Some(150));
        }
        // Another layer's bytes do not pass as this layer's.
        let b = standin(&d, 1, 64);
        assert!(recover(2, &b).is_err());
        assert!(recover(0, &[0u8; 64]).is_err());
        assert_eq!(recover(0, &[1u8; 8]), Err(8));
    }
}
