//! Deterministic test data: a [`Read`] of `len` bytes derived from a seed,
//! cheap to generate on both sides of a transfer so neither side needs a
//! copy of what the other sent. Word `i` (8 bytes, little endian) is
//! SplitMix64 of `seed + i`: no short period, so misplaced or repeated
//! blocks change the checksum.

use std::io::{self, Read};

/// `len` bytes of the pattern for `seed`.
#[derive(Debug, Clone)]
pub struct Pattern {
    seed: u64,
    offset: u64,
    len: u64,
}

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            seed,
            offset: 0,
            len,
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.len - self.offset
    }
}

/// SplitMix64's output function (Steele, Lea, Flood 2014).
fn splitmix64(state: u64) -> u64 {
    let mut z = state.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let count = usize::try_from(self.remaining()).map_or(buf.len(), |r| r.min(buf.len()));
        let mut filled = 0;
        while filled < count {
            let word = splitmix64(self.seed.wrapping_add(self.offset / 8)).to_le_bytes();
            let start = (self.offset % 8) as usize;
            let take = (8 - start).min(count - filled);
            buf[filled..filled + take].copy_from_slice(&word[start..start + take]);
            filled += take;
            self.offset += take as u64;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Pattern::new(seed, len).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn same_seed_gives_same_bytes_and_the_exact_length() {
        assert_eq!(bytes(7, 1000), bytes(7, 1000));
        assert_eq!(bytes(7, 1001).len(), 1001);
        assert_ne!(bytes(7, 64), bytes(8, 64));
    }

    #[test]
    fn reads_of_any_size_give_the_same_stream() {
        let whole = bytes(3, 4099);
        let mut pattern = Pattern::new(3, 4099);
        let mut pieces = Vec::new();
        for size in [1usize, 3, 7, 8, 13, 4096].iter().cycle() {
            let mut buf = vec![0; *size];
            let n = pattern.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(pieces, whole);
    }
}
