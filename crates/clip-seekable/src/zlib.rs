//! The one place that calls zlib's C ABI (as implemented in Rust by zlib-rs).
//!
//! [`Inflater`] owns a heap-allocated `z_stream` (zlib keeps a pointer back to it, so it must not
//! move after init) and ends it on drop. Each call hands zlib pointers into slices that outlive
//! the call and clears them afterwards.

use std::ffi::c_int;

use libz_rs_sys::{
    Z_BLOCK, Z_OK, inflate, inflateEnd, inflateInit2_, inflatePrime, inflateReset2,
    inflateSetDictionary, inflateValidate, z_stream, zlibVersion,
};

/// Window bits for a gzip stream (header and trailer parsed by zlib).
pub(crate) const GZIP: c_int = 31;
/// Window bits for raw deflate.
pub(crate) const RAW: c_int = -15;

/// What one `inflate` call did.
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub code: c_int,
}

pub(crate) struct Inflater {
    strm: Box<z_stream>,
}

fn clamp(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Inflater {
    pub(crate) fn new(window_bits: c_int) -> Result<Self, c_int> {
        let mut strm = Box::new(z_stream::default());
        let size = c_int::try_from(std::mem::size_of::<z_stream>()).unwrap_or(c_int::MAX);
        // SAFETY: `strm` is a valid, default-initialised z_stream (allocator fields set) that lives
        // on the heap for as long as `Self`; the version string is zlib's own static string.
        #[allow(unsafe_code)]
        let rc = unsafe { inflateInit2_(&raw mut *strm, window_bits, zlibVersion(), size) };
        if rc == Z_OK {
            Ok(Self { strm })
        } else {
            Err(rc)
        }
    }

    pub(crate) fn reset(&mut self, window_bits: c_int) -> Result<(), c_int> {
        // SAFETY: the stream was initialised by `new` and not ended.
        #[allow(unsafe_code)]
        let rc = unsafe { inflateReset2(&raw mut *self.strm, window_bits) };
        if rc == Z_OK { Ok(()) } else { Err(rc) }
    }

    /// Stops computing and checking the gzip trailer's CRC-32 and length (zlib's
    /// `inflateValidate(strm, 0)`), for a caller that verifies the output with a stronger digest
    /// of its own. Lasts until the next reset.
    pub(crate) fn skip_check(&mut self) -> Result<(), c_int> {
        // SAFETY: initialised stream.
        #[allow(unsafe_code)]
        let rc = unsafe { inflateValidate(&raw mut *self.strm, 0) };
        if rc == Z_OK { Ok(()) } else { Err(rc) }
    }

    pub(crate) fn prime(&mut self, bits: u8, value: u8) -> Result<(), c_int> {
        // SAFETY: initialised stream; bits is 1..=7 and value fits in them (checked by callers).
        #[allow(unsafe_code)]
        let rc =
            unsafe { inflatePrime(&raw mut *self.strm, c_int::from(bits), c_int::from(value)) };
        if rc == Z_OK { Ok(()) } else { Err(rc) }
    }

    pub(crate) fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), c_int> {
        // SAFETY: initialised stream; zlib copies `dict` (pointer and length from a live slice).
        #[allow(unsafe_code)]
        let rc =
            unsafe { inflateSetDictionary(&raw mut *self.strm, dict.as_ptr(), clamp(dict.len())) };
        if rc == Z_OK { Ok(()) } else { Err(rc) }
    }

    /// One `inflate` call over `input` into `output`. With `block`, zlib stops at every deflate
    /// block boundary (`Z_BLOCK`).
    pub(crate) fn inflate(&mut self, input: &[u8], output: &mut [u8], block: bool) -> Step {
        let (in_len, out_len) = (clamp(input.len()), clamp(output.len()));
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len;
        // SAFETY: next_in/next_out point into slices that are alive and exclusively ours for the
        // duration of the call, with lengths no larger than theirs.
        #[allow(unsafe_code)]
        let code = unsafe { inflate(&raw mut *self.strm, if block { Z_BLOCK } else { 0 }) };
        let step = Step {
            consumed: (in_len - self.strm.avail_in) as usize,
            produced: (out_len - self.strm.avail_out) as usize,
            code,
        };
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        step
    }

    /// zlib's `data_type`: unused bits of the last byte (0–7), +64 if in the last block, +128 at
    /// a block boundary.
    pub(crate) fn data_type(&self) -> c_int {
        self.strm.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new`; ending it frees zlib's state exactly once.
        #[allow(unsafe_code)]
        unsafe {
            inflateEnd(&raw mut *self.strm);
        }
    }
}
