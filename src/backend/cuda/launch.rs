//! Launch geometry of the CUDA kernels: which entry point serves a shape,
//! grid and shared-memory sizes, the workspace layout, and the host twin of
//! the on-device split plan. Pure, so every machine tests it.

use crate::decode::plan::SplitPlan;
use crate::decode::DecodeShape;
use crate::error::{Error, Result};
use crate::format::KvFormat;

/// Value dimension every decode kernel is built for (DeepSeek MLA).
pub const DV: usize = 512;
/// Query rows of one row group (one m16 tensor-core tile). A decode block
/// takes 1 row group (4 warps) or 4 (8 warps), see [`Variant`].
pub const ROWS: usize = 16;
/// Keys per shared-memory tile.
pub const TOKENS: usize = 32;
/// Threads of a 16-row decode block (4 warps); 64-row blocks have 256.
pub const DECODE_THREADS: u32 = 128;

/// The decode kernel variants of each format and head dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// 16 query rows per block, 4 warps, `mma.sync`: every GPU.
    Rows16,
    /// 64 query rows, 8 warps, `mma.sync`: each K tile feeds 64 heads; needs
    /// 162 KiB of shared memory (A100, H100/H200, B200).
    Rows64,
    /// 64 query rows on two warpgroups with Hopper's `wgmma` (entry points
    /// `_wg`, SASS for sm_90a only, so compute capability 9.0 exactly).
    Wgmma64,
}

/// Every variant, in the order the backend loads them.
pub const VARIANTS: [Variant; 3] = [Variant::Rows16, Variant::Rows64, Variant::Wgmma64];

impl Variant {
    /// Query rows per block.
    pub const fn rows(self) -> usize {
        match self {
            Variant::Rows16 => 16,
            Variant::Rows64 | Variant::Wgmma64 => 64,
        }
    }

    /// Threads per block.
    pub const fn threads(self) -> u32 {
        match self {
            Variant::Rows16 => DECODE_THREADS,
            Variant::Rows64 | Variant::Wgmma64 => 2 * DECODE_THREADS,
        }
    }

    /// What the entry point's name appends to its family's.
    pub const fn suffix(self) -> &'static str {
        match self {
            Variant::Rows16 => "",
            Variant::Rows64 => "_m64",
            Variant::Wgmma64 => "_wg",
        }
    }
}

/// Whether a GPU of compute capability `major.minor` runs the `wgmma`
/// kernels: their SASS is built for sm_90a, which only 9.0 loads.
pub const fn runs_wgmma(major: u32, minor: u32) -> bool {
    major == 9 && minor == 0
}
/// Threads of the one plan block.
pub const PLAN_THREADS: u32 = 1024;
/// Query rows per combine block (one warp each).
pub const COMBINE_ROWS: usize = 4;

pub const PLAN_KERNEL: &str = "mla_plan";
pub const APPEND_KERNEL: &str = "mla_append";
/// The elementwise row steps of a device-resident layer (`mla_rows.cuh`).
pub const ROWS_KERNEL: &str = "mla_rows";
/// Threads of a `mla_rows` block (one block per row).
pub const ROWS_THREADS: u32 = 256;
/// The V3.2 indexer on the GPU (`mla_index.cuh`): key scores, the top-k
/// selection, and the scatter that writes key rows into the pool.
pub const INDEX_SCORE_KERNEL: &str = "mla_index_score";
pub const INDEX_SCORE_MMA_KERNEL: &str = "mla_index_score_mma";
pub const INDEX_TOPK_KERNEL: &str = "mla_index_topk";
pub const INDEX_SCATTER_KERNEL: &str = "mla_index_scatter";
pub const INDEX_ROWS_KERNEL: &str = "mla_index_rows";
/// Threads of an index-rows block (one row per block, one value per thread).
pub const INDEX_ROWS_THREADS: u32 = 128;
/// Keys per score block (one thread each).
pub const INDEX_SCORE_KEYS: u32 = 128;
/// Keys per block of the tensor-core score kernel (4 warps), which takes
/// heads of a multiple of 16 values.
pub const INDEX_MMA_KEYS: u32 = 64;
/// Threads of a top-k block (one block per token).
pub const INDEX_TOPK_THREADS: u32 = 512;
/// Threads of a scatter block.
pub const INDEX_SCATTER_THREADS: u32 = 256;
/// The longest indexer head the score kernel holds in registers.
pub const INDEX_MAX_DIM: usize = 128;
/// Threads of an append block (one block per row).
pub const APPEND_THREADS: u32 = 128;
pub const COMBINE_KERNEL: &str = "mla_combine";
/// The wgmma layout probe (kernels/mla_probe.cuh), for the GPU tests.
pub const WGMMA_PROBE_KERNEL: &str = "mla_wgmma_probe";

