//! Split-KV scheduling: how the tokens of each sequence are cut into work
//! items so that every worker gets about the same amount of work.
//!
//! Like FlashMLA's tile scheduler, cost is counted in 64-token chunks plus a
//! fixed per-split overhead (loading the queries, merging the partial result),
//! and a sequence is only split when that pays for itself. Partial results of
//! a split sequence are merged by their log-sum-exp.

/// Tokens per scheduling chunk; split boundaries fall on multiples of it.
pub const CHUNK_TOKENS: usize = 64;
/// Cost of one extra split, in chunks.
pub const SPLIT_OVERHEAD_CHUNKS: usize = 2;

/// Tokens `[start, end)` of sequence `seq`, the `split`-th piece of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkItem {
    pub seq: u32,
    pub split: u32,
    pub start: u32,
    pub end: u32,
}

/// The work items of one call, grouped by sequence. Reused across calls so
/// that planning does not allocate once the buffers have grown.
#[derive(Clone, Debug, Default)]
pub struct SplitPlan {
    items: Vec<WorkItem>,
    /// `seq_first[b]..seq_first[b + 1]` are the items of sequence `b`.
    seq_first: Vec<usize>,
}

impl SplitPlan {
    /// Plans `seqlens` for `workers` parallel workers.
    pub fn build(&mut self, seqlens: &[usize], workers: usize) {
        self.items.clear();
        self.seq_first.clear();
        let workers = workers.max(1);
        let chunks = |len: usize| len.div_ceil(CHUNK_TOKENS);
        let total: usize = seqlens
            .iter()
            .map(|&l| chunks(l) + SPLIT_OVERHEAD_CHUNKS)
            .sum();
        let per_worker = total.div_ceil(workers).max(1);
        for (b, &len) in seqlens.iter().enumerate() {
            self.seq_first.push(self.items.len());
            let n = chunks(len);
            let splits = (n + SPLIT_OVERHEAD_CHUNKS)
                .div_ceil(per_worker)
                .clamp(1, n.max(1));
            // Spread n chunks over `splits` items as evenly as possible.
            let (base, extra) = (n / splits, n % splits);
            let mut chunk = 0;
            for s in 0..splits {
                let take = base + usize::from(s < extra);
                let start = (chunk * CHUNK_TOKENS).min(len);
                chunk += take;
                let end = (chunk * CHUNK_TOKENS).min(len);
                self.items.push(WorkItem {
                    seq: b as u32,
                    split: s as u32,
                    start: start as u32,
                    end: end as u32,
                });
            }
        }
        self.seq_first.push(self.items.len());
    }

    pub fn items(&self) -> &[WorkItem] {
        &self.items
    }

    /// The items of sequence `b`, in token order.
    pub fn items_of(&self, b: usize) -> &[WorkItem] {
        &self.items[self.seq_first[b]..self.seq_first[b + 1]]
    }

    /// Index of the first item of sequence `b` in [`Self::items`].
    pub fn first_item(&self, b: usize) -> usize {
        self.seq_first[b]
    }

    pub fn num_seqs(&self) -> usize {
        self.seq_first.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(plan: &SplitPlan, lens: &[usize]) {
        assert_eq!(plan.num_seqs(), lens.len());
        for (b, &len) in lens.iter().enumerate() {
            let items = plan.items_of(b);
            assert!(!items.is_empty());
            assert_eq!(items[0].start, 0);
            assert_eq!(items.last().unwrap().end as usize, len);
            for w in items.windows(2) {
                assert_eq!(w[0].end, w[1].start, "items of seq {b} must tile it");
                assert!(w[0].start < w[0].end);
            }
            for (s, it) in items.iter().enumerate() {
                assert_eq!((it.seq as usize, it.split as usize), (b, s));
                assert_eq!(it.start as usize % CHUNK_TOKENS, 0);
            }
        }
    }

    #[test]
    fn long_single_sequence_is_split_across_workers() {
        let mut p = SplitPlan::default();
        p.build(&[4096], 2);
        check_cover(&p, &[4096]);
        assert_eq!(p.items().len(), 2);
        assert_eq!(p.items()[0].end, 2048);
        p.build(&[16384], 16);
        check_cover(&p, &[16384]);
        assert!(p.items().len() >= 14, "{}", p.items().len());
    }

    #[test]
    fn many_sequences_are_not_split() {
        let mut p = SplitPlan::default();
        let lens = vec![4096; 8];
        p.build(&lens, 2);
        check_cover(&p, &lens);
        assert_eq!(p.items().len(), 8);
    }

    #[test]
    fn varlen_and_empty_sequences_are_covered() {
        let mut p = SplitPlan::default();
        let lens = [0, 1, 63, 64, 65, 10000, 0, 129];
        for workers in [1, 2, 3, 7, 64] {
            p.build(&lens, workers);
            check_cover(&p, &lens);
        }
        assert_eq!(
            p.items_of(0),
            &[WorkItem {
                seq: 0,
                split: 0,
                start: 0,
                end: 0
            }]
        );
    }
}
