'use strict';
// mlart_decode_paged against a float64 reference over caches built by hand.
const test = require('node:test');
const assert = require('node:assert/strict');
const mlart = require('..');
const { rng, randomF32, toBf16Array, fromBf16Array, referenceDecode, relL2 } = require('../testlib/reference');
const { buildCache } = require('../testlib/cache');

let engine;
test.before(() => {
  engine = new mlart.Engine({ backend: 'cpu' });
});
test.after(() => engine.close());

/**
 * One decode case. qDtype/outDtype: 'f32' or 'bf16'. Returns the rel-L2
 * errors of out and lse.
 */
function runCase({ seed, format, dQk, dV, hQ, sQ = 1, blockSize, lens, qDtype = 'f32', outDtype = 'f32', causal = false }) {
  const rand = rng(seed);
  const batch = lens.length;
  const blockBytes = mlart.kvBlockBytes(format, dQk, blockSize);
  assert.equal(blockBytes, blockSize * dQk * (format === 'f32' ? 4 : 2));
  const seqs = lens.map((l) => randomF32(l * dQk, rand));
  const cache = buildCache({ format, dQk, blockSize, blockBytes, seqs, rand });

  const qF32 = randomF32(batch * sQ * hQ * dQk, rand, 2);
  let q;
  let qRef;
  if (qDtype === 'bf16') {
    q = toBf16Array(qF32);
    qRef = fromBf16Array(q);
  } else {
    q = qF32;
    qRef = Float64Array.from(qF32);
  }
  const nOut = batch * sQ * hQ * dV;
  const out = outDtype === 'bf16' ? new Uint16Array(nOut) : new Float32Array(nOut).fill(NaN);
  const lse = new Float32Array(batch * hQ * sQ).fill(NaN);

  const r = engine.decodePaged({
    batch, sQ, hQ, dQk, dV, causal,
    q, qDtype,
    kvFormat: format, kv: cache.kv, numBlocks: cache.numBlocks, blockSize,
    blockTable: cache.blockTable, blockTableStride: cache.stride, seqlens: cache.seqlens,
    out, outDtype, lse,
  });
  assert.equal(r.out, out);
  assert.equal(r.lse, lse);

  const ref = referenceDecode({ batch, sQ, hQ, dQk, dV, q: qRef, keys: cache.keys, causal });
  const got = outDtype === 'bf16' ? fromBf16Array(out) : Float64Array.from(out);
  // A query that sees no key: out 0, lse +inf.
  for (let b = 0; b < batch; b++) {
    if (lens[b] === 0) {
      for (let i = 0; i < sQ * hQ * dV; i++) assert.equal(got[b * sQ * hQ * dV + i], 0);
      for (let i = 0; i < hQ * sQ; i++) assert.equal(lse[b * hQ * sQ + i], Infinity);
    }
  }
  return { outErr: relL2(got, ref.out), lseErr: relL2(Float64Array.from(lse), ref.lse) };
}

test('F32 cache, f32 q/out, dQk 576 / dV 512, lens 0,1,13,37, hQ 20, block 7', () => {
  const { outErr, lseErr } = runCase({
    seed: 1, format: 'f32', dQk: 576, dV: 512, hQ: 20, blockSize: 7, lens: [0, 1, 13, 37],
  });
  assert.ok(outErr <= 1e-5, `out rel-L2 ${outErr}`);
  assert.ok(lseErr <= 1e-5, `lse rel-L2 ${lseErr}`);
});

test('BF16 cache, f32 q/out, dQk 576 / dV 512, lens 1,0,29, hQ 3, block 6', () => {
  const { outErr, lseErr } = runCase({
    seed: 2, format: 'bf16', dQk: 576, dV: 512, hQ: 3, blockSize: 6, lens: [1, 0, 29],
  });
  assert.ok(outErr <= 1e-5, `out rel-L2 ${outErr}`);
  assert.ok(lseErr <= 1e-5, `lse rel-L2 ${lseErr}`);
});

test('BF16 cache, bf16 q and bf16 out, dQk 64 / dV 48, sQ 2, hQ 5, block 5', () => {
  const { outErr, lseErr } = runCase({
    seed: 3, format: 'bf16', dQk: 64, dV: 48, hQ: 5, sQ: 2, blockSize: 5, lens: [0, 1, 9, 23],
    qDtype: 'bf16', outDtype: 'bf16',
  });
  assert.ok(outErr <= 4e-3, `out rel-L2 ${outErr}`);
  assert.ok(lseErr <= 1e-5, `lse rel-L2 ${lseErr}`);
});

test('F32 cache, causal sQ 3, dQk 64 / dV 48, hQ 17, block 3', () => {
  const { outErr, lseErr } = runCase({
    seed: 4, format: 'f32', dQk: 64, dV: 48, hQ: 17, sQ: 3, blockSize: 3, lens: [2, 0, 1, 11], causal: true,
  });
  assert.ok(outErr <= 1e-5, `out rel-L2 ${outErr}`);
  assert.ok(lseErr <= 1e-5, `lse rel-L2 ${lseErr}`);
});

