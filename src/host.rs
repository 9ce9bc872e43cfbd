//! Host memory for an arena: one zeroed, 64-byte-aligned heap buffer of exactly the planned size.

use std::collections::TryReserveError;
use std::fmt;

/// The unit of allocation: 64 bytes on a 64-byte boundary (a cache line, one AVX-512 register).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64Block([u8; 64]);

const BLOCK: usize = core::mem::size_of::<Align64Block>();

/// An owned, zeroed byte buffer whose first byte is 64-byte aligned and whose slices are exactly
/// `len()` bytes long (the allocation is rounded up to whole 64-byte blocks; the tail is never exposed).
pub struct HostBuffer {
    blocks: Box<[Align64Block]>,
    len: usize,
}

impl HostBuffer {
    /// Alignment of [`HostBuffer::as_ptr`], in bytes (matches `mantissa_core::arena::ALIGN`).
    pub const ALIGN: usize = 64;

    /// A zeroed buffer of `bytes` bytes. Running out of memory (or asking for more than `isize::MAX`)
    /// is an `Err`, not an abort.
    pub fn new(bytes: usize) -> Result<HostBuffer, TryReserveError> {
        let n = bytes.div_ceil(BLOCK);
        let mut blocks = Vec::new();
        blocks.try_reserve_exact(n)?;
        // Within the reserved capacity: no reallocation, so no abort path.
        blocks.resize(n, Align64Block([0; BLOCK]));
        Ok(HostBuffer { blocks: blocks.into_boxed_slice(), len: bytes })
    }

    /// Length in bytes, exactly as requested.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.blocks.as_ptr().cast()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.blocks.as_mut_ptr().cast()
    }

    pub fn as_slice(&self) -> &[u8] {
        debug_assert!(self.len <= self.blocks.len() * BLOCK);
        // SAFETY: `Align64Block` is `repr(C)` around `[u8; 64]`, so the blocks are `blocks.len() * 64`
        // contiguous, initialised bytes with no padding; `len <= blocks.len() * 64` by construction. For
        // `len == 0` the pointer is the empty box's dangling pointer, non-null and aligned as required.
        unsafe { core::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        debug_assert!(self.len <= self.blocks.len() * BLOCK);
        let len = self.len;
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference to the bytes.
        unsafe { core::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }
}

impl core::ops::Deref for HostBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl core::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuffer").field("len", &self.len).field("ptr", &self.as_ptr()).finish()
    }
}
