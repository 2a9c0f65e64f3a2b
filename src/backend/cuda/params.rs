//! `MlaParams`: the one argument of every decode-path kernel, field for field
//! the struct in `kernels/mla_params.cuh` (a test compares the two).

/// Device addresses are `u64` (`CUdeviceptr`); 0 is "absent".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MlaParams {
    pub batch: i32,
    pub s_q: i32,
    pub h_q: i32,
    pub d_qk: i32,
    pub d_v: i32,
    pub sparse: i32,
    pub causal: i32,
    pub rows_per_group: i32,
    pub num_groups: i32,
    pub scale_log2: f32,
    pub q_dtype: i32,
    pub out_dtype: i32,
    pub kv_format: i32,
    pub num_blocks: i32,
    pub block_size: i32,
    pub bt_stride: i32,
    pub topk: i32,
    pub extra_num_blocks: i32,
    pub extra_block_size: i32,
    pub extra_topk: i32,
    pub parts: i32,
    pub max_items: i32,
    pub pad0: i32,
    pub pad1: i32,
    pub block_bytes: i64,
    pub extra_block_bytes: i64,
    pub q: u64,
    pub kv: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub indices: u64,
    pub topk_length: u64,
    pub extra_kv: u64,
    pub extra_indices: u64,
    pub extra_topk_length: u64,
    pub sink: u64,
    pub out: u64,
    pub lse: u64,
    pub items: u64,
    pub group_meta: u64,
    pub num_items: u64,
    pub part_o: u64,
    pub part_lse: u64,
    pub error_flags: u64,
    /// `[parts + 1]`: part q runs items `part_first[q]..part_first[q + 1]`.
    pub part_first: u64,
}

/// `MLA_PARAMS_SIZE` in the header.
pub const MLA_PARAMS_SIZE: usize = 264;
const _: () = assert!(std::mem::size_of::<MlaParams>() == MLA_PARAMS_SIZE);
const _: () = assert!(std::mem::offset_of!(MlaParams, block_bytes) == 96);
const _: () = assert!(std::mem::offset_of!(MlaParams, error_flags) == 248);

/// The argument of `mla_append`, field for field `MlaAppendParams` in
/// `kernels/mla_append.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AppendParams {
    pub n_rows: i32,
    pub d_qk: i32,
    pub src_dtype: i32,
    pub kv_format: i32,
    pub block_size: i32,
    pub pad0: i32,
    pub block_bytes: i64,
    pub src: u64,
    pub slots: u64,
    pub kv: u64,
}

/// `MLA_APPEND_PARAMS_SIZE` in the header.
pub const APPEND_PARAMS_SIZE: usize = 56;
const _: () = assert!(std::mem::size_of::<AppendParams>() == APPEND_PARAMS_SIZE);

/// The argument of `mla_linear_*` and `mla_linear_reduce`, field for field
/// `MlaLinearParams` in `kernels/mla_linear.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinearParams {
    pub tokens: i32,
    pub n_out: i32,
    pub k_in: i32,
    pub groups: i32,
    pub k_split: i32,
    pub k_chunk: i32,
    pub m_tiles: i32,
    pub scale_rdiv: i32,
    pub scale_kdiv: i32,
    pub scale_cols: i32,
    pub w_group_rows: i64,
    pub w_row0: i64,
    pub x_hi: u64,
    pub x_lo: u64,
    pub w: u64,
    pub scales: u64,
    pub y: u64,
    pub partial: u64,
}

/// `MLA_LINEAR_PARAMS_SIZE` in the header.
pub const LINEAR_PARAMS_SIZE: usize = 104;
const _: () = assert!(std::mem::size_of::<LinearParams>() == LINEAR_PARAMS_SIZE);
const _: () = assert!(std::mem::offset_of!(LinearParams, w_group_rows) == 40);
const _: () = assert!(std::mem::offset_of!(LinearParams, partial) == 96);

/// The argument of `mla_rows`, field for field `MlaRowsParams` in
/// `kernels/mla_rows.cuh`: one elementwise step of a device-resident layer
/// (RMSNorm, RoPE, conversion, the bf16 split) over rows of f32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowsParams {
    pub rows: i32,
    pub cols: i32,
    pub src_stride: i32,
    pub dst_stride: i32,
    pub dst_dtype: i32,
    pub rows_per_token: i32,
    pub rope: i32,
    pub eps: f32,
    pub src_dtype: i32,
    pub pad0: i32,
    pub src: u64,
    pub norm: u64,
    pub cos_sin: u64,
    pub dst: u64,
    pub hi: u64,
    pub lo: u64,
}

