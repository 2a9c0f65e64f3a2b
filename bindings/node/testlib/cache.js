'use strict';
// Builds a paged KV cache by hand (F32 or BF16 rows, blocks contiguous),
// with shuffled block ids, NaN in every slot no sequence uses and invalid
// ids in block-table entries past each sequence's length.

const { toBf16Bits, fromBf16Bits } = require('./reference');

/**
 * @param {object} o
 * @param {'f32'|'bf16'} o.format
 * @param {number} o.dQk
 * @param {number} o.blockSize
 * @param {number} o.blockBytes  from mlart.kvBlockBytes (the stride between blocks)
 * @param {Float32Array[]} o.seqs  rows [len, dQk] of each sequence
 * @param {() => number} o.rand
 */
function buildCache({ format, dQk, blockSize, blockBytes, seqs, rand }) {
  const elt = format === 'f32' ? 4 : 2;
  const rowBytes = dQk * elt;
  const lens = seqs.map((s) => s.length / dQk);
  const need = lens.map((l) => Math.ceil(l / blockSize));
  const stride = Math.max(1, ...need) + 2;
  const used = need.reduce((a, b) => a + b, 0);
  const numBlocks = used + 3;

  // Shuffled block ids.
  const ids = Array.from({ length: numBlocks }, (_, i) => i);
  for (let i = ids.length - 1; i > 0; i--) {
    const j = Math.floor(((rand() + 1) / 2) * (i + 1)) % (i + 1);
    [ids[i], ids[j]] = [ids[j], ids[i]];
  }

  const kv = new Uint8Array(numBlocks * blockBytes);
  const view = new DataView(kv.buffer);
  // NaN everywhere first: slots past a length and unused blocks must not be read.
  for (let off = 0; off + elt <= kv.length; off += elt) {
    if (elt === 4) view.setUint32(off, 0x7fc00000, true);
    else view.setUint16(off, 0x7fc0, true);
  }

  const blockTable = new Int32Array(seqs.length * stride).fill(0x7fffffff);
  const keys = [];
  let next = 0;
  for (let b = 0; b < seqs.length; b++) {
    for (let j = 0; j < need[b]; j++) blockTable[b * stride + j] = ids[next++];
    const rows = [];
    for (let t = 0; t < lens[b]; t++) {
      const block = blockTable[b * stride + Math.floor(t / blockSize)];
      const base = block * blockBytes + (t % blockSize) * rowBytes;
      const row = new Float64Array(dQk);
      for (let c = 0; c < dQk; c++) {
        const x = seqs[b][t * dQk + c];
        if (elt === 4) {
          view.setFloat32(base + 4 * c, x, true);
          row[c] = Math.fround(x);
        } else {
          const bits = toBf16Bits(x);
          view.setUint16(base + 2 * c, bits, true);
          row[c] = fromBf16Bits(bits);
        }
      }
      rows.push(row);
    }
    keys.push(rows);
  }
  return { kv, numBlocks, blockTable, stride, seqlens: Int32Array.from(lens), keys, rowBytes };
}

module.exports = { buildCache };
