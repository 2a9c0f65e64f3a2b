//! The output of a row-tiled GEMM, written by its tasks in place.
//!
//! The GEMMs here split the weight rows (the outputs) across tasks, and
//! each task accumulates its outputs for every token as `[rows][tokens]`.
//! `y` is `[tokens][out]`, so a task's result is a column strip of it.
//! Gathering every task's rows in one buffer and transposing that into `y`
//! afterwards re-reads it all from memory; [`OutputColumns`] lets each task
//! transpose its strip into `y` while the strip is still in its cache.

use std::marker::PhantomData;

/// Tokens (and outputs) per transposed block: one cache line of f32.
const BLOCK: usize = 16;

/// `y [tokens][out]`, shared by tasks that each own a disjoint range of
/// outputs (columns) and write only those.
pub struct OutputColumns<'y> {
    ptr: *mut f32,
    out: usize,
    tokens: usize,
    _y: PhantomData<&'y mut [f32]>,
}

// SAFETY: the pointer comes from a `&mut [f32]` held for 'y; the only
// writes are through `put`, whose callers promise disjoint column ranges.
unsafe impl Send for OutputColumns<'_> {}
// SAFETY: as for Send; `put` never reads `y`.
unsafe impl Sync for OutputColumns<'_> {}

impl<'y> OutputColumns<'y> {
    /// `y` holds at least `tokens` rows of `out` values.
    pub fn new(y: &'y mut [f32], out: usize, tokens: usize) -> Self {
        assert!(
            y.len() >= out * tokens,
            "y holds fewer than tokens x out values"
        );
        OutputColumns {
            ptr: y.as_mut_ptr(),
            out,
            tokens,
            _y: PhantomData,
        }
    }

    /// Writes outputs `o0..o0 + rows` of every token from `acc [rows][t_pad]`
    /// (token `t` of row `r` at `r · t_pad + t`), 16 × 16 at a time so
    /// that each token's outputs are written as one run.
    ///
    /// # Safety
    /// No other thread writes outputs `o0..o0 + rows` during the call (the
    /// ranges are checked against `out`, not against each other's).
    pub unsafe fn put(&self, o0: usize, rows: usize, acc: &[f32], t_pad: usize) {
        assert!(o0 + rows <= self.out && t_pad >= self.tokens);
        assert!(rows == 0 || acc.len() >= (rows - 1) * t_pad + self.tokens);
        for r0 in (0..rows).step_by(BLOCK) {
            let m = BLOCK.min(rows - r0);
            for t0 in (0..self.tokens).step_by(BLOCK) {
                let n = BLOCK.min(self.tokens - t0);
                // block[t][j]: token t0 + t of output o0 + r0 + j.
                let mut block = [[0f32; BLOCK]; BLOCK];
                for j in 0..m {
                    for (t, &v) in acc[(r0 + j) * t_pad + t0..][..n].iter().enumerate() {
                        block[t][j] = v;
                    }
                }
                for (t, run) in block[..n].iter().enumerate() {
                    let at = (t0 + t) * self.out + o0 + r0;
                    // SAFETY: at + m <= tokens · out (asserted in new and
                    // above), so the run is inside y; the caller alone
                    // writes outputs o0..o0 + rows (# Safety).
                    unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), self.ptr.add(at), m) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Tasks of every width (partial blocks of rows and tokens included)
    /// fill exactly the transposed accumulators, and nothing else of y.
    #[test]
    fn tasks_write_their_columns_transposed() {
        for (out, tokens, t_pad, task) in [
            (48, 16, 16, 48),
            (50, 37, 48, 12),
            (7, 1, 16, 3),
            (33, 20, 32, 17),
        ] {
            let acc: Vec<f32> = (0..out * t_pad).map(|i| i as f32).collect();
            let mut y = vec![f32::NAN; out * tokens + 5];
            let cols = OutputColumns::new(&mut y, out, tokens);
            (0..out.div_ceil(task)).into_par_iter().for_each(|g| {
                let (o0, rows) = (g * task, task.min(out - g * task));
                // SAFETY: each task has its own outputs g·task..
                unsafe { cols.put(o0, rows, &acc[o0 * t_pad..], t_pad) };
            });
            for t in 0..tokens {
                for o in 0..out {
                    assert_eq!(
                        y[t * out + o],
                        acc[o * t_pad + t],
                        "out {out} token {t} output {o}"
                    );
                }
            }
            assert!(
                y[out * tokens..].iter().all(|v| v.is_nan()),
                "written past tokens x out"
            );
        }
    }
}
