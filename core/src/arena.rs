//! The static arena: one buffer, every tensor a [`Buf`] handle (offset, length, dtype) into it.
//!
//! [`Arena`] only does the bookkeeping (a bump pointer over `[0, capacity)`); the bytes belong to the backend
//! (a `static` on a microcontroller, a boxed slice on a PC, one device allocation on a GPU). Because the same
//! sequence of allocations always yields the same offsets, the memory plan is computed by replaying it with
//! unlimited capacity, and a GPU can capture a step as a graph over fixed addresses.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Every allocation starts on a 64-byte boundary (a cache line, an AVX-512 register, a CUDA sector pair).
pub const ALIGN: usize = 64;

/// A typed view into the arena: `len` elements of `dtype` starting at byte `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Buf {
    pub offset: usize,
    pub len: usize,
    pub dtype: DType,
}

impl Buf {
    /// A zero-length handle, for layers without that buffer.
    pub const EMPTY: Buf = Buf { offset: 0, len: 0, dtype: DType::F32 };

    pub const fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// Elements `start..start + len` of this buffer, as a buffer of their own.
    ///
    /// # Panics
    /// If the range is out of bounds: a bug in the caller inside mantissa, never user input.
    pub fn slice(&self, start: usize, len: usize) -> Buf {
        assert!(start + len <= self.len, "Buf::slice out of bounds");
        Buf { offset: self.offset + start * self.dtype.size(), len, dtype: self.dtype }
    }

    /// The same bytes seen with a different length (for reshapes such as Flatten and shorter batches).
    pub fn prefix(&self, len: usize) -> Buf {
        self.slice(0, len)
    }

    /// Byte range `[offset, offset + bytes)`.
    pub const fn end(&self) -> usize {
        self.offset + self.bytes()
    }

    /// Checks that the handle lies inside an arena of `capacity` bytes and is aligned for its dtype: the test
    /// every backend makes before touching memory. Checked arithmetic: a handle near `usize::MAX` would wrap
    /// [`Buf::end`] and pass a plain comparison.
    pub fn check_in(&self, capacity: usize, what: &'static str) -> Result<()> {
        let end = self.len.checked_mul(self.dtype.size()).and_then(|n| self.offset.checked_add(n));
        match end {
            Some(end) if end <= capacity && self.offset % self.dtype.size() == 0 => Ok(()),
            _ => Err(Error::ShapeMismatch { what, expected: capacity, got: end.unwrap_or(usize::MAX) }),
        }
    }

    /// Checks that the handle holds at least `len` elements.
    pub fn check_len(&self, len: usize, what: &'static str) -> Result<()> {
        if self.len < len {
            return Err(Error::ShapeMismatch { what, expected: len, got: self.len });
        }
        Ok(())
    }

    /// Whether two buffers share any byte.
    pub const fn overlaps(&self, other: &Buf) -> bool {
        self.offset < other.end() && other.offset < self.end() && self.len > 0 && other.len > 0
    }
}

/// A position to [`Arena::release`] back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(usize);

/// Bump allocator over `[0, capacity)` bytes.
#[derive(Clone, Debug)]
pub struct Arena {
    capacity: usize,
    top: usize,
    high_water: usize,
}

impl Arena {
    pub const fn new(capacity: usize) -> Self {
        Arena { capacity, top: 0, high_water: 0 }
    }

    /// An arena that never runs out: used to replay allocations and measure a plan.
    pub const fn unbounded() -> Self {
        Arena::new(usize::MAX)
    }

    pub fn alloc(&mut self, dtype: DType, len: usize) -> Result<Buf> {
        let start = align_up(self.top);
        let end = len
            .checked_mul(dtype.size())
            .and_then(|b| start.checked_add(b))
            .ok_or(Error::OutOfMemory { needed: usize::MAX, available: self.capacity })?;
        if end > self.capacity {
            return Err(Error::OutOfMemory { needed: end, available: self.capacity });
        }
        self.top = end;
        self.high_water = self.high_water.max(end);
        Ok(Buf { offset: start, len, dtype })
    }

    pub fn mark(&self) -> Mark {
        Mark(self.top)
    }

    /// Frees everything allocated since `mark`.
    pub fn release(&mut self, mark: Mark) {
        debug_assert!(mark.0 <= self.top);
        self.top = mark.0;
    }

    pub fn used(&self) -> usize {
        self.top
    }

    /// The most bytes ever in use: flat over training when every step releases what it allocated.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

pub const fn align_up(x: usize) -> usize {
    (x + ALIGN - 1) & !(ALIGN - 1)
}
