//! SHA-256 of a stream, with its length, printed the way both sides of a
//! guest-tier test compare them: `bytes=N sha256=HEX`.

use std::fmt;
use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Copy buffer size: large enough that per-call overhead vanishes under
/// TCG, small enough for a guest with little memory.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Length and SHA-256 of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub bytes: u64,
    pub sha256: String,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bytes={} sha256={}", self.bytes, self.sha256)
    }
}

/// Hashes what passes through it.
#[derive(Default)]
pub struct Hasher {
    sha: Sha256,
    bytes: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.bytes += data.len() as u64;
    }

    pub fn finish(self) -> Summary {
        Summary {
            bytes: self.bytes,
            sha256: hex(&self.sha.finalize()),
        }
    }
}

/// Reads `reader` to EOF.
pub fn summarize(mut reader: impl Read) -> io::Result<Summary> {
    copy_summarized(&mut reader, &mut io::sink())
}

/// Copies `reader` to `writer` to EOF and summarizes what was copied.
pub fn copy_summarized(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<Summary> {
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(hasher.finish()),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_has_the_well_known_sha256() {
        let summary = summarize(io::empty()).unwrap();
        assert_eq!(summary.bytes, 0);
        assert_eq!(
            summary.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn copy_passes_data_through_and_counts_it() {
        let mut out = Vec::new();
        let summary = copy_summarized(&mut &b"abc"[..], &mut out).unwrap();
        assert_eq!(out, b"abc");
        assert_eq!(
            summary.to_string(),
            "bytes=3 sha256=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
