'use strict';
// Model: load the tiny checkpoint, one forward on a pool.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const os = require('node:os');
const mlart = require('..');
const { rng, randomF32, relL2 } = require('../testlib/reference');

const MODEL_DIR = process.env.MLART_TEST_MODEL_DIR || '/tmp/tiny-model';
const haveModel = fs.existsSync(path.join(MODEL_DIR, 'config.json'));
const skip = haveModel ? false : `no checkpoint at ${MODEL_DIR} (set MLART_TEST_MODEL_DIR)`;

let engine;
test.before(() => {
  engine = new mlart.Engine({ backend: 'cpu' });
});
test.after(() => engine.close());

test('Model.load, info and forward on a pool', { skip }, () => {
  const model = mlart.Model.load(engine, MODEL_DIR, { firstLayer: 0, numLayers: 2 });
  const info = model.info();
  assert.equal(info.numLayers, 2);
  assert.equal(info.firstLayer, 0);
  assert.equal(info.loadedLayers, 2);
  assert.equal(info.hiddenSize, 256);
  assert.equal(info.numHeads, 4);
  assert.equal(info.kvLoraRank, 64);
  assert.equal(info.qkRopeHeadDim, 16);
  assert.equal(info.dQk, info.kvLoraRank + info.qkRopeHeadDim);
  assert.equal(typeof info.weightDtype, 'string');
  assert.equal(info.activations, 'precise');
  assert.ok(['scalar', 'avx2', 'avx512', 'avx512bf16'].includes(info.projectionIsa), info.projectionIsa);
  assert.ok(info.bytesLoaded > 0);
  assert.ok(info.softmaxScale > 0);
  assert.deepEqual([info.indexNHeads, info.indexHeadDim, info.indexTopk], [0, 0, 0]);
  assert.equal(info.projectionsOnGpu, false);
  assert.equal(info.keptKeysBytes, 1073741824, 'keptKeysBytes default: 1 GiB');

  const hidden = info.hiddenSize;
  const pool = new mlart.KvPool(engine, { dQk: info.dQk, numLayers: info.loadedLayers, blockSize: 16, numBlocks: 8 });
  try {
    const rand = rng(31);
    const x = randomF32(3 * hidden, rand);
    const forward = (id, input) => {
      pool.createSeq(id);
      const out = new Float32Array(3 * hidden).fill(NaN);
      const r = model.forward(pool, { layer: 0, seqIds: [id], nTokens: Int32Array.of(3), x: input, out });
      assert.equal(r, out);
      assert.equal(pool.seqLength(id, 0), 3);
      assert.equal(pool.seqLength(id, 1), 0);
      return out;
    };
    const out1 = forward(1, x);
    assert.ok(out1.every(Number.isFinite), 'non-finite output');
    assert.ok(out1.some((v) => v !== 0), 'all-zero output');

    const out2 = forward(2, x); // same input, same positions: same output
    assert.deepEqual(out2, out1);

    const x3 = Float32Array.from(x);
    for (let i = 0; i < hidden; i++) x3[2 * hidden + i] += 0.5; // change the last token only
    const out3 = forward(3, x3);
    assert.ok(out3.every(Number.isFinite));
    let diffLast = 0;
    for (let i = 0; i < hidden; i++) diffLast += Math.abs(out3[2 * hidden + i] - out1[2 * hidden + i]);
    assert.ok(diffLast > 1e-3, 'output did not change with the input');
    // Causal: the first two tokens do not see the third.
    assert.deepEqual(out3.subarray(0, 2 * hidden), out1.subarray(0, 2 * hidden));

    // Bf16 activations reach the library: close to the precise output, not equal.
    const rounded = mlart.Model.load(engine, MODEL_DIR, { activations: 'bf16' });
    try {
      assert.equal(rounded.info().activations, 'bf16');
      pool.createSeq(4);
      const out4 = rounded.forward(pool, { layer: 0, seqIds: [4], nTokens: [3], x });
      let num = 0;
      let den = 0;
      for (let i = 0; i < out4.length; i++) {
        num += (out4[i] - out1[i]) ** 2;
        den += out1[i] ** 2;
      }
      const rel = Math.sqrt(num / den);
      assert.ok(rel > 1e-5 && rel < 1e-2, `bf16 activations vs precise: rel-L2 ${rel}`);
    } finally {
      rounded.close();
    }
    assert.throws(
      () => mlart.Model.load(engine, MODEL_DIR, { activations: 'fp8' }),
      (e) => e instanceof RangeError && /activations/.test(e.message)
    );

    // A decode step continues the positions; bf16 input and an allocated output.
    const step = model.forward(pool, { layer: 0, seqIds: [1], nTokens: 1, x: mlart.f32ToBf16(randomF32(hidden, rand)), xDtype: 'bf16' });
    assert.ok(step instanceof Float32Array && step.length === hidden && step.every(Number.isFinite));
    assert.equal(pool.seqLength(1, 0), 4);

    // Short buffers are caught in JS; a layer not loaded is the library's error.
    assert.throws(
      () => model.forward(pool, { layer: 0, seqIds: [1], nTokens: [2], x: new Float32Array(2 * hidden - 1) }),
      (e) => e instanceof RangeError && e.message.startsWith('x has ')
    );
    assert.throws(
      () => model.forward(pool, { layer: 0, seqIds: [1], nTokens: [2], x: new Float32Array(2 * hidden), out: new Float32Array(hidden) }),
      (e) => e instanceof RangeError && e.message.startsWith('out has ')
    );
    assert.throws(
      () => model.forward(pool, { layer: 5, seqIds: [1], nTokens: [1], x: new Float32Array(hidden) }),
      (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /layer/.test(e.message)
    );
    // No indexer: indexOut, and a pool with indexer keys, are the library's errors.
    assert.throws(
      () => model.forward(pool, { layer: 0, seqIds: [1], nTokens: [1], x: new Float32Array(hidden), indexOut: new Int32Array(8) }),
      (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /index_out/.test(e.message)
    );
    const keyed = new mlart.KvPool(engine, { dQk: info.dQk, numLayers: info.loadedLayers, blockSize: 16, numBlocks: 2, indexHeadDim: 32 });
    try {
      keyed.createSeq(1);
      assert.throws(
        () => model.forward(keyed, { layer: 0, seqIds: [1], nTokens: [1], x: new Float32Array(hidden) }),
        (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /index_head_dim/.test(e.message)
      );
    } finally {
      keyed.close();
    }
    assert.equal(pool.seqLength(1, 0), 4, 'a failed forward changed the pool');
  } finally {
    pool.close();
    model.close();
    model.close();
  }
  assert.throws(() => model.info(), /closed/);
});

test('Model.load gpuProjections: a CPU engine accepts and ignores it; bad values are rejected', { skip }, () => {
  const base = mlart.Model.load(engine, MODEL_DIR);
  const pool = new mlart.KvPool(engine, { dQk: base.info().dQk, numLayers: 2, blockSize: 16, numBlocks: 8 });
  try {
    const hidden = base.info().hiddenSize;
    const x = randomF32(2 * hidden, rng(41));
    let id = 0;
    const forward = (model) => {
      pool.createSeq(++id);
      return model.forward(pool, { layer: 1, seqIds: [id], nTokens: [2], x });
    };
    const want = forward(base);
    for (const gpuProjections of [true, false, undefined, null, -1, 0, 1]) {
      const model = mlart.Model.load(engine, MODEL_DIR, { gpuProjections });
      try {
        assert.equal(model.info().projectionsOnGpu, false, `gpuProjections ${gpuProjections}`);
        assert.deepEqual(forward(model), want, `gpuProjections ${gpuProjections} changed the output`);
      } finally {
        model.close();
      }
    }
  } finally {
    pool.close();
    base.close();
  }
  // Numbers are the C value: the library rejects what is not -1, 0 or 1.
  assert.throws(
    () => mlart.Model.load(engine, MODEL_DIR, { gpuProjections: 2 }),
    (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /gpu_projections = 2/.test(e.message)
  );
  assert.throws(
    () => mlart.Model.load(engine, MODEL_DIR, { gpuProjections: 'gpu' }),
    (e) => e instanceof TypeError && /gpuProjections must be a boolean/.test(e.message)
  );
  assert.throws(
    () => mlart.Model.load(engine, MODEL_DIR, { gpuProjections: 0.5 }),
    (e) => e instanceof TypeError && /gpuProjections must be an integer/.test(e.message)
  );
});

test('Model.load keptKeysBytes: the value in effect is in info(); a long prompt keeping none matches; bad values are rejected', { skip }, () => {
  const GiB = 1073741824;
  const UINT64_MAX = (1n << 64n) - 1n;
  for (const [keptKeysBytes, want] of [
    [undefined, GiB],
    [null, GiB],
    [0, GiB],
    [0n, GiB],
    [1, 1],
    [5 << 20, 5 << 20],
    [3n * BigInt(GiB), 3 * GiB],
    [Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
    [UINT64_MAX, Number(UINT64_MAX)],
  ]) {
    const model = mlart.Model.load(engine, MODEL_DIR, { keptKeysBytes });
    try {
      assert.equal(model.info().keptKeysBytes, want, `keptKeysBytes ${keptKeysBytes}`);
    } finally {
      model.close();
    }
  }

  // Past 512 new tokens a forward runs in passes; keeping no keys between
  // them up-projects the earlier positions again: the same attention.
  const base = mlart.Model.load(engine, MODEL_DIR);
  const none = mlart.Model.load(engine, MODEL_DIR, { keptKeysBytes: 1 });
  const ntok = 600;
  const pool = new mlart.KvPool(engine, { dQk: base.info().dQk, numLayers: 2, blockSize: 64, numBlocks: 64 });
  try {
    const x = randomF32(ntok * base.info().hiddenSize, rng(43));
    pool.createSeq(1);
    const want = base.forward(pool, { layer: 1, seqIds: [1], nTokens: [ntok], x });
    pool.createSeq(2);
    const got = none.forward(pool, { layer: 1, seqIds: [2], nTokens: [ntok], x });
    const d = relL2(got, want);
    assert.ok(d < 1e-6, `keptKeysBytes 1 changed a ${ntok}-token prompt: rel-L2 ${d}`);
  } finally {
    pool.close();
    none.close();
    base.close();
  }

  const rejects = (keptKeysBytes, type, re) =>
    assert.throws(
      () => mlart.Model.load(engine, MODEL_DIR, { keptKeysBytes }),
      (e) => e instanceof type && re.test(e.message),
      `keptKeysBytes ${typeof keptKeysBytes} ${keptKeysBytes}`
    );
  rejects(-1, RangeError, /^keptKeysBytes = -1 is outside the uint64_t range$/);
  rejects(-1n, RangeError, /^keptKeysBytes = -1 is outside the uint64_t range$/);
  rejects(1n << 64n, RangeError, /^keptKeysBytes = 18446744073709551616 is outside the uint64_t range$/);
  rejects(2 ** 60, RangeError, /^keptKeysBytes = \d+ is not a safe integer \(pass a BigInt/);
  rejects(0.5, TypeError, /^keptKeysBytes must be a non-negative integer \(a Number or a BigInt\), got /);
  rejects('1GiB', TypeError, /^keptKeysBytes must be a non-negative integer/);
  rejects(true, TypeError, /^keptKeysBytes must be a non-negative integer/);
});

const V32_DIR = process.env.MLART_TEST_MODEL_V32_DIR || '/tmp/tiny-v32-model';
const skipV32 = fs.existsSync(path.join(V32_DIR, 'config.json'))
  ? false
  : `no tiny-v3.2 checkpoint at ${V32_DIR} (set MLART_TEST_MODEL_V32_DIR; mlart gen-model --preset tiny-v3.2)`;

// Rows of indexOut for tokens at positions first..: a token at p < topk
// attends to 0..p then -1; a later one to topk ascending positions in [0, p].
function checkSelection(sel, first, topk) {
  for (let r = 0; r < sel.length / topk; r++) {
    const p = first + r;
    const row = Array.from(sel.subarray(r * topk, (r + 1) * topk));
    if (p < topk) {
      assert.deepEqual(row, Array.from({ length: topk }, (_, j) => (j <= p ? j : -1)), `position ${p}`);
    } else {
      assert.ok(row.every((v, j) => v >= 0 && v <= p && (j === 0 || v > row[j - 1])), `position ${p}: ${row}`);
    }
  }
}

test('DeepSeek-V3.2: indexer info, pool indexHeadDim, indexOut over a sparse prefill and a decode step', { skip: skipV32 }, () => {
  const model = mlart.Model.load(engine, V32_DIR);
  try {
    const info = model.info();
    assert.deepEqual([info.indexNHeads, info.indexHeadDim, info.indexTopk, info.dQk], [4, 32, 8, 80]);
    const hidden = info.hiddenSize;
    const topk = info.indexTopk;
    const opts = { dQk: info.dQk, numLayers: info.loadedLayers, blockSize: 4, numBlocks: 16 };
    const plain = new mlart.KvPool(engine, opts);
    const pool = new mlart.KvPool(engine, { ...opts, indexHeadDim: info.indexHeadDim });
    try {
      const n = 13; // past top-8: the last 5 tokens attend sparsely
      const rand = rng(32);
      const x = randomF32((n + 1) * hidden, rand);
      const prefill = x.subarray(0, n * hidden);
      plain.createSeq(1);
      pool.createSeq(1);
      assert.throws(
        () => model.forward(plain, { layer: 0, seqIds: [1], nTokens: [n], x: prefill }),
        (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /index_head_dim/.test(e.message)
      );
      assert.throws(
        () => model.forward(pool, { layer: 0, seqIds: [1], nTokens: [n], x: prefill, indexOut: new Int32Array(n * topk - 1) }),
        (e) => e instanceof RangeError && e.message === `indexOut has ${n * topk - 1} elements but indexOut [sum(nTokens)=${n}, indexTopk=${topk}] needs ${n * topk}`
      );
      assert.throws(
        () => model.forward(pool, { layer: 0, seqIds: [1], nTokens: [n], x: prefill, indexOut: new Array(n * topk).fill(0) }),
        (e) => e instanceof TypeError && /indexOut must be an Int32Array/.test(e.message)
      );
      assert.equal(pool.seqLength(1), 0, 'a failed forward changed the pool');

      const sel = new Int32Array(n * topk).fill(12345);
      const out = model.forward(pool, { layer: 0, seqIds: [1], nTokens: [n], x: prefill, indexOut: sel });
      assert.ok(out.every(Number.isFinite), 'non-finite output');
      checkSelection(sel, 0, topk);

      // indexOut only reports: the same tokens without it give the same output.
      pool.createSeq(2);
      assert.deepEqual(model.forward(pool, { layer: 0, seqIds: [2], nTokens: [n], x: prefill }), out);

      const step = new Int32Array(topk);
      model.forward(pool, { layer: 0, seqIds: [1], nTokens: 1, x: x.subarray(n * hidden), indexOut: step });
      checkSelection(step, n, topk);
      assert.equal(pool.seqLength(1), n + 1);
    } finally {
      pool.close();
      plain.close();
    }
  } finally {
    model.close();
  }
});

test('a missing directory is an MlartError with the library\'s status', () => {
  const dir = path.join(os.tmpdir(), `mlart-no-such-model-${process.pid}`);
  assert.throws(
    () => mlart.Model.load(engine, dir),
    (e) => {
      assert.ok(e instanceof mlart.MlartError);
      assert.ok(['IO', 'NOT_FOUND'].includes(e.code), e.code);
      assert.equal(e.status, mlart.Status[e.code]);
      assert.ok(e.message.includes(dir), e.message);
      return true;
    }
  );
});

test('load progress is reported; returning false cancels', { skip }, () => {
  const seen = [];
  const model = mlart.Model.load(engine, MODEL_DIR, { numLayers: 1, progress: (f, stage) => { seen.push([f, stage]); } });
  model.close();
  assert.ok(seen.length > 0);
  assert.equal(seen[seen.length - 1][0], 1);
  assert.ok(seen.every(([f, s]) => f >= 0 && f <= 1 && typeof s === 'string' && s.length > 0));
  assert.throws(
    () => mlart.Model.load(engine, MODEL_DIR, { progress: () => false }),
    (e) => e instanceof mlart.MlartError && e.code === 'CANCELLED'
  );
  const boom = new Error('boom');
  assert.throws(() => mlart.Model.load(engine, MODEL_DIR, { progress: () => { throw boom; } }), (e) => e === boom);
});
