'use strict';
// Errors: JS-side buffer checks (before any C call) and the library's statuses.
const test = require('node:test');
const assert = require('node:assert/strict');
const mlart = require('..');
const { rng, randomF32 } = require('../testlib/reference');
const { buildCache } = require('../testlib/cache');

let engine;
test.before(() => {
  engine = new mlart.Engine({ backend: 'cpu' });
});
test.after(() => engine.close());

const dQk = 64;
const hQ = 3;
const blockSize = 5;

function denseArgs(overrides = {}) {
  const rand = rng(21);
  const lens = [3, 8];
  const blockBytes = mlart.kvBlockBytes('f32', dQk, blockSize);
  const c = buildCache({ format: 'f32', dQk, blockSize, blockBytes, seqs: lens.map((l) => randomF32(l * dQk, rand)), rand });
  const dV = overrides.dV ?? 48;
  return {
    batch: 2, sQ: 1, hQ, dQk, dV,
    q: randomF32(2 * hQ * dQk, rand),
    kvFormat: 'f32', kv: c.kv, numBlocks: c.numBlocks, blockSize,
    blockTable: c.blockTable, blockTableStride: c.stride, seqlens: c.seqlens,
    out: new Float32Array(2 * hQ * dV), lse: new Float32Array(2 * hQ),
    attnSink: new Float32Array(hQ),
    ...overrides,
  };
}

function shorten(a) {
  return a.subarray(0, a.length - 1);
}

test('the dense arguments are valid as built', () => {
  engine.decodePaged(denseArgs());
});