/// `MLA_ROWS_PARAMS_SIZE` in the header.
pub const ROWS_PARAMS_SIZE: usize = 88;
const _: () = assert!(std::mem::size_of::<RowsParams>() == ROWS_PARAMS_SIZE);
const _: () = assert!(std::mem::offset_of!(RowsParams, src) == 40);
const _: () = assert!(std::mem::offset_of!(RowsParams, lo) == 80);

/// The argument of `mla_index_score`, field for field `MlaIndexScoreParams`
/// in `kernels/mla_index.cuh`: the V3.2 indexer's scores of new tokens
/// against the keys a device pool keeps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexScoreParams {
    pub tokens: i32,
    pub heads: i32,
    pub dim: i32,
    pub block_size: i32,
    pub table_stride: i32,
    pub score_stride: i32,
    pub row_bytes: i32,
    pub pad0: i32,
    pub q: u64,
    pub w: u64,
    pub keys: u64,
    pub table: u64,
    pub tok_seq: u64,
    pub tok_len: u64,
    pub scores: u64,
}

/// `MLA_INDEX_SCORE_PARAMS_SIZE` in the header.
pub const INDEX_SCORE_PARAMS_SIZE: usize = 88;
const _: () = assert!(std::mem::size_of::<IndexScoreParams>() == INDEX_SCORE_PARAMS_SIZE);
const _: () = assert!(std::mem::offset_of!(IndexScoreParams, q) == 32);

/// The argument of `mla_index_topk` (`MlaIndexTopkParams`): each token's
/// best-scored positions, as positions and/or pool slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexTopkParams {
    pub tokens: i32,
    pub topk: i32,
    pub score_stride: i32,
    pub block_size: i32,
    pub table_stride: i32,
    pub pad0: i32,
    pub scores: u64,
    pub table: u64,
    pub tok_seq: u64,
    pub tok_len: u64,
    pub positions: u64,
    pub slots: u64,
}

/// `MLA_INDEX_TOPK_PARAMS_SIZE` in the header.
pub const INDEX_TOPK_PARAMS_SIZE: usize = 72;
const _: () = assert!(std::mem::size_of::<IndexTopkParams>() == INDEX_TOPK_PARAMS_SIZE);
const _: () = assert!(std::mem::offset_of!(IndexTopkParams, scores) == 24);

/// The argument of `mla_index_scatter` (`MlaScatterParams`): rows of
/// 32-bit words to pool slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScatterParams {
    pub rows: i32,
    pub row_words: i32,
    pub src: u64,
    pub slots: u64,
    pub dst: u64,
}

/// `MLA_SCATTER_PARAMS_SIZE` in the header.
pub const SCATTER_PARAMS_SIZE: usize = 32;
const _: () = assert!(std::mem::size_of::<ScatterParams>() == SCATTER_PARAMS_SIZE);

/// The argument of `mla_index_rows` (`MlaIndexRowsParams` in
/// `kernels/mla_index_rows.cuh`): the V3.2 indexer's per-row steps
/// (LayerNorm, half-split RoPE, Hadamard, E4M3 codes) on the GPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IndexRowsParams {
    pub rows: i32,
    pub dim: i32,
    pub src_stride: i32,
    pub rows_per_token: i32,
    pub rope: i32,
    pub cs_stride: i32,
    pub pow2_scales: i32,
    pub eps: f32,
    pub hadamard_scale: f32,
    pub w_scale: f32,
    pub src: u64,
    pub norm_w: u64,
    pub norm_b: u64,
    pub cos_sin: u64,
    pub values: u64,
    pub w: u64,
    pub key_rows: u64,
}

/// `MLA_INDEX_ROWS_PARAMS_SIZE` in the header.
pub const INDEX_ROWS_PARAMS_SIZE: usize = 96;
const _: () = assert!(std::mem::size_of::<IndexRowsParams>() == INDEX_ROWS_PARAMS_SIZE);
const _: () = assert!(std::mem::offset_of!(IndexRowsParams, src) == 40);

