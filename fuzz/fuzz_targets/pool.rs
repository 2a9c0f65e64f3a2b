//! Sequences of KV-pool operations (create, free, fork, truncate, append,
//! batched append, decode) against a shadow model that keeps every
//! sequence's rows per layer as the pool's format stores them.
//!
//! Checked after every operation: an operation the shadow knows to be
//! invalid fails with the right status, and one that fails leaves the pool
//! as it was; lengths and occupancy agree with the shadow; every decode
//! agrees with a float64 attention over the shadow's rows; and freeing
//! every sequence returns every block.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mlart::decode::desc::{DecodeOutput, DecodeShape};
use mlart::format::{Dtype, KvFormat, KvLayout};
use mlart::kv::{KvPool, PoolOptions, PoolSparse};
use mlart::Status;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

mod common;
use common::{cpu_engine as engine, Rng};

#[derive(Arbitrary, Debug)]
enum Op {
    Create(u8),
    Free(u8),
    Fork(u8, u8),
    Truncate(u8, i8),
    TruncateLayer(u8, u8, u8),
    Append(u8, u8, u8),
    AppendBatch(u8, Vec<(u8, u8)>),
    Decode {
        layer: u8,
        seqs: Vec<u8>,
        s_q: u8,
        h_q: u8,
        causal: bool,
        sparse: Option<(u8, Vec<i8>, Option<Vec<i8>>)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    format: u8,
    layers: u8,
    block_size: u8,
    blocks: u8,
    seed: u64,
    ops: Vec<Op>,
}

/// Rows of one sequence per layer, as stored (quantized and read back).
type Shadow = BTreeMap<u64, Vec<Vec<Vec<f32>>>>;

fn status<T>(r: &mlart::Result<T>) -> Option<Status> {
    r.as_ref().err().map(|e| e.status)
}

fn seq_id(s: u8) -> u64 {
    (s % 6) as u64 * 1_000_003 // a few ids, far apart
}

/// Float64 attention of one query row over `keys` (rows of d_qk).
fn attend(q: &[f32], keys: &[&Vec<f32>], d_v: usize, scale: f64) -> (Vec<f64>, f64) {
    if keys.is_empty() {
        return (vec![0.0; d_v], f64::INFINITY);
    }
    let s: Vec<f64> = keys
        .iter()
        .map(|k| {
            scale
                * q.iter()
                    .zip(k.iter())
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut o = vec![0.0; d_v];
    for (w, k) in e.iter().zip(keys) {
        for (o, v) in o.iter_mut().zip(k.iter()) {
            *o += w / z * *v as f64;
        }
    }
    (o, m + z.ln())
}

fn check_stats(pool: &KvPool, shadow: &Shadow, bs: usize) {
    let st = pool.stats();
    assert_eq!(st.sequences, shadow.len());
    assert_eq!(st.blocks_used + st.blocks_free, st.blocks_total);
    // Blocks cover each sequence's longest layer; forks may share them.
    let need: Vec<usize> = shadow
        .values()
        .map(|ls| ls.iter().map(|l| l.len()).max().unwrap_or(0).div_ceil(bs))
        .collect();
    assert!(
        st.blocks_used <= need.iter().sum::<usize>(),
        "{st:?} vs {need:?}"
    );
    assert!(
        st.blocks_used >= need.iter().copied().max().unwrap_or(0),
        "{st:?} vs {need:?}"
    );
    for (&id, ls) in shadow {
        for (l, rows) in ls.iter().enumerate() {
            assert_eq!(
                pool.len(id, l as i64).expect("a known sequence"),
                rows.len()
            );
        }
    }
}

fuzz_target!(|inp: Input| {
    let format = KvFormat::from_raw("fmt", (inp.format % 5) as u32).unwrap();
    let d_qk = match format {
        KvFormat::Fp8V32 => 576,
        KvFormat::Fp8Model1 => 512,
        _ => 16,
    };
    let d_v = if d_qk == 16 { 8 } else { 512 };
    let opts = PoolOptions {
        format,
        d_qk,
        num_layers: 1 + inp.layers as usize % 3,
        block_size: 1 + inp.block_size as usize % 5,
        num_blocks: 1 + inp.blocks as usize % 12,
        index_dim: 0,
    };
    let bs = opts.block_size;
    let layout = KvLayout::new(format, d_qk, bs, "format").expect("a layout");
    let pool = KvPool::new(engine(), opts).expect("a pool");
    let mut shadow: Shadow = BTreeMap::new();
    let mut rng = Rng(inp.seed);
    // Rows as the pool stores them: written into a one-block scratch cache
    // and read back.
    let mut scratch = vec![0u8; layout.cache_bytes(1).expect("one block")];
    let mut stored = |row: &[f32]| -> Vec<f32> {
        layout.store_row(&mut scratch, 0, 0, row);
        let mut back = vec![0f32; d_qk];
        layout.load_row(&scratch, 0, 0, &mut back);
        back
    };
    let mut new_rows = |n: usize, rng: &mut Rng| -> (Vec<u8>, Vec<Vec<f32>>) {
        let mut bytes = Vec::with_capacity(n * d_qk * 4);
        let mut rows = Vec::with_capacity(n);
        for _ in 0..n {
            let r: Vec<f32> = (0..d_qk).map(|_| rng.next()).collect();
            r.iter()
                .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
            rows.push(stored(&r));
        }
        (bytes, rows)
    };
    let layers = opts.num_layers;

    for op in inp.ops.iter().take(64) {
        match op {
            Op::Create(s) => {
                let id = seq_id(*s);
                let r = pool.create_seq(id);
                match shadow.entry(id) {
                    Entry::Occupied(_) => {
                        assert_eq!(status(&r), Some(Status::InvalidArgument))
                    }
                    Entry::Vacant(v) => {
                        r.expect("create a new sequence");
                        v.insert(vec![Vec::new(); layers]);
                    }
                }
            }
            Op::Free(s) => {
                let id = seq_id(*s);
                let r = pool.free_seq(id);
                if shadow.remove(&id).is_none() {
                    assert_eq!(status(&r), Some(Status::NotFound));
                } else {
                    r.expect("free a sequence");
                }
            }
            Op::Fork(a, b) => {
                let (src, dst) = (seq_id(*a), seq_id(*b));
                let r = pool.fork(src, dst);
                if shadow.contains_key(&dst) {
                    assert_eq!(status(&r), Some(Status::InvalidArgument));
                } else if !shadow.contains_key(&src) {
                    assert_eq!(status(&r), Some(Status::NotFound));
                } else {
                    r.expect("fork");
                    let copy = shadow[&src].clone();
                    shadow.insert(dst, copy);
                }
            }
            Op::Truncate(s, len) => {
                let id = seq_id(*s);
                let r = pool.truncate(id, *len as i64);
                if *len < 0 {
                    assert_eq!(status(&r), Some(Status::InvalidArgument));
                } else if let Some(ls) = shadow.get_mut(&id) {
                    r.expect("truncate");
                    ls.iter_mut().for_each(|l| l.truncate(*len as usize));
                } else {
                    assert_eq!(status(&r), Some(Status::NotFound));
                }
            }
            Op::TruncateLayer(s, l, len) => {
                let id = seq_id(*s);
                let l = *l as usize % (layers + 1); // one past the end: invalid
                let r = pool.truncate_layer(id, l as i64, *len as usize);
                if l >= layers {
                    assert_eq!(status(&r), Some(Status::InvalidArgument));
                } else if let Some(ls) = shadow.get_mut(&id) {
                    r.expect("truncate a layer");
                    ls[l].truncate(*len as usize);
                } else {
                    assert_eq!(status(&r), Some(Status::NotFound));
                }
            }
            Op::Append(s, l, n) => {
                let id = seq_id(*s);
                let l = *l as usize % layers;
                let n = *n as usize % 7;
                let (bytes, rows) = new_rows(n, &mut rng);
                let r = pool.append(id, l as i64, n, Dtype::F32, &bytes);
                match (shadow.get_mut(&id), r) {
                    (None, r) => assert_eq!(status(&r), Some(Status::NotFound)),
                    (Some(ls), Ok(())) => ls[l].extend(rows),
                    (Some(_), Err(e)) => assert_eq!(e.status, Status::PoolExhausted, "{e:?}"),
                }
            }
            Op::AppendBatch(l, items) => {
                let l = *l as usize % layers;
                let items: Vec<(u64, usize)> = items
                    .iter()
                    .take(4)
                    .map(|&(s, n)| (seq_id(s), n as usize % 5))
                    .collect();
                let made: Vec<(Vec<u8>, Vec<Vec<f32>>)> =
                    items.iter().map(|&(_, n)| new_rows(n, &mut rng)).collect();
                let args: Vec<(u64, usize, &[u8])> = items
                    .iter()
                    .zip(&made)
                    .map(|(&(id, n), (b, _))| (id, n, b.as_slice()))
                    .collect();
                let r = pool.append_batch(l as i64, &args, Dtype::F32);
                let dup = (1..items.len()).any(|i| items[..i].iter().any(|x| x.0 == items[i].0));
                let missing = items.iter().any(|(id, _)| !shadow.contains_key(id));
                match r {
                    Ok(()) => {
                        assert!(!dup && !missing);
                        for (&(id, _), (_, rows)) in items.iter().zip(made) {
                            shadow.get_mut(&id).unwrap()[l].extend(rows);
                        }
                    }
                    Err(e) if dup || missing => {
                        assert!(
                            matches!(e.status, Status::InvalidArgument | Status::NotFound),
                            "{e:?}"
                        )
                    }
                    Err(e) => assert_eq!(e.status, Status::PoolExhausted, "{e:?}"),
                }
            }
            Op::Decode {
                layer,
                seqs,
                s_q,
                h_q,
                causal,
                sparse,
            } => {
                let l = *layer as usize % layers;
                let ids: Vec<u64> = seqs.iter().take(3).map(|&s| seq_id(s)).collect();
                if ids.is_empty() {
                    continue;
                }
                let (s_q, h_q) = (1 + *s_q as usize % 3, 1 + *h_q as usize % 5);
                let causal = *causal && sparse.is_none();
                let batch = ids.len();
                let shape = DecodeShape::new(
                    batch as i32,
                    s_q as i32,
                    h_q as i32,
                    d_qk as i32,
                    d_v as i32,
                    0.0,
                    causal,
                )
                .expect("a valid shape");
                // Queries in bf16 (exact in every kernel variant).
                let qv: Vec<f32> = (0..shape.q_elems())
                    .map(|_| half::bf16::from_f32(rng.next()).to_f32())
                    .collect();
                let q: Vec<u8> = qv
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                let (topk, indices, lengths) = match sparse {
                    None => (0, Vec::new(), None),
                    Some((k, ix, ln)) => {
                        let topk = 1 + *k as usize % 6;
                        let fit = |v: &[i8], n: usize, d: i32| -> Vec<i32> {
                            (0..n)
                                .map(|i| {
                                    if v.is_empty() {
                                        d
                                    } else {
                                        v[i % v.len()] as i32
                                    }
                                })
                                .collect()
                        };
                        (
                            topk,
                            fit(ix, batch * s_q * topk, -1),
                            ln.as_ref().map(|v| fit(v, batch, topk as i32)),
                        )
                    }
                };
                let sp = sparse.as_ref().map(|_| PoolSparse {
                    indices: &indices,
                    topk,
                    topk_length: lengths.as_deref(),
                });
                let mut out = vec![0u8; shape.out_elems() * 4];
                let mut lse = vec![f32::NAN; shape.lse_elems()];
                let r = {
                    let mut o = DecodeOutput::new(&shape, Dtype::F32, &mut out, Some(&mut lse))
                        .expect("an output");
                    pool.decode(l as i64, &ids, shape, Dtype::Bf16, &q, sp, None, &mut o)
                };
                // What the shadow expects.
                let mut expect_err = None;
                if let Some(i) = ids.iter().position(|id| !shadow.contains_key(id)) {
                    let _ = i;
                    expect_err = Some(Status::NotFound);
                } else if sparse.is_some() {
                    for b in 0..batch {
                        let len = shadow[&ids[b]][l].len() as i32;
                        let n = lengths.as_ref().map_or(topk as i32, |v| v[b]);
                        if n < 0 || n > topk as i32 {
                            expect_err = Some(Status::InvalidArgument);
                        }
                        for i in 0..s_q {
                            let row = &indices[(b * s_q + i) * topk..]
                                [..(n.clamp(0, topk as i32) as usize)];
                            if row.iter().any(|&p| p != -1 && (p < 0 || p >= len)) {
                                expect_err = Some(Status::InvalidArgument);
                            }
                        }
                    }
                }
                match (expect_err, r) {
                    (Some(want), r) => assert_eq!(status(&r), Some(want), "{r:?}"),
                    (None, Err(e)) => panic!("decode failed: {e:?}"),
                    (None, Ok(())) => {
                        let out: Vec<f32> = out
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        let scale = 1.0 / (d_qk as f64).sqrt();
                        for b in 0..batch {
                            let rows = &shadow[&ids[b]][l];
                            for i in 0..s_q {
                                let keys: Vec<&Vec<f32>> = match sparse {
                                    None => rows[..shape.visible(rows.len(), i)].iter().collect(),
                                    Some(_) => {
                                        let n = lengths.as_ref().map_or(topk, |v| v[b] as usize);
                                        indices[(b * s_q + i) * topk..][..n]
                                            .iter()
                                            .filter(|&&p| p >= 0)
                                            .map(|&p| &rows[p as usize])
                                            .collect()
                                    }
                                };
                                for h in 0..h_q {
                                    let r = (b * s_q + i) * h_q + h;
                                    let (want, wl) =
                                        attend(&qv[r * d_qk..][..d_qk], &keys, d_v, scale);
                                    let got = &out[r * d_v..][..d_v];
                                    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
                                    let diff = want
                                        .iter()
                                        .zip(got)
                                        .map(|(a, b)| (a - *b as f64).powi(2))
                                        .sum::<f64>()
                                        .sqrt();
                                    assert!(
                                        diff <= 1e-3 * norm.max(1e-3),
                                        "row {r}: |d| {diff} |o| {norm}"
                                    );
                                    let gl = lse[(b * h_q + h) * s_q + i] as f64;
                                    if wl.is_finite() {
                                        assert!(
                                            (gl - wl).abs() <= 1e-3 * (1.0 + wl.abs()),
                                            "lse {gl} vs {wl}"
                                        );
                                    } else {
                                        assert_eq!(gl, wl);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        check_stats(&pool, &shadow, bs);
    }
    for id in shadow.keys() {
        pool.free_seq(*id).expect("free");
    }
    let st = pool.stats();
    assert_eq!((st.blocks_used, st.sequences), (0, 0), "blocks leaked");
});