/// Every decode entry point's family: cache format, d_qk, name in the
/// fatbin of the 16-row variant (the others append [`Variant::suffix`]).
pub const DECODE_KERNELS: [(KvFormat, usize, &str); 8] = [
    (KvFormat::Bf16, 576, "mla_decode_bf16_d576"),
    (KvFormat::Bf16, 512, "mla_decode_bf16_d512"),
    (KvFormat::F16, 576, "mla_decode_f16_d576"),
    (KvFormat::F16, 512, "mla_decode_f16_d512"),
    (KvFormat::F32, 576, "mla_decode_f32_d576"),
    (KvFormat::F32, 512, "mla_decode_f32_d512"),
    (KvFormat::Fp8V32, 576, "mla_decode_fp8v32_d576"),
    (KvFormat::Fp8Model1, 512, "mla_decode_fp8model1_d512"),
];

/// Name of a decode entry point of a variant.
pub fn decode_kernel_name(base: &str, variant: Variant) -> String {
    format!("{base}{}", variant.suffix())
}

/// The 64-row variants read each K tile once for 64 rows instead of 16; one
/// is used when a query group has that many rows (h_q x s_q dense, h_q
/// sparse) and the GPU gives a block its shared memory: the `wgmma` one
/// when `wgmma` (the GPU runs it and it is enabled), else `mma.sync`'s.
pub fn choose_variant(
    rows_per_group: usize,
    format: KvFormat,
    d_qk: usize,
    max_smem_per_block: usize,
    wgmma: bool,
) -> Variant {
    let fits = |v| decode_smem_bytes(format, d_qk, v) <= max_smem_per_block;
    if rows_per_group < 64 {
        Variant::Rows16
    } else if wgmma && fits(Variant::Wgmma64) {
        Variant::Wgmma64
    } else if fits(Variant::Rows64) {
        Variant::Rows64
    } else {
        Variant::Rows16
    }
}

/// The decode kernel family for a cache format and head dimension, or an
/// UNSUPPORTED error saying what the CUDA backend takes.
pub fn decode_kernel(shape: &DecodeShape, format: KvFormat) -> Result<&'static str> {
    if shape.d_v != DV {
        return Err(Error::unsupported(format!(
            "d_v = {}: the CUDA kernels are built for DeepSeek MLA's d_v = {DV}; use a CPU engine for other shapes",
            shape.d_v
        )));
    }
    DECODE_KERNELS
        .iter()
        .find(|(f, d, _)| *f == format && *d == shape.d_qk)
        .map(|(_, _, name)| *name)
        .ok_or_else(|| {
            Error::unsupported(format!(
                "d_qk = {}: the CUDA kernels are built for d_qk = 576 or 512; use a CPU engine for other shapes",
                shape.d_qk
            ))
        })
}

/// Dynamic shared memory of a decode block of a variant; mirrors
/// `Smem<DQK, RG, KV, WG>` in kernels/mla_decode.cuh (both sides pin the
/// numbers). BF16/F16/F32 tiles are double-buffered; FP8 tiles have one
/// bf16 buffer plus a buffer of raw rows copied ahead. `mma.sync` tiles pad
/// each row by 16 bytes against bank conflicts; `wgmma` tiles are unpadded
/// core matrices.
pub const fn decode_smem_bytes(format: KvFormat, d_qk: usize, variant: Variant) -> usize {
    let rows = variant.rows();
    let pad = if matches!(variant, Variant::Wgmma64) {
        0
    } else {
        8
    };
    let ks = d_qk + pad;
    let (k_buffers, raw) = match format {
        KvFormat::Fp8V32 => (1, TOKENS * 656),
        KvFormat::Fp8Model1 => (1, TOKENS * 592),
        _ => (2, 0),
    };
    let q = rows * ks * 2;
    let k = k_buffers * TOKENS * ks * 2 + raw;
    // wgmma blocks keep two S planes, one per half of d_qk.
    let s_planes = if matches!(variant, Variant::Wgmma64) {
        2
    } else {
        1
    };
    let s = s_planes * rows * (TOKENS + 4) * 4;
    let p = rows * (TOKENS + pad) * 2;
    let tokens = 2 * 2 * TOKENS * 8;
    let row_state = 4 * rows * 4;
    q + k + s + p + tokens + row_state
}

