'use strict';
// KvPool: sequences, append, fork (copy-on-write), truncate, stats, decode.
const test = require('node:test');
const assert = require('node:assert/strict');
const mlart = require('..');
const { rng, randomF32, toBf16Array, fromBf16Array, referenceDecode, relL2 } = require('../testlib/reference');

const dQk = 64;
const dV = 48;
const blockSize = 5;
const numBlocks = 40;

function rowsOf(f32) {
  const rows = [];
  for (let t = 0; t < f32.length / dQk; t++) rows.push(Float64Array.from(f32.subarray(t * dQk, (t + 1) * dQk)));
  return rows;
}

test('KvPool lifecycle, fork, truncate, stats and decode against the reference', () => {
  const engine = new mlart.Engine({ backend: 'cpu' });
  const pool = new mlart.KvPool(engine, { kvFormat: 'f32', dQk, numLayers: 2, blockSize, numBlocks });
  const rand = rng(11);
  try {
    assert.equal(pool.dQk, dQk);
    assert.equal(pool.indexHeadDim, 0, 'indexHeadDim defaults to 0');
    let s = pool.stats();
    assert.deepEqual(s, {
      blocksTotal: numBlocks, blocksUsed: 0, blocksFree: numBlocks, sequences: 0,
      bytesPerBlock: 2 * blockSize * dQk * 4, bytesTotal: numBlocks * 2 * blockSize * dQk * 4,
    });

    // Sequence 1: 12 tokens in layer 0, 7 in layer 1.
    pool.createSeq(1);
    const a0 = randomF32(12 * dQk, rand);
    const a1 = randomF32(7 * dQk, rand);
    pool.append(1, 0, a0.subarray(0, 4 * dQk));
    pool.append(1, 0, a0.subarray(4 * dQk)); // appends continue the sequence
    pool.append(1n, 1, a1);
    pool.append(1, 1, null); // zero tokens: nothing changes
    assert.equal(pool.seqLength(1, 0), 12);
    assert.equal(pool.seqLength(1n, 1), 7);
    s = pool.stats();
    assert.equal(s.sequences, 1);
    assert.equal(s.blocksUsed, 3); // ceil(12 / 5); a block covers every layer
    assert.equal(s.blocksFree, numBlocks - 3);

    // Fork into 2 (BigInt id), then append 3 rows: copy-on-write.
    pool.forkSeq(1, 2n);
    assert.equal(pool.seqLength(2, 0), 12);
    assert.equal(pool.seqLength(2, 1), 7);
    const b0 = randomF32(3 * dQk, rand);
    pool.append(2n, 0, b0);
    assert.equal(pool.seqLength(2, 0), 15);
    assert.equal(pool.seqLength(1, 0), 12, 'an append to the fork changed the source');

    // Truncate 2 to 13: rows 0..11 of seq 1, then b0 row 0.
    pool.truncateSeq(2, 13);
    assert.equal(pool.seqLength(2, 0), 13);
    assert.equal(pool.seqLength(2, 1), 7);
    s = pool.stats();
    assert.equal(s.sequences, 2);
    assert.equal(s.blocksUsed, 4); // 3 of seq 1 + seq 2's private copy of the third block

    // Sequence 3: bf16 rows appended to the f32 pool (exact).
    pool.createSeq(3);
    const c0bits = toBf16Array(randomF32(6 * dQk, rand));
    pool.append(3, 0, c0bits);
    assert.equal(pool.seqLength(3, 0), 6);

    const keys0 = {
      1: rowsOf(a0),
      2: rowsOf(a0).concat(rowsOf(b0).slice(0, 1)),
      3: rowsOf(Float32Array.from(fromBf16Array(c0bits))),
    };
    const ids = [1, 2n, 3, 1];
    const hQ = 7;
    const sQ = 2;
    const q = randomF32(ids.length * sQ * hQ * dQk, rand, 2);
    const lse = new Float32Array(ids.length * hQ * sQ);
    const { out } = pool.decode({ layer: 0, seqIds: ids, sQ, hQ, dV, q, lse });
    const ref = referenceDecode({
      batch: ids.length, sQ, hQ, dQk, dV, q: Float64Array.from(q), keys: ids.map((i) => keys0[Number(i)]),
    });
    assert.ok(relL2(Float64Array.from(out), ref.out) <= 1e-5, `layer 0 out rel-L2 ${relL2(Float64Array.from(out), ref.out)}`);
    assert.ok(relL2(Float64Array.from(lse), ref.lse) <= 1e-5);

    // Layer 1 (seq 3 has no tokens there: out 0, lse +inf), causal, bf16 q and out.
    const q1 = toBf16Array(randomF32(3 * sQ * hQ * dQk, rand, 2));
    const r1 = pool.decode({
      layer: 1, seqIds: BigUint64Array.of(1n, 2n, 3n), sQ, hQ, dV, q: q1, causal: true, outDtype: 'bf16', lse: true,
    });
    const ref1 = referenceDecode({
      batch: 3, sQ, hQ, dQk, dV, q: fromBf16Array(q1), keys: [rowsOf(a1), rowsOf(a1), []], causal: true,
    });
    assert.ok(r1.out instanceof Uint16Array);
    assert.ok(relL2(fromBf16Array(r1.out), ref1.out) <= 4e-3);
    assert.ok(relL2(Float64Array.from(r1.lse), ref1.lse) <= 1e-5);
    for (let i = 0; i < hQ * sQ; i++) assert.equal(r1.lse[2 * hQ * sQ + i], Infinity);

    // Truncate further frees seq 2's private block; free seq 2.
    pool.truncateSeq(2, 10n);
    assert.equal(pool.seqLength(2, 0), 10);
    assert.equal(pool.stats().blocksUsed, 3 + 2); // seq 1: 3, seq 3: 2
    pool.freeSeq(2);
    assert.equal(pool.stats().sequences, 2);
    assert.throws(
      () => pool.seqLength(2),
      (e) => e instanceof mlart.MlartError && e.code === 'NOT_FOUND' && e.status === mlart.Status.NOT_FOUND
    );
    pool.freeSeq(1);
    pool.freeSeq(3n);
    assert.equal(pool.stats().blocksUsed, 0);
  } finally {
    pool.close();
    engine.close();
  }
});

