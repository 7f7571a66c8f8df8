//! Thin views over the caller's `wgpu::Buffer`s.

use core::marker::PhantomData;
use moe_core::{MoeError, Result};

/// A shared view of `len` elements of type `U` at byte `offset` of a buffer the caller owns.
pub struct WgpuView<'a, U> {
    pub(crate) buffer: &'a wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    _p: PhantomData<&'a [U]>,
}

impl<U> Clone for WgpuView<'_, U> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<U> Copy for WgpuView<'_, U> {}

/// An exclusive view of `len` elements of type `U` at byte `offset` of a buffer the caller owns.
///
/// Exclusivity is the caller's promise (a `wgpu::Buffer` is shared by reference): do not make
/// two overlapping mutable views of one buffer and use them in one stage.
pub struct WgpuViewMut<'a, U> {
    pub(crate) buffer: &'a wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    _p: PhantomData<&'a mut [U]>,
}

fn check<U>(buffer: &wgpu::Buffer, offset: u64, len: usize) -> Result<()> {
    let size = core::mem::size_of::<U>() as u64;
    let end = (len as u64).checked_mul(size).and_then(|b| b.checked_add(offset));
    match end {
        Some(end) if end <= buffer.size() && offset.is_multiple_of(size.max(1)) => Ok(()),
        _ => Err(MoeError::ShapeMismatch {
            what: "wgpu view (offset + len past the buffer's end, or offset not element-aligned)",
            expected: buffer.size().saturating_sub(offset) as usize / size.max(1) as usize,
            got: len,
        }),
    }
}

impl<'a, U> WgpuView<'a, U> {
    /// `len` elements at byte `offset` (a multiple of `size_of::<U>()`) of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64, len: usize) -> Result<Self> {
        check::<U>(buffer, offset, len)?;
        Ok(WgpuView { buffer, offset, len, _p: PhantomData })
    }

    /// The whole buffer as `U`s (trailing bytes that do not make a whole element are ignored).
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        let len = (buffer.size() / core::mem::size_of::<U>().max(1) as u64) as usize;
        WgpuView { buffer, offset: 0, len, _p: PhantomData }
    }

    /// The buffer.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }

    /// Byte offset in the buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a, U> WgpuViewMut<'a, U> {
    /// `len` elements at byte `offset` (a multiple of `size_of::<U>()`) of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64, len: usize) -> Result<Self> {
        check::<U>(buffer, offset, len)?;
        Ok(WgpuViewMut { buffer, offset, len, _p: PhantomData })
    }

    /// The whole buffer as `U`s (trailing bytes that do not make a whole element are ignored).
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        let len = (buffer.size() / core::mem::size_of::<U>().max(1) as u64) as usize;
        WgpuViewMut { buffer, offset: 0, len, _p: PhantomData }
    }

    /// The buffer.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }

    /// Byte offset in the buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A shared view of the same elements.
    pub fn as_view(&self) -> WgpuView<'_, U> {
        WgpuView { buffer: self.buffer, offset: self.offset, len: self.len, _p: PhantomData }
    }

    pub(crate) fn reborrow(&mut self) -> WgpuViewMut<'_, U> {
        WgpuViewMut { buffer: self.buffer, offset: self.offset, len: self.len, _p: PhantomData }
    }

    pub(crate) fn split_at(self, mid: usize) -> (Self, Self) {
        let mid = mid.min(self.len);
        let bytes = (mid * core::mem::size_of::<U>()) as u64;
        (
            WgpuViewMut { buffer: self.buffer, offset: self.offset, len: mid, _p: PhantomData },
            WgpuViewMut {
                buffer: self.buffer,
                offset: self.offset + bytes,
                len: self.len - mid,
                _p: PhantomData,
            },
        )
    }

    pub(crate) fn cast<V>(self) -> Result<WgpuViewMut<'a, V>> {
        let bytes = self.len * core::mem::size_of::<U>();
        let vs = core::mem::size_of::<V>().max(1);
        if !bytes.is_multiple_of(vs) || !self.offset.is_multiple_of(vs as u64) {
            return Err(MoeError::ShapeMismatch {
                what: "workspace region (not a whole, aligned number of elements)",
                expected: bytes / vs * vs,
                got: bytes,
            });
        }
        Ok(WgpuViewMut {
            buffer: self.buffer,
            offset: self.offset,
            len: bytes / vs,
            _p: PhantomData,
        })
    }
}