/// Grid sizes and workspace extents of one decode call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Query groups: sequences (dense) or sequence x query token (sparse).
    pub groups: usize,
    /// Query rows of a group: s_q * h_q (dense) or h_q (sparse).
    pub rows_per_group: usize,
    /// Query rows per decode block (16 or 64).
    pub block_rows: usize,
    /// Decode blocks per work item.
    pub row_tiles: usize,
    /// Workers the split plan balances over.
    pub parts: usize,
    /// Upper bound on work items: groups + parts.
    pub max_items: usize,
}

impl Geometry {
    /// `resident_blocks`: decode blocks (of `block_rows` rows) the whole
    /// device runs at once.
    pub fn new(
        shape: &DecodeShape,
        sparse: bool,
        block_rows: usize,
        resident_blocks: usize,
    ) -> Result<Self> {
        let (groups, rows_per_group) = if sparse {
            (shape.batch * shape.s_q, shape.h_q)
        } else {
            (shape.batch, shape.s_q * shape.h_q)
        };
        let row_tiles = rows_per_group.div_ceil(block_rows);
        let parts = (resident_blocks / row_tiles).max(1);
        let max_items = groups + parts;
        if row_tiles > 65535
            || rows_per_group.div_ceil(COMBINE_ROWS) > 65535
            || max_items > i32::MAX as usize
            || rows_per_group > i32::MAX as usize
        {
            return Err(Error::unsupported(format!(
                "batch = {}, s_q = {}, h_q = {}: too many query rows for one CUDA launch",
                shape.batch, shape.s_q, shape.h_q
            )));
        }
        Ok(Geometry {
            groups,
            rows_per_group,
            block_rows,
            row_tiles,
            parts,
            max_items,
        })
    }

    /// 16-row blocks are persistent: one per part and row tile, each looping
    /// over the items the plan dealt to its part. 64-row blocks take one
    /// item each (grid over the most items a plan makes; surplus blocks exit).
    pub fn decode_grid(&self) -> (u32, u32, u32) {
        let x = if self.block_rows == ROWS {
            self.parts
        } else {
            self.max_items
        };
        (x as u32, self.row_tiles as u32, 1)
    }

    pub fn combine_grid(&self) -> (u32, u32, u32) {
        (
            self.groups as u32,
            self.rows_per_group.div_ceil(COMBINE_ROWS) as u32,
            1,
        )
    }

    /// Byte offsets of the workspace pieces, each 256-aligned, and the total.
    pub fn workspace(&self) -> WorkspaceLayout {
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let off = at;
            at += bytes.div_ceil(256) * 256;
            off
        };
        let items = take(self.max_items * 16);
        let group_meta = take(self.groups * 8);
        let num_items = take(4);
        let error_flags = take(4);
        let part_lse = take(self.max_items * self.rows_per_group * 4);
        let part_o = take(self.max_items * self.rows_per_group * DV * 4);
        let part_first = take((self.parts + 1) * 4);
        WorkspaceLayout {
            items,
            group_meta,
            num_items,
            error_flags,
            part_lse,
            part_o,
            part_first,
            bytes: at,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub items: usize,
    pub group_meta: usize,
    pub num_items: usize,
    pub error_flags: usize,
    pub part_lse: usize,
    pub part_o: usize,
    pub part_first: usize,
    pub bytes: usize,
}

/// What `mla_plan` writes: the items (`{group, start, end, splits}`), the
/// group table (`{first item, splits}`) and the part table (part q runs
/// items `part_first[q]..part_first[q + 1]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    pub items: Vec<[i32; 4]>,
    pub groups: Vec<[i32; 2]>,
    pub part_first: Vec<i32>,
}

