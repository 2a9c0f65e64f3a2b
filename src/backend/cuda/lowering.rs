//! Lowering a validated device decode into the kernels' parameter block:
//! enum codes, checked integer narrowing, pointer alignment and the
//! workspace addresses. Pure, so every machine tests it.

use super::args::{DeviceDecode, KeysDev};
use super::launch::{self, Geometry};
use super::params::MlaParams;
use crate::error::{Error, Result};

/// The kernels number dtypes and cache formats like the C ABI (`MLA_DT_*`,
/// `MLA_KV_*`; checked by `codes_match_the_kernel_headers`).
pub(crate) fn code(raw: u32) -> i32 {
    raw as i32
}

pub(crate) fn int(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{name} = {v} does not fit in int32")))
}

/// The kernels read caches with 16-byte loads and activations by element.
pub(super) fn check_alignment(a: &DeviceDecode) -> Result<()> {
    let check = |name: &str, ptr: u64, align: u64| -> Result<()> {
        if !ptr.is_multiple_of(align) {
            return Err(Error::invalid(format!(
                "{name} = {ptr:#x} must be {align}-byte aligned for the CUDA kernels"
            )));
        }
        Ok(())
    };
    check("kv", a.kv, 16)?;
    check("q", a.q, a.q_dtype.size() as u64)?;
    check("out", a.out, 4)?;
    check("lse", a.lse, 4)?;
    check("attn_sink", a.sink, 4)?;
    if let KeysDev::Sparse { extra: Some(x), .. } = a.keys {
        check("extra_kv", x.kv, 16)?;
    }
    Ok(())
}

/// Points the parameters at the pieces of a workspace at `base`.
pub(super) fn bind_workspace(p: &mut MlaParams, base: u64, ws: &launch::WorkspaceLayout) {
    p.items = base + ws.items as u64;
    p.group_meta = base + ws.group_meta as u64;
    p.num_items = base + ws.num_items as u64;
    p.error_flags = base + ws.error_flags as u64;
    p.part_lse = base + ws.part_lse as u64;
    p.part_o = base + ws.part_o as u64;
    p.part_first = base + ws.part_first as u64;
}

/// The call's parameters, without the workspace addresses.
pub(crate) fn base_params(a: &DeviceDecode, geo: &Geometry) -> Result<MlaParams> {
    let s = &a.shape;
    let mut p = MlaParams {
        batch: int("batch", s.batch)?,
        s_q: int("s_q", s.s_q)?,
        h_q: int("h_q", s.h_q)?,
        d_qk: int("d_qk", s.d_qk)?,
        d_v: int("d_v", s.d_v)?,
        causal: i32::from(s.causal),
        rows_per_group: int("rows", geo.rows_per_group)?,
        num_groups: int("groups", geo.groups)?,
        scale_log2: s.softmax_scale * std::f32::consts::LOG2_E,
        q_dtype: code(a.q_dtype.raw()),
        out_dtype: code(a.out_dtype.raw()),
        kv_format: code(a.layout.format.raw()),
        num_blocks: int("num_blocks", a.num_blocks)?,
        block_size: int("block_size", a.layout.block_size)?,
        block_bytes: a.layout.block_bytes as i64,
        parts: int("parts", geo.parts)?,
        max_items: int("items", geo.max_items)?,
        q: a.q,
        kv: a.kv,
        sink: a.sink,
        out: a.out,
        lse: a.lse,
        ..MlaParams::default()
    };
    match a.keys {
        KeysDev::Dense(d) => {
            p.block_table = d.block_table;
            p.bt_stride = int("block_table_stride", d.stride)?;
            p.seqlens = d.seqlens;
        }
        KeysDev::Sparse { main, extra } => {
            p.sparse = 1;
            p.kv = main.kv;
            p.num_blocks = int("num_blocks", main.num_blocks)?;
            p.block_size = int("block_size", main.layout.block_size)?;
            p.block_bytes = main.layout.block_bytes as i64;
            p.indices = main.indices;
            p.topk = int("topk", main.topk)?;
            p.topk_length = main.topk_length;
            if let Some(x) = extra {
                p.extra_kv = x.kv;
                p.extra_num_blocks = int("extra_num_blocks", x.num_blocks)?;
                p.extra_block_size = int("extra_block_size", x.layout.block_size)?;
                p.extra_block_bytes = x.layout.block_bytes as i64;
                p.extra_indices = x.indices;
                p.extra_topk = int("extra_topk", x.topk)?;
                p.extra_topk_length = x.topk_length;
            }
        }
    }
    Ok(p)
}

