//! Large per-call buffers, kept by the model and reused across forwards.
//!
//! A 512-token V3 pass uses about 560 MB of temporaries (queries, latent
//! queries and outputs, the GEMMs' packed activations and accumulators).
//! Allocated fresh, each is a new `mmap`: the kernel faults in and zeroes
//! every page on first touch and shoots down TLBs when it is unmapped,
//! which measured 15–20% of a prefill. A [`Scratch`] keeps returned buffers
//! and hands them out again, so a steady stream of forwards touches only
//! memory that is already mapped.
//!
//! What is kept is bounded by the model's largest concurrent use; it is
//! freed with the model.

use bytemuck::Pod;
use parking_lot::Mutex;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// A set of reusable buffers.
#[derive(Default)]
pub struct Scratch {
    /// Returned buffers (u64 words, so any `Pod` element type of alignment
    /// up to 8 can view them).
    free: Mutex<Vec<Vec<u64>>>,
}

/// Buffers kept at most; more are dropped when returned.
const MAX_KEPT: usize = 32;

impl Scratch {
    /// `n` zeros of `T`.
    pub fn zeroed<T: Pod>(&self, n: usize) -> Buf<'_, T> {
        let mut words = self.reuse(n * std::mem::size_of::<T>());
        words.fill(0);
        self.wrap(words, n)
    }

    /// `n` values of `T` with unspecified contents, for a caller that
    /// writes every element before it reads any. Debug builds (the test
    /// suites) fill them with all-ones bits (NaN for floats), so a missed
    /// element shows up instead of passing on a stale value.
    pub fn overwritten<T: Pod>(&self, n: usize) -> Buf<'_, T> {
        #[allow(unused_mut)]
        let mut words = self.reuse(n * std::mem::size_of::<T>());
        #[cfg(debug_assertions)]
        words.fill(u64::MAX);
        self.wrap(words, n)
    }

    /// Bytes held by returned buffers (their capacity).
    pub fn kept_bytes(&self) -> usize {
        self.free.lock().iter().map(|v| v.capacity() * 8).sum()
    }

    /// A buffer of exactly `bytes.div_ceil(8)` words: the smallest kept one
    /// that is large enough, else the largest kept one grown, else a new one.
    fn reuse(&self, bytes: usize) -> Vec<u64> {
        let words = bytes.div_ceil(8);
        let mut v = {
            let mut free = self.free.lock();
            let fit = (0..free.len())
                .filter(|&i| free[i].capacity() >= words)
                .min_by_key(|&i| free[i].capacity());
            let pick = fit.or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
            match pick {
                Some(i) => free.swap_remove(i),
                None => Vec::new(),
            }
        };
        // Within capacity this only sets the length; the contents are
        // overwritten or zeroed by the caller.
        v.resize(words, 0);
        v
    }

    fn wrap<T: Pod>(&self, words: Vec<u64>, len: usize) -> Buf<'_, T> {
        assert!(std::mem::align_of::<T>() <= 8);
        Buf {
            words,
            len,
            home: self,
            _t: PhantomData,
        }
    }
}

/// A buffer of `len` elements of `T` on loan from a [`Scratch`]; it goes
/// back when dropped.
pub struct Buf<'a, T: Pod> {
    words: Vec<u64>,
    len: usize,
    home: &'a Scratch,
    _t: PhantomData<T>,
}

impl<T: Pod> Deref for Buf<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &bytemuck::cast_slice(&self.words[..])[..self.len]
    }
}

impl<T: Pod> DerefMut for Buf<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.words[..])[..self.len]
    }
}

impl<T: Pod> Drop for Buf<'_, T> {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        if words.capacity() == 0 {
            return;
        }
        let mut free = self.home.free.lock();
        if free.len() < MAX_KEPT {
            free.push(words);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_zeroed_and_sized() {
        let s = Scratch::default();
        {
            let mut a = s.zeroed::<f32>(1000);
            assert_eq!(a.len(), 1000);
            assert!(a.iter().all(|&v| v == 0.0));
            a.fill(3.0);
            let b = s.zeroed::<u8>(13);
            assert_eq!(b.len(), 13);
        }
        // Both came back: 4000 bytes and 16 bytes of capacity at least.
        assert!(s.kept_bytes() >= 4016);
        let kept = s.kept_bytes();
        {
            // The best fit for 12 bytes is the small buffer; the large one
            // then serves 900 f32 without growing, zeroed again.
            let small = s.zeroed::<u16>(6);
            let big = s.zeroed::<f32>(900);
            assert!(small.iter().all(|&v| v == 0) && big.iter().all(|&v| v == 0.0));
            assert_eq!(s.kept_bytes(), 0);
        }
        assert_eq!(s.kept_bytes(), kept);
        // A request larger than everything kept grows the largest buffer.
        {
            let huge = s.overwritten::<f64>(5000);
            assert_eq!(huge.len(), 5000);
            #[cfg(debug_assertions)]
            assert!(huge.iter().all(|v| v.is_nan()));
        }
        assert!(s.kept_bytes() >= 40000 + 16);
    }

    #[test]
    fn at_most_max_kept_buffers_are_kept() {
        let s = Scratch::default();
        let bufs: Vec<Buf<'_, u32>> = (0..MAX_KEPT + 5).map(|_| s.zeroed::<u32>(4)).collect();
        drop(bufs);
        assert_eq!(s.free.lock().len(), MAX_KEPT);
    }
}