/// The host twin of `mla_plan` for these key counts. The items come from
/// `SplitPlan::build` with `workers = parts`; then item i (cost = its
/// 64-token chunks + the split overhead, prefix cost C_i) goes to part
/// `min(parts - 1, C_i / ceil(total / parts))`. GPU tests compare the two.
pub fn host_plan(keys: &[usize], parts: usize) -> DevicePlan {
    use crate::decode::plan::{CHUNK_TOKENS, SPLIT_OVERHEAD_CHUNKS};
    let parts = parts.max(1);
    let mut plan = SplitPlan::default();
    plan.build(keys, parts);
    let mut items = Vec::with_capacity(plan.items().len());
    let mut groups = Vec::with_capacity(keys.len());
    for g in 0..keys.len() {
        let of = plan.items_of(g);
        groups.push([plan.first_item(g) as i32, of.len() as i32]);
        for it in of {
            items.push([
                it.seq as i32,
                it.start as i32,
                it.end as i32,
                of.len() as i32,
            ]);
        }
    }
    let cost =
        |it: &[i32; 4]| ((it[2] - it[1]) as usize).div_ceil(CHUNK_TOKENS) + SPLIT_OVERHEAD_CHUNKS;
    let total: usize = items.iter().map(cost).sum();
    let per = total.div_ceil(parts).max(1);
    let mut part_first = vec![items.len() as i32; parts + 1];
    let mut c = 0usize;
    let mut prev: i64 = -1;
    for (i, it) in items.iter().enumerate() {
        let part = (c / per).min(parts - 1) as i64;
        for q in prev + 1..=part {
            part_first[q as usize] = i as i32;
        }
        prev = part;
        c += cost(it);
    }
    DevicePlan {
        items,
        groups,
        part_first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn shape(batch: usize, s_q: usize, h_q: usize, d_qk: usize) -> DecodeShape {
        DecodeShape::new(
            batch as i32,
            s_q as i32,
            h_q as i32,
            d_qk as i32,
            512,
            0.0,
            false,
        )
        .unwrap()
    }

    #[test]
    fn shared_memory_matches_the_kernel_source() {
        let src = include_str!("../../../kernels/mla_decode.cuh");
        for (format, d, name) in [
            (KvFormat::Bf16, 576, "MLA_KV_BF16"),
            (KvFormat::Bf16, 512, "MLA_KV_BF16"),
            (KvFormat::Fp8V32, 576, "MLA_KV_FP8_V32"),
            (KvFormat::Fp8Model1, 512, "MLA_KV_FP8_MODEL1"),
        ] {
            for (v, params) in [
                (Variant::Rows16, "1, "),
                (Variant::Rows64, "4, "),
                (Variant::Wgmma64, "4, "),
            ] {
                let wg = if v == Variant::Wgmma64 { ", true" } else { "" };
                let want = format!(
                    "Smem<{d}, {params}{name}{wg}>::BYTES == {}",
                    decode_smem_bytes(format, d, v)
                );
                assert!(src.contains(&want), "kernels/mla_decode.cuh lacks `{want}`");
            }
        }
        for (format, d, _) in DECODE_KERNELS {
            // F16/F32 share BF16's layout.
            let like = if matches!(format, KvFormat::F16 | KvFormat::F32) {
                KvFormat::Bf16
            } else {
                format
            };
            for v in VARIANTS {
                assert_eq!(
                    decode_smem_bytes(format, d, v),
                    decode_smem_bytes(like, d, v)
                );
            }
            // 16 rows fit the smallest opt-in limit of the targets
            // (sm_86/89/120: 99 KiB); 64 rows fit A100's 163 KiB, and the
            // wgmma blocks H100's 227 KiB.
            assert!(decode_smem_bytes(format, d, Variant::Rows16) <= 101376);
            assert!(decode_smem_bytes(format, d, Variant::Rows64) <= 166912);
            assert!(decode_smem_bytes(format, d, Variant::Wgmma64) <= 232448);
        }
        let defs = [
            ("MLA_ROWS", ROWS),
            ("MLA_TOKENS", TOKENS),
            ("MLA_THREADS", DECODE_THREADS as usize),
            ("MLA_DV", DV),
        ];
        for (name, v) in defs {
            assert!(src.contains(&format!("#define {name} {v}")), "{name}");
        }
        let plan = include_str!("../../../kernels/mla_plan.cuh");
        assert!(plan.contains(&format!("#define MLA_PLAN_THREADS {PLAN_THREADS}")));
        let append = include_str!("../../../kernels/mla_append.cuh");
        assert!(append.contains(&format!("#define MLA_APPEND_THREADS {APPEND_THREADS}")));
        assert!(append.contains(APPEND_KERNEL));
        let index = include_str!("../../../kernels/mla_index.cuh");
        for (name, v) in [
            ("MLA_INDEX_SCORE_KEYS", INDEX_SCORE_KEYS as usize),
            ("MLA_INDEX_TOPK_THREADS", INDEX_TOPK_THREADS as usize),
            ("MLA_INDEX_SCATTER_THREADS", INDEX_SCATTER_THREADS as usize),
            ("MLA_INDEX_MAX_DIM", INDEX_MAX_DIM),
            ("MLA_INDEX_MMA_KEYS", INDEX_MMA_KEYS as usize),
        ] {
            assert!(index.contains(&format!("#define {name} {v}")), "{name}");
        }
        for k in [
            INDEX_SCORE_KERNEL,
            INDEX_SCORE_MMA_KERNEL,
            INDEX_TOPK_KERNEL,
            INDEX_SCATTER_KERNEL,
        ] {
            assert!(index.contains(&format!("{k}(")), "{k}");
        }
        let index_rows = include_str!("../../../kernels/mla_index_rows.cuh");
        assert!(index_rows.contains(&format!(
            "#define MLA_INDEX_ROWS_THREADS {INDEX_ROWS_THREADS}"
        )));
        assert!(index_rows.contains(&format!("{INDEX_ROWS_KERNEL}(")));
        assert!(INDEX_ROWS_THREADS as usize >= INDEX_MAX_DIM);
        let rows = include_str!("../../../kernels/mla_rows.cuh");
        assert!(rows.contains(&format!("#define MLA_ROWS_THREADS {ROWS_THREADS}")));
        assert!(rows.contains(&format!("{ROWS_KERNEL}(")));
        let combine = include_str!("../../../kernels/mla_combine.cuh");
        assert!(combine.contains(&format!("#define MLA_COMBINE_ROWS {COMBINE_ROWS}")));
        let params = include_str!("../../../kernels/mla_params.cuh");
        assert!(params.contains(&format!(
            "#define MLA_CHUNK_TOKENS {}",
            crate::decode::plan::CHUNK_TOKENS
        )));
        assert!(params.contains(&format!(
            "#define MLA_SPLIT_OVERHEAD_CHUNKS {}",
            crate::decode::plan::SPLIT_OVERHEAD_CHUNKS
        )));
    }

    #[test]
    fn every_entry_point_is_defined_in_the_kernel_source() {
        let src = include_str!("../../../kernels/mlart_kernels.cu");
        for (_, _, name) in DECODE_KERNELS {
            // MLA_DECODE_ENTRIES defines NAME and NAME_m64.
            assert!(
                src.contains(&format!("MLA_DECODE_ENTRIES({name},")),
                "{name}"
            );
        }
        assert!(src.contains("MLA_DECODE_ENTRY(NAME, KV, DQK, OP, 1, false)"));
        assert!(src.contains("MLA_DECODE_ENTRY(NAME##_m64, KV, DQK, OP, 4, false)"));
        assert!(src.contains("MLA_DECODE_ENTRY(NAME##_wg, KV, DQK, OP, 4, true)"));
        let names: Vec<_> = VARIANTS
            .iter()
            .map(|&v| decode_kernel_name("k", v))
            .collect();
        assert_eq!(names, ["k", "k_m64", "k_wg"]);
        let threads: Vec<_> = VARIANTS.iter().map(|v| v.threads()).collect();
        assert_eq!(threads, [128, 256, 256]);
        assert!(include_str!("../../../kernels/mla_plan.cuh").contains(PLAN_KERNEL));
        assert!(include_str!("../../../kernels/mla_combine.cuh").contains(COMBINE_KERNEL));
        assert!(src.contains(&format!(
            "{WGMMA_PROBE_KERNEL}(const __grid_constant__ MlaProbeParams p)"
        )));
    }

    #[test]
    fn kernels_are_chosen_by_format_and_dims() {
        let s576 = shape(1, 1, 16, 576);
        assert_eq!(
            decode_kernel(&s576, KvFormat::Fp8V32).unwrap(),
            "mla_decode_fp8v32_d576"
        );
        assert_eq!(
            decode_kernel(&shape(1, 1, 16, 512), KvFormat::Fp8Model1).unwrap(),
            "mla_decode_fp8model1_d512"
        );
        let e = decode_kernel(&shape(1, 1, 16, 1024), KvFormat::Bf16).unwrap_err();
        assert_eq!(e.status, crate::Status::Unsupported);
        assert!(e.message.contains("d_qk = 1024"), "{}", e.message);
        let mut s = s576;
        s.d_v = 128;
        let e = decode_kernel(&s, KvFormat::Bf16).unwrap_err();
        assert!(e.message.contains("d_v = 128"), "{}", e.message);
    }

    #[test]
    fn variants_follow_heads_shared_memory_and_wgmma() {
        use Variant::*;
        let h100 = 232448;
        let bf16 = KvFormat::Bf16;
        for wgmma in [false, true] {
            let big = if wgmma { Wgmma64 } else { Rows64 };
            assert_eq!(choose_variant(128, bf16, 576, h100, wgmma), big);
            assert_eq!(
                choose_variant(64, KvFormat::Fp8Model1, 512, h100, wgmma),
                big
            );
            assert_eq!(choose_variant(63, bf16, 576, h100, wgmma), Rows16);
            assert_eq!(choose_variant(128, bf16, 576, 101376, wgmma), Rows16); // sm_86/89/120
        }
        assert_eq!(choose_variant(128, bf16, 576, 166912, false), Rows64); // A100
                                                                           // Only compute capability 9.0 runs the sm_90a wgmma SASS.
        assert!(runs_wgmma(9, 0));
        for (major, minor) in [(8, 0), (8, 9), (9, 1), (10, 0), (12, 0)] {
            assert!(!runs_wgmma(major, minor), "{major}.{minor}");
        }
    }

    #[test]
    fn geometry_tiles_heads_and_bounds_the_items() {
        let g = Geometry::new(&shape(128, 1, 128, 576), false, 16, 264).unwrap();
        assert_eq!((g.groups, g.rows_per_group, g.row_tiles), (128, 128, 8));
        assert_eq!(g.parts, 33);
        assert_eq!(g.decode_grid(), (33, 8, 1));
        assert_eq!(g.max_items, 161);
        assert_eq!(g.combine_grid(), (128, 32, 1));
        let g64 = Geometry::new(&shape(128, 1, 128, 576), false, 64, 132).unwrap();
        assert_eq!((g64.row_tiles, g64.parts), (2, 66));
        assert_eq!(g64.decode_grid(), (194, 2, 1));
        // MTP: dense rows span the query tokens; sparse groups are per token.
        let d = Geometry::new(&shape(4, 2, 20, 576), false, 16, 100).unwrap();
        assert_eq!((d.groups, d.rows_per_group, d.row_tiles), (4, 40, 3));
        let s = Geometry::new(&shape(4, 2, 20, 576), true, 16, 100).unwrap();
        assert_eq!((s.groups, s.rows_per_group, s.row_tiles), (8, 20, 2));
        // h_q = 1 still gets a block; a tiny device still gets one part.
        let one = Geometry::new(&shape(1, 1, 1, 512), false, 16, 0).unwrap();
        assert_eq!((one.row_tiles, one.parts, one.max_items), (1, 1, 2));
        let w = g.workspace();
        assert!(w.part_o.is_multiple_of(256) && w.part_lse.is_multiple_of(256));
        assert_eq!(w.part_first - w.part_o, 161 * 128 * 512 * 4);
    }

    #[test]
    fn host_plan_fits_the_grid_and_tiles_every_group() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for _ in 0..300 {
            let groups = rng.random_range(1..40);
            let parts = rng.random_range(1..300);
            let keys: Vec<usize> = (0..groups)
                .map(|_| match rng.random_range(0..4) {
                    0 => 0,
                    1 => rng.random_range(1..70),
                    _ => rng.random_range(1..20000),
                })
                .collect();
            let DevicePlan {
                items,
                groups: meta,
                part_first,
            } = host_plan(&keys, parts);
            assert!(items.len() <= groups + parts, "{} items", items.len());
            for (g, m) in meta.iter().enumerate() {
                let of = &items[m[0] as usize..(m[0] + m[1]) as usize];
                assert_eq!(of[0][1], 0);
                assert_eq!(of.last().unwrap()[2] as usize, keys[g]);
                for w in of.windows(2) {
                    assert_eq!(w[0][2], w[1][1]);
                }
                assert!(of.iter().all(|it| it[0] == g as i32 && it[3] == m[1]));
            }
            // Parts deal out every item once, in order.
            assert_eq!(part_first.len(), parts + 1);
            assert_eq!((part_first[0], part_first[parts]), (0, items.len() as i32));
            assert!(part_first.windows(2).all(|w| w[0] <= w[1]));
        }
    }
}