/// Every buffer a device-memory call reads or writes, with the bytes it
/// uses: (argument name, address, bytes); absent optional ones are left out.
pub(super) fn device_ranges(a: &DeviceDecode) -> Result<Vec<(&'static str, u64, usize)>> {
    let s = &a.shape;
    let size = |what: &str, dims: &[usize]| crate::error::checked_size(what, dims);
    let mut v = vec![
        ("q", a.q, size("q", &[s.q_elems(), a.q_dtype.size()])?),
        (
            "out",
            a.out,
            size("out", &[s.out_elems(), a.out_dtype.size()])?,
        ),
        ("lse", a.lse, size("lse", &[s.lse_elems(), 4])?),
        ("attn_sink", a.sink, size("attn_sink", &[s.h_q, 4])?),
    ];
    match a.keys {
        KeysDev::Dense(d) => {
            v.push(("kv", a.kv, a.layout.cache_bytes(a.num_blocks)?));
            v.push((
                "block_table",
                d.block_table,
                size("block_table", &[s.batch, d.stride, 4])?,
            ));
            v.push(("seqlens", d.seqlens, size("seqlens", &[s.batch, 4])?));
        }
        KeysDev::Sparse { main, extra } => {
            let rows = s.batch * s.s_q;
            for (x, kv, ind, len) in [
                (Some(main), "kv", "indices", "topk_length"),
                (extra, "extra_kv", "extra_indices", "extra_topk_length"),
            ] {
                let Some(x) = x else { continue };
                v.push((kv, x.kv, x.layout.cache_bytes(x.num_blocks)?));
                v.push((ind, x.indices, size(ind, &[rows, x.topk, 4])?));
                v.push((len, x.topk_length, size(len, &[s.batch, 4])?));
            }
        }
    }
    v.retain(|&(_, ptr, _)| ptr != 0);
    Ok(v)
}