test('a full pool: POOL_EXHAUSTED and nothing changes', () => {
  const engine = new mlart.Engine({ backend: 'cpu' });
  const pool = new mlart.KvPool(engine, { kvFormat: 'bf16', dQk, blockSize: 4, numBlocks: 2 });
  try {
    pool.createSeq(7);
    pool.append(7, 0, new Float32Array(6 * dQk));
    assert.throws(
      () => pool.append(7, 0, new Float32Array(3 * dQk)),
      (e) => e instanceof mlart.MlartError && e.code === 'POOL_EXHAUSTED' && e.status === mlart.Status.POOL_EXHAUSTED
    );
    assert.equal(pool.seqLength(7), 6);
    pool.append(7, 0, new Float32Array(2 * dQk));
    assert.equal(pool.seqLength(7), 8);
  } finally {
    pool.close();
    pool.close();
    engine.close();
  }
  assert.throws(() => pool.stats(), /closed/);
});

test('seq ids: full uint64 range as BigInt; negative and fractional ids are rejected in JS', () => {
  const engine = new mlart.Engine({ backend: 'cpu' });
  const pool = new mlart.KvPool(engine, { kvFormat: 'f32', dQk: 8, blockSize: 2, numBlocks: 4 });
  try {
    const big = (1n << 64n) - 1n;
    pool.createSeq(big);
    pool.append(big, 0, new Float32Array(8).fill(2));
    assert.equal(pool.seqLength(big), 1);
    const { out } = pool.decode({ seqIds: [big], hQ: 1, dV: 8, q: new Float32Array(8) });
    assert.deepEqual(Array.from(out), new Array(8).fill(2));
    assert.throws(() => pool.createSeq(-1), RangeError);
    assert.throws(() => pool.createSeq(1n << 64n), RangeError);
    assert.throws(() => pool.createSeq(1.5), TypeError);
    assert.throws(() => pool.createSeq('3'), TypeError);
  } finally {
    pool.close();
    engine.close();
  }
});

test('indexHeadDim (DeepSeek-V3.2 indexer keys): round trip, room per block, append refused', () => {
  const engine = new mlart.Engine({ backend: 'cpu' });
  const opts = { kvFormat: 'f32', dQk: 80, blockSize: 4, numBlocks: 8 };
  const plain = new mlart.KvPool(engine, opts);
  const pool = new mlart.KvPool(engine, { ...opts, indexHeadDim: 32 });
  try {
    assert.equal(plain.indexHeadDim, 0);
    assert.equal(pool.indexHeadDim, 32);
    assert.equal(pool.dQk, 80);
    assert.ok(pool.stats().bytesPerBlock > plain.stats().bytesPerBlock, 'indexer keys take no room');
    pool.createSeq(1);
    assert.throws(
      () => pool.append(1, 0, new Float32Array(80)),
      (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /index_head_dim/.test(e.message)
    );
    assert.equal(pool.seqLength(1), 0);
    assert.throws(
      () => new mlart.KvPool(engine, { ...opts, indexHeadDim: -1 }),
      (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /index_head_dim/.test(e.message)
    );
    assert.throws(() => new mlart.KvPool(engine, { ...opts, indexHeadDim: 1.5 }), (e) => e instanceof TypeError && /indexHeadDim/.test(e.message));
  } finally {
    pool.close();
    plain.close();
    engine.close();
  }
});