test('subarray views are read and written at their offset; out and lse allocated when omitted', () => {
  const rand = rng(5);
  const dQk = 64, dV = 48, hQ = 3, blockSize = 5, lens = [4, 7];
  const blockBytes = mlart.kvBlockBytes('f32', dQk, blockSize);
  const cache = buildCache({ format: 'f32', dQk, blockSize, blockBytes, seqs: lens.map((l) => randomF32(l * dQk, rand)), rand });
  const nQ = 2 * hQ * dQk;
  const qBig = randomF32(nQ + 2 * dQk, rand);
  const q = qBig.subarray(dQk, dQk + nQ);
  const outBig = new Float32Array(2 * hQ * dV + 20).fill(-5);
  const out = outBig.subarray(10, 10 + 2 * hQ * dV);
  const kvBig = new Uint8Array(cache.kv.length + 64);
  kvBig.set(cache.kv, 32);
  const base = {
    batch: 2, hQ, dQk, dV, kvFormat: 'f32', numBlocks: cache.numBlocks, blockSize,
    blockTable: cache.blockTable, blockTableStride: cache.stride, seqlens: cache.seqlens, q,
  };
  engine.decodePaged({ ...base, kv: kvBig.subarray(32, 32 + cache.kv.length), out });
  const ref = referenceDecode({ batch: 2, sQ: 1, hQ, dQk, dV, q: Float64Array.from(q), keys: cache.keys });
  assert.ok(relL2(Float64Array.from(out), ref.out) <= 1e-5);
  for (let i = 0; i < 10; i++) assert.equal(outBig[i], -5);
  for (let i = 10 + out.length; i < outBig.length; i++) assert.equal(outBig[i], -5);

  const r = engine.decodePaged({ ...base, kv: cache.kv, lse: true });
  assert.ok(r.out instanceof Float32Array && r.out.length === 2 * hQ * dV);
  assert.ok(relL2(Float64Array.from(r.out), ref.out) <= 1e-5);
  assert.ok(relL2(Float64Array.from(r.lse), ref.lse) <= 1e-5);
  const r16 = engine.decodePaged({ ...base, kv: cache.kv, outDtype: 'bf16' });
  assert.ok(r16.out instanceof Uint16Array);
  assert.equal(r16.lse, undefined);
  assert.ok(relL2(fromBf16Array(r16.out), ref.out) <= 4e-3);
});

test('kvQuantize(BF16) matches the hand-built layout; f32ToBf16 matches the test conversion', () => {
  const rand = rng(6);
  const dQk = 64, blockSize = 5, n = 12;
  const rows = randomF32(n * dQk, rand, 3);
  const blockBytes = mlart.kvBlockBytes('bf16', dQk, blockSize);
  const bytes = mlart.kvQuantize('bf16', dQk, blockSize, rows);
  assert.equal(bytes.length, Math.ceil(n / blockSize) * blockBytes);
  const bits = new Uint16Array(bytes.buffer, bytes.byteOffset, n * dQk); // blocks contiguous, no padding
  assert.deepEqual(bits, toBf16Array(rows));
  assert.deepEqual(mlart.f32ToBf16(rows), toBf16Array(rows));
  const back = mlart.kvDequantize('bf16', dQk, blockSize, n, bytes);
  assert.deepEqual(Array.from(back), Array.from(fromBf16Array(bits)));
});

test('sparse decode (indices with -1 and duplicates, topkLength) against the reference', () => {
  const rand = rng(7);
  const dQk = 64, dV = 48, hQ = 5, blockSize = 3, lens = [10, 4];
  const blockBytes = mlart.kvBlockBytes('bf16', dQk, blockSize);
  const cache = buildCache({ format: 'bf16', dQk, blockSize, blockBytes, seqs: lens.map((l) => randomF32(l * dQk, rand)), rand });
  const pos = (b, t) => cache.blockTable[b * cache.stride + Math.floor(t / blockSize)] * blockSize + (t % blockSize);
  const topk = 6;
  // seq 0: tokens 9, 2, 2 (twice), -1, 5 and a 6th entry cut off by topkLength; seq 1: 0, 3, then -1s.
  const indices = Int32Array.of(pos(0, 9), pos(0, 2), pos(0, 2), -1, pos(0, 5), pos(0, 7), pos(1, 0), pos(1, 3), -1, -1, -1, -1);
  const topkLength = Int32Array.of(5, 6);
  const q = randomF32(2 * hQ * dQk, rand, 2);
  const { out, lse } = engine.decodePaged({
    batch: 2, hQ, dQk, dV, q, kvFormat: 'bf16', kv: cache.kv, numBlocks: cache.numBlocks, blockSize,
    indices, topk, topkLength, lse: true,
  });
  const K = cache.keys;
  const keys = [[K[0][9], K[0][2], K[0][2], K[0][5]], [K[1][0], K[1][3]]];
  const ref = referenceDecode({ batch: 2, sQ: 1, hQ, dQk, dV, q: Float64Array.from(q), keys });
  assert.ok(relL2(Float64Array.from(out), ref.out) <= 1e-5, `out rel-L2 ${relL2(Float64Array.from(out), ref.out)}`);
  assert.ok(relL2(Float64Array.from(lse), ref.lse) <= 1e-5);
});