/// i32/f32 slices as their bytes (for copies to the device).
pub(super) fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain numeric slices reinterpreted as bytes; u8 has no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::args::{DenseDev, IndexedDev};
    use crate::decode::DecodeShape;
    use crate::format::{Dtype, KvFormat, KvLayout};

    fn dense(shape: DecodeShape) -> DeviceDecode {
        DeviceDecode {
            shape,
            q_dtype: Dtype::F16,
            out_dtype: Dtype::F32,
            layout: KvLayout::new(KvFormat::Fp8V32, 576, 100, "f").unwrap(),
            q: 0x1000,
            kv: 0x2000,
            num_blocks: 77,
            keys: KeysDev::Dense(DenseDev {
                block_table: 0x3000,
                stride: 9,
                seqlens: 0x4000,
            }),
            sink: 0x5000,
            out: 0x6000,
            lse: 0,
            stream: 0,
        }
    }

    #[test]
    fn dense_arguments_are_lowered_field_by_field() {
        let shape = DecodeShape::new(3, 2, 20, 576, 512, 0.0, true).unwrap();
        let a = dense(shape);
        let geo = Geometry::new(&shape, false, 16, 100).unwrap();
        let p = base_params(&a, &geo).unwrap();
        assert_eq!((p.batch, p.s_q, p.h_q, p.d_qk, p.d_v), (3, 2, 20, 576, 512));
        assert_eq!((p.sparse, p.causal), (0, 1));
        assert_eq!((p.rows_per_group, p.num_groups), (40, 3));
        assert!((p.scale_log2 - std::f32::consts::LOG2_E / 24.0).abs() < 1e-6);
        assert_eq!((p.q_dtype, p.out_dtype, p.kv_format), (2, 0, 3));
        assert_eq!((p.num_blocks, p.block_size, p.bt_stride), (77, 100, 9));
        assert_eq!(p.block_bytes, 65600);
        assert_eq!(
            (p.parts, p.max_items),
            (geo.parts as i32, geo.max_items as i32)
        );
        assert_eq!(
            (p.q, p.kv, p.block_table, p.seqlens),
            (0x1000, 0x2000, 0x3000, 0x4000)
        );
        assert_eq!(
            (p.sink, p.out, p.lse, p.indices, p.extra_kv),
            (0x5000, 0x6000, 0, 0, 0)
        );
    }

    #[test]
    fn sparse_arguments_take_the_caches_of_their_index_lists() {
        let shape = DecodeShape::new(2, 2, 128, 512, 512, 0.5, false).unwrap();
        let l64 = KvLayout::new(KvFormat::Fp8Model1, 512, 64, "f").unwrap();
        let l3 = KvLayout::new(KvFormat::Fp8Model1, 512, 3, "f").unwrap();
        let mut a = dense(shape);
        a.layout = l64;
        a.keys = KeysDev::Sparse {
            main: IndexedDev {
                layout: l64,
                kv: 0xa000,
                num_blocks: 5,
                indices: 0xb000,
                topk: 2048,
                topk_length: 0,
            },
            extra: Some(IndexedDev {
                layout: l3,
                kv: 0xc000,
                num_blocks: 6,
                indices: 0xd000,
                topk: 64,
                topk_length: 0xe000,
            }),
        };
        let geo = Geometry::new(&shape, true, 64, 264).unwrap();
        let p = base_params(&a, &geo).unwrap();
        assert_eq!((p.sparse, p.rows_per_group, p.num_groups), (1, 128, 4));
        assert!((p.scale_log2 - 0.5 * std::f32::consts::LOG2_E).abs() < 1e-6);
        assert_eq!((p.kv, p.num_blocks, p.block_size), (0xa000, 5, 64));
        assert_eq!(p.block_bytes, l64.block_bytes as i64);
        assert_eq!((p.indices, p.topk, p.topk_length), (0xb000, 2048, 0));
        assert_eq!(
            (p.extra_kv, p.extra_num_blocks, p.extra_block_size),
            (0xc000, 6, 3)
        );
        assert_eq!(p.extra_block_bytes, 2304); // 3 x 584 rounded up to 4 x 576
        assert_eq!(
            (p.extra_indices, p.extra_topk, p.extra_topk_length),
            (0xd000, 64, 0xe000)
        );
        assert_eq!((p.block_table, p.seqlens), (0, 0));
    }

    #[test]
    fn every_device_buffer_is_listed_with_its_size() {
        let shape = DecodeShape::new(3, 2, 20, 576, 512, 0.0, true).unwrap();
        let r = device_ranges(&dense(shape)).unwrap();
        let names: Vec<&str> = r.iter().map(|x| x.0).collect();
        // lse is absent (0) here.
        assert_eq!(
            names,
            ["q", "out", "attn_sink", "kv", "block_table", "seqlens"]
        );
        let len = |n: &str| r.iter().find(|x| x.0 == n).unwrap().2;
        assert_eq!(len("q"), 3 * 2 * 20 * 576 * 2);
        assert_eq!(len("out"), 3 * 2 * 20 * 512 * 4);
        assert_eq!(len("kv"), 77 * 65600);
        assert_eq!(len("block_table"), 3 * 9 * 4);
        let mut a = dense(shape);
        a.keys = KeysDev::Sparse {
            main: IndexedDev {
                layout: a.layout,
                kv: 0xa000,
                num_blocks: 5,
                indices: 0xb000,
                topk: 64,
                topk_length: 0,
            },
            extra: None,
        };
        let r = device_ranges(&a).unwrap();
        let names: Vec<&str> = r.iter().map(|x| x.0).collect();
        assert_eq!(names, ["q", "out", "attn_sink", "kv", "indices"]);
        assert_eq!(r[4].2, 3 * 2 * 64 * 4);
    }

    #[test]
    fn codes_match_the_kernel_headers() {
        let h = include_str!("../../../kernels/mla_params.cuh");
        for (name, raw) in [
            ("MLA_DT_F32", Dtype::F32.raw()),
            ("MLA_DT_BF16", Dtype::Bf16.raw()),
            ("MLA_DT_F16", Dtype::F16.raw()),
            ("MLA_KV_BF16", KvFormat::Bf16.raw()),
            ("MLA_KV_F16", KvFormat::F16.raw()),
            ("MLA_KV_F32", KvFormat::F32.raw()),
            ("MLA_KV_FP8_V32", KvFormat::Fp8V32.raw()),
            ("MLA_KV_FP8_MODEL1", KvFormat::Fp8Model1.raw()),
        ] {
            assert!(h.contains(&format!("#define {name} {raw}")), "{name}");
        }
    }

    #[test]
    fn misaligned_device_pointers_are_named() {
        let shape = DecodeShape::new(1, 1, 16, 576, 512, 0.0, false).unwrap();
        let mut a = dense(shape);
        assert!(check_alignment(&a).is_ok());
        a.kv += 8;
        let e = check_alignment(&a).unwrap_err();
        assert!(
            e.message.contains("kv = 0x2008") && e.message.contains("16-byte"),
            "{}",
            e.message
        );
        let mut a = dense(shape);
        a.q += 1;
        assert!(check_alignment(&a)
            .unwrap_err()
            .message
            .contains("q = 0x1001"));
        let mut a = dense(shape);
        a.out += 2;
        assert!(check_alignment(&a).unwrap_err().message.contains("out"));
    }
}