/// Error bits the kernels set on bad device-resident input (`MLA_ERR_*`).
pub const ERR_SEQLEN: u32 = 1;
pub const ERR_BLOCK_ID: u32 = 2;
pub const ERR_INDEX: u32 = 4;
pub const ERR_LAUNCH: u32 = 8;

/// Describes the error word a decode left, or None when it is clear.
pub fn describe_error_flags(flags: u32) -> Option<String> {
    if flags == 0 {
        return None;
    }
    let mut parts = Vec::new();
    if flags & ERR_SEQLEN != 0 {
        parts.push("a seqlens entry is outside [0, block_table_stride * block_size] (clamped)");
    }
    if flags & ERR_BLOCK_ID != 0 {
        parts.push("a block_table entry is outside [0, num_blocks) (its keys were masked)");
    }
    if flags & ERR_INDEX != 0 {
        parts.push(
            "a sparse index is outside [-1, num_blocks * block_size) or a topk_length outside [0, topk] (masked)",
        );
    }
    if flags & ERR_LAUNCH != 0 {
        parts.push("a decode kernel was launched with too little shared memory (internal)");
    }
    if flags & !(ERR_SEQLEN | ERR_BLOCK_ID | ERR_INDEX | ERR_LAUNCH) != 0 {
        parts.push("unknown error bits");
    }
    Some(parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../../../kernels/mla_params.cuh");
    const APPEND: &str = include_str!("../../../kernels/mla_append.cuh");

    /// Field names of `struct NAME` in a CUDA header, in order.
    fn header_fields(src: &str, name: &str) -> Vec<String> {
        let body = src
            .split(&format!("struct {name} {{"))
            .nth(1)
            .and_then(|s| s.split("};").next())
            .expect("the struct in the header");
        let mut names = Vec::new();
        for line in body.lines() {
            let code = line.split("//").next().unwrap_or("").trim();
            let Some(decl) = code.strip_suffix(';') else {
                continue;
            };
            // "int32_t batch, s_q" or "const int32_t* seqlens".
            let mut parts = decl.split(',');
            let first = parts.next().unwrap_or("");
            names.push(
                first
                    .rsplit(|c: char| c.is_whitespace() || c == '*')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            names.extend(parts.map(|p| p.trim().to_string()));
        }
        names
    }

    #[test]
    fn rust_struct_matches_the_cuda_header() {
        let rust = [
            "batch",
            "s_q",
            "h_q",
            "d_qk",
            "d_v",
            "sparse",
            "causal",
            "rows_per_group",
            "num_groups",
            "scale_log2",
            "q_dtype",
            "out_dtype",
            "kv_format",
            "num_blocks",
            "block_size",
            "bt_stride",
            "topk",
            "extra_num_blocks",
            "extra_block_size",
            "extra_topk",
            "parts",
            "max_items",
            "pad0",
            "pad1",
            "block_bytes",
            "extra_block_bytes",
            "q",
            "kv",
            "block_table",
            "seqlens",
            "indices",
            "topk_length",
            "extra_kv",
            "extra_indices",
            "extra_topk_length",
            "sink",
            "out",
            "lse",
            "items",
            "group_meta",
            "num_items",
            "part_o",
            "part_lse",
            "error_flags",
            "part_first",
        ];
        assert_eq!(header_fields(HEADER, "MlaParams"), rust);
        assert!(HEADER.contains(&format!("#define MLA_PARAMS_SIZE {MLA_PARAMS_SIZE}")));
        for (name, v) in [
            ("MLA_ERR_SEQLEN", ERR_SEQLEN),
            ("MLA_ERR_BLOCK_ID", ERR_BLOCK_ID),
            ("MLA_ERR_INDEX", ERR_INDEX),
        ] {
            assert!(HEADER.contains(&format!("#define {name} {v}")), "{name}");
        }
    }

    #[test]
    fn append_struct_matches_the_cuda_header() {
        let rust = [
            "n_rows",
            "d_qk",
            "src_dtype",
            "kv_format",
            "block_size",
            "pad0",
            "block_bytes",
            "src",
            "slots",
            "kv",
        ];
        assert_eq!(header_fields(APPEND, "MlaAppendParams"), rust);
        assert!(APPEND.contains(&format!(
            "#define MLA_APPEND_PARAMS_SIZE {APPEND_PARAMS_SIZE}"
        )));
    }

    #[test]
    fn linear_struct_matches_the_cuda_header() {
        const LINEAR: &str = include_str!("../../../kernels/mla_linear.cuh");
        let rust = [
            "tokens",
            "n_out",
            "k_in",
            "groups",
            "k_split",
            "k_chunk",
            "m_tiles",
            "scale_rdiv",
            "scale_kdiv",
            "scale_cols",
            "w_group_rows",
            "w_row0",
            "x_hi",
            "x_lo",
            "w",
            "scales",
            "y",
            "partial",
        ];
        assert_eq!(header_fields(LINEAR, "MlaLinearParams"), rust);
        assert!(LINEAR.contains(&format!(
            "#define MLA_LINEAR_PARAMS_SIZE {LINEAR_PARAMS_SIZE}"
        )));
    }

    #[test]
    fn rows_struct_matches_the_cuda_header() {
        const ROWS: &str = include_str!("../../../kernels/mla_rows.cuh");
        let rust = [
            "rows",
            "cols",
            "src_stride",
            "dst_stride",
            "dst_dtype",
            "rows_per_token",
            "rope",
            "eps",
            "src_dtype",
            "pad0",
            "src",
            "norm",
            "cos_sin",
            "dst",
            "hi",
            "lo",
        ];
        assert_eq!(header_fields(ROWS, "MlaRowsParams"), rust);
        assert!(ROWS.contains(&format!("#define MLA_ROWS_PARAMS_SIZE {ROWS_PARAMS_SIZE}")));
    }

    #[test]
    fn index_structs_match_the_cuda_header() {
        const INDEX: &str = include_str!("../../../kernels/mla_index.cuh");
        let score = [
            "tokens",
            "heads",
            "dim",
            "block_size",
            "table_stride",
            "score_stride",
            "row_bytes",
            "pad0",
            "q",
            "w",
            "keys",
            "table",
            "tok_seq",
            "tok_len",
            "scores",
        ];
        assert_eq!(header_fields(INDEX, "MlaIndexScoreParams"), score);
        let topk = [
            "tokens",
            "topk",
            "score_stride",
            "block_size",
            "table_stride",
            "pad0",
            "scores",
            "table",
            "tok_seq",
            "tok_len",
            "positions",
            "slots",
        ];
        assert_eq!(header_fields(INDEX, "MlaIndexTopkParams"), topk);
        let scatter = ["rows", "row_words", "src", "slots", "dst"];
        assert_eq!(header_fields(INDEX, "MlaScatterParams"), scatter);
        for (name, size) in [
            ("MLA_INDEX_SCORE_PARAMS_SIZE", INDEX_SCORE_PARAMS_SIZE),
            ("MLA_INDEX_TOPK_PARAMS_SIZE", INDEX_TOPK_PARAMS_SIZE),
            ("MLA_SCATTER_PARAMS_SIZE", SCATTER_PARAMS_SIZE),
        ] {
            assert!(INDEX.contains(&format!("#define {name} {size}")), "{name}");
        }
    }

    #[test]
    fn index_rows_struct_matches_the_cuda_header() {
        const ROWS: &str = include_str!("../../../kernels/mla_index_rows.cuh");
        let rust = [
            "rows",
            "dim",
            "src_stride",
            "rows_per_token",
            "rope",
            "cs_stride",
            "pow2_scales",
            "eps",
            "hadamard_scale",
            "w_scale",
            "src",
            "norm_w",
            "norm_b",
            "cos_sin",
            "values",
            "w",
            "key_rows",
        ];
        assert_eq!(header_fields(ROWS, "MlaIndexRowsParams"), rust);
        assert!(ROWS.contains(&format!(
            "#define MLA_INDEX_ROWS_PARAMS_SIZE {INDEX_ROWS_PARAMS_SIZE}"
        )));
    }

    #[test]
    fn error_flags_are_described() {
        assert_eq!(describe_error_flags(0), None);
        let m = describe_error_flags(ERR_BLOCK_ID | ERR_INDEX).unwrap();
        assert!(
            m.contains("block_table") && m.contains("sparse index"),
            "{m}"
        );
        assert!(describe_error_flags(64).unwrap().contains("unknown"));
    }
}
