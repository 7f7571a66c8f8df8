//! Copyable device views: thin wrappers over a device pointer and a length, made from cudarc
//! slices and views. The borrow they carry ties them to the cudarc storage they came from.

use cudarc::driver::{DevicePtr, DevicePtrMut};
use std::marker::PhantomData;

/// A shared view of `len` elements of `U` in device memory (the backend's `View`).
pub struct DevView<'a, U> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    _m: PhantomData<&'a [U]>,
}

impl<U> Clone for DevView<'_, U> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<U> Copy for DevView<'_, U> {}

/// An exclusive view of `len` elements of `U` in device memory (the backend's `ViewMut`).
pub struct DevViewMut<'a, U> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    _m: PhantomData<&'a mut [U]>,
}

impl<U> std::fmt::Debug for DevView<'_, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevView({:#x}, {})", self.ptr, self.len)
    }
}
impl<U> std::fmt::Debug for DevViewMut<'_, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevViewMut({:#x}, {})", self.ptr, self.len)
    }
}

impl<'a, U> DevView<'a, U> {
    /// A view of a cudarc `CudaSlice`, `CudaView` or `CudaViewMut`.
    pub fn of<S: DevicePtr<U>>(s: &'a S) -> Self {
        let (ptr, _sync) = s.device_ptr(s.stream());
        DevView { ptr, len: s.len(), _m: PhantomData }
    }

    /// A view of raw device memory.
    ///
    /// # Safety
    /// `ptr` must point to `len` initialized elements of `U` in device memory of the backend's
    /// context that stay valid and are not written through another path for `'a`.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        DevView { ptr, len, _m: PhantomData }
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The first `len` elements (all of them if `len` is larger).
    pub fn prefix(self, len: usize) -> Self {
        DevView { ptr: self.ptr, len: len.min(self.len), _m: PhantomData }
    }
}

impl<'a, U> DevViewMut<'a, U> {
    /// A mutable view of a cudarc `CudaSlice` or `CudaViewMut`.
    pub fn of<S: DevicePtrMut<U>>(s: &'a mut S) -> Self {
        let len = s.len();
        let stream = s.stream().clone();
        let (ptr, _sync) = s.device_ptr_mut(&stream);
        DevViewMut { ptr, len, _m: PhantomData }
    }

    /// A mutable view of raw device memory.
    ///
    /// # Safety
    /// `ptr` must point to `len` elements of `U` in device memory of the backend's context that
    /// stay valid and are accessed through no other path for `'a`.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        DevViewMut { ptr, len, _m: PhantomData }
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The first `len` elements (all of them if `len` is larger).
    pub fn prefix(self, len: usize) -> Self {
        DevViewMut { ptr: self.ptr, len: len.min(self.len), _m: PhantomData }
    }

    pub(crate) fn raw(ptr: u64, len: usize) -> Self {
        DevViewMut { ptr, len, _m: PhantomData }
    }
}

impl<'a, U> DevView<'a, U> {
    pub(crate) fn raw(ptr: u64, len: usize) -> Self {
        DevView { ptr, len, _m: PhantomData }
    }
}
