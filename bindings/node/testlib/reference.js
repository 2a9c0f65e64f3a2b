'use strict';
// Test support, independent of the binding: a seeded PRNG, bf16 conversion
// and a float64 reference of MLA decode attention.

/** mulberry32: a small seeded PRNG; returns uniform floats in [-1, 1). */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1;
  };
}

function randomF32(n, rand, scale = 1) {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rand() * scale;
  return a;
}

const dv = new DataView(new ArrayBuffer(4));

/** float -> bf16 bits, round to nearest even (finite inputs). */
function toBf16Bits(x) {
  dv.setFloat32(0, x);
  const u = dv.getUint32(0);
  const lsb = Math.floor(u / 65536) % 2;
  return Math.floor((u + 0x7fff + lsb) / 65536) % 65536;
}

/** bf16 bits -> number. */
function fromBf16Bits(b) {
  dv.setUint32(0, b * 65536);
  return dv.getFloat32(0);
}

function toBf16Array(f32) {
  const out = new Uint16Array(f32.length);
  for (let i = 0; i < f32.length; i++) out[i] = toBf16Bits(f32[i]);
  return out;
}

function fromBf16Array(u16) {
  const out = new Float64Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = fromBf16Bits(u16[i]);
  return out;
}

/**
 * Reference decode in float64, one KV head.
 * q: [batch, sQ, hQ, dQk] numbers; keys[b]: array of rows (length dQk) of
 * sequence b (its first seqlen[b] tokens). Returns {out [batch,sQ,hQ,dV],
 * lse [batch,hQ,sQ]}.
 */
function referenceDecode({ batch, sQ, hQ, dQk, dV, q, keys, causal = false, scale }) {
  const s = scale ?? 1 / Math.sqrt(dQk);
  const out = new Float64Array(batch * sQ * hQ * dV);
  const lse = new Float64Array(batch * hQ * sQ);
  for (let b = 0; b < batch; b++) {
    const K = keys[b];
    for (let i = 0; i < sQ; i++) {
      const visible = causal ? Math.max(0, K.length - (sQ - 1 - i)) : K.length;
      for (let h = 0; h < hQ; h++) {
        const qo = ((b * sQ + i) * hQ + h) * dQk;
        const oo = ((b * sQ + i) * hQ + h) * dV;
        const lo = (b * hQ + h) * sQ + i;
        if (visible === 0) {
          lse[lo] = Infinity;
          continue;
        }
        const scores = new Float64Array(visible);
        let max = -Infinity;
        for (let t = 0; t < visible; t++) {
          let dot = 0;
          const row = K[t];
          for (let c = 0; c < dQk; c++) dot += q[qo + c] * row[c];
          scores[t] = dot * s;
          if (scores[t] > max) max = scores[t];
        }
        let sum = 0;
        for (let t = 0; t < visible; t++) {
          scores[t] = Math.exp(scores[t] - max);
          sum += scores[t];
        }
        for (let t = 0; t < visible; t++) {
          const p = scores[t] / sum;
          const row = K[t];
          for (let c = 0; c < dV; c++) out[oo + c] += p * row[c];
        }
        lse[lo] = max + Math.log(sum);
      }
    }
  }
  return { out, lse };
}

/** ||a - b|| / ||b|| over finite entries of b (a must match b's non-finite ones exactly). */
function relL2(a, b) {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    if (!Number.isFinite(b[i])) {
      if (a[i] !== b[i]) return Infinity;
      continue;
    }
    const d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

module.exports = { rng, randomF32, toBf16Bits, fromBf16Bits, toBf16Array, fromBf16Array, referenceDecode, relL2 };