test('a too-short buffer is a RangeError naming it, raised before the library is called', () => {
  // dV > dQk makes the library itself reject the call (INVALID_ARGUMENT naming d_v) ...
  const bad = denseArgs({ dV: dQk + 1 });
  assert.throws(
    () => engine.decodePaged(bad),
    (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /d_v/.test(e.message)
  );
  // ... so a RangeError instead proves the JS check came first.
  for (const name of ['q', 'kv', 'blockTable', 'seqlens', 'out', 'lse', 'attnSink']) {
    const args = denseArgs({ dV: dQk + 1 });
    args[name] = shorten(args[name]);
    assert.throws(
      () => engine.decodePaged(args),
      (e) => e instanceof RangeError && e.message.startsWith(`${name} has `),
      `short ${name}`
    );
  }
});

test('sparse buffers are checked too', () => {
  const base = denseArgs({ blockTable: undefined, seqlens: undefined });
  const topk = 4;
  const indices = new Int32Array(2 * topk).fill(-1);
  indices[0] = 0;
  indices[topk] = 1;
  engine.decodePaged({ ...base, indices, topk, topkLength: Int32Array.of(1, 2) });
  assert.throws(
    () => engine.decodePaged({ ...base, indices: shorten(indices), topk }),
    (e) => e instanceof RangeError && e.message.startsWith('indices has ')
  );
  assert.throws(
    () => engine.decodePaged({ ...base, indices, topk, topkLength: Int32Array.of(1) }),
    (e) => e instanceof RangeError && e.message.startsWith('topkLength has ')
  );
});

test('wrong buffer types are TypeErrors naming the argument', () => {
  assert.throws(() => engine.decodePaged(denseArgs({ q: new Float64Array(2 * hQ * dQk) })), (e) => e instanceof TypeError && /^q /.test(e.message));
  assert.throws(() => engine.decodePaged(denseArgs({ q: new Uint16Array(2 * hQ * dQk), qDtype: 'f32' })), (e) => e instanceof TypeError && /^q /.test(e.message));
  assert.throws(() => engine.decodePaged(denseArgs({ blockTable: new Uint32Array(100) })), (e) => e instanceof TypeError && /^blockTable /.test(e.message));
  assert.throws(() => engine.decodePaged(denseArgs({ kv: [1, 2, 3] })), (e) => e instanceof TypeError && /^kv /.test(e.message));
  assert.throws(() => engine.decodePaged(denseArgs({ lse: new Float64Array(6) })), (e) => e instanceof TypeError && /^lse /.test(e.message));
  assert.throws(() => engine.decodePaged(denseArgs({ hQ: 2.5 })), (e) => e instanceof TypeError && /^hQ /.test(e.message));
  assert.throws(() => engine.decodePaged(denseArgs({ kvFormat: 'fp4' })), (e) => e instanceof RangeError && /^kvFormat /.test(e.message));
});

test('hQ 0 is the library\'s INVALID_ARGUMENT naming h_q', () => {
  assert.throws(
    () => engine.decodePaged(denseArgs({ hQ: 0 })),
    (e) => {
      assert.ok(e instanceof mlart.MlartError);
      assert.ok(e instanceof Error);
      assert.equal(e.name, 'MlartError');
      assert.equal(e.code, 'INVALID_ARGUMENT');
      assert.equal(e.status, mlart.Status.INVALID_ARGUMENT);
      assert.match(e.message, /h_q/);
      return true;
    }
  );
});

test('a block id outside the cache is the library\'s INVALID_ARGUMENT', () => {
  const args = denseArgs();
  args.blockTable = Int32Array.from(args.blockTable);
  args.blockTable[0] = args.numBlocks; // within seq 0's length
  assert.throws(
    () => engine.decodePaged(args),
    (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /block_table/.test(e.message)
  );
});

test('KvPool: short buffers and duplicate / missing ids', () => {
  const pool = new mlart.KvPool(engine, { kvFormat: 'bf16', dQk, blockSize, numBlocks: 8 });
  try {
    pool.createSeq(5);
    assert.throws(
      () => pool.createSeq(5),
      (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' &&
        e.status === mlart.Status.INVALID_ARGUMENT && /seq_id/.test(e.message)
    );
    assert.throws(() => pool.forkSeq(5, 5), (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT');
    assert.throws(() => pool.freeSeq(6), (e) => e instanceof mlart.MlartError && e.code === 'NOT_FOUND');
    assert.throws(() => pool.append(6, 0, new Float32Array(dQk)), (e) => e instanceof mlart.MlartError && e.code === 'NOT_FOUND');
    assert.throws(
      () => pool.append(5, 0, new Float32Array(dQk + 1)),
      (e) => e instanceof RangeError && e.message.startsWith('rows has ')
    );
    assert.throws(
      () => pool.append(5, 0, new Float32Array(2 * dQk - 1), { nTokens: 2 }),
      (e) => e instanceof RangeError && e.message.startsWith('rows has ')
    );
    assert.throws(
      () => pool.append(5, 3, new Float32Array(dQk)),
      (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /layer/.test(e.message)
    );
    assert.equal(pool.seqLength(5), 0);
    pool.append(5, 0, new Float32Array(2 * dQk));
    const ok = { seqIds: [5, 5], hQ, dV: 48, q: new Float32Array(2 * hQ * dQk), out: new Float32Array(2 * hQ * 48), lse: new Float32Array(2 * hQ) };
    pool.decode(ok);
    for (const name of ['q', 'out', 'lse']) {
      const args = { ...ok, [name]: shorten(ok[name]) };
      assert.throws(() => pool.decode(args), (e) => e instanceof RangeError && e.message.startsWith(`${name} has `), `short ${name}`);
    }
    assert.throws(() => pool.decode({ ...ok, hQ: 0 }), (e) => e instanceof mlart.MlartError && /h_q/.test(e.message));
    assert.throws(() => pool.decode({ ...ok, seqIds: [5, 9] }), (e) => e instanceof mlart.MlartError && e.code === 'NOT_FOUND');
  } finally {
    pool.close();
  }
});

test('KvPool options are the library\'s to reject', () => {
  assert.throws(
    () => new mlart.KvPool(engine, { dQk }),
    (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /num_blocks/.test(e.message)
  );
  assert.throws(() => new mlart.KvPool({}, { numBlocks: 1 }), TypeError);
});
