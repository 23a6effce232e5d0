//! A cursor over a fuzz input: the targets read their structured inputs
//! (operation codes, lengths, fields) from it, and an exhausted input reads
//! as zeros, so every byte string is a valid input.

/// Reads little-endian fields off the front of a byte string.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// Up to `len` bytes (fewer when the input runs out).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(len.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// Exactly `N` bytes, zero-padded when the input runs out.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.bytes(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// One of `choices`, picked by the next byte.
    pub fn choose<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[usize::from(self.u8()) % choices.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::Input;

    #[test]
    fn fields_are_little_endian_and_an_exhausted_input_reads_zeros() {
        let mut input = Input::new(&[1, 2, 0, 3]);
        assert_eq!(input.u8(), 1);
        assert_eq!(input.u16(), 2);
        assert_eq!(input.u32(), 3);
        assert!(input.is_empty());
        assert_eq!(input.u64(), 0);
        assert_eq!(input.bytes(5), &[] as &[u8]);
    }
}
