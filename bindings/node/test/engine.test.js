'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const path = require('node:path');
const mlart = require('..');

test('version and ABI', () => {
  assert.match(mlart.version(), /^\d+\.\d+\.\d+$/);
  assert.equal(mlart.abiVersion(), mlart.ABI_VERSION);
});

test('CPU engine info', () => {
  const engine = mlart.Engine.create({ backend: 'cpu', threads: 2 });
  try {
    const info = engine.info();
    assert.equal(info.backend, 'cpu');
    assert.equal(info.numThreads, 2);
    assert.equal(typeof info.cpuIsa, 'string');
    assert.equal(typeof info.deviceName, 'string');
    assert.equal(typeof info.cpuFeatures, 'string');
    assert.equal(typeof info.reason, 'string');
    assert.ok(info.reason.length > 0, 'reason is empty');
    assert.ok(!info.reason.includes('\0'));
    assert.equal(typeof info.threadPlacement, 'string');
    assert.ok(info.threadPlacement.length > 0, 'threadPlacement is empty');
  } finally {
    engine.close();
  }
});

test('thread affinity option', () => {
  const engine = new mlart.Engine({ backend: 'cpu', threads: 2, threadAffinity: 'none' });
  try {
    assert.equal(engine.info().threadPlacement, 'not pinned (affinity NONE)');
  } finally {
    engine.close();
  }
  assert.throws(() => new mlart.Engine({ threadAffinity: 'everywhere' }), (e) => e instanceof RangeError && /threadAffinity/.test(e.message));
  assert.throws(() => new mlart.Engine({ threadAffinity: 7 }), /thread_affinity = 7/);
});

test('constructor and default options', () => {
  const engine = new mlart.Engine();
  assert.notEqual(engine.info().backend, 'auto');
  engine.close();
});

test('close twice is safe; a closed engine throws', () => {
  const engine = new mlart.Engine({ backend: 'cpu' });
  assert.equal(engine.closed, false);
  engine.close();
  engine.close();
  assert.equal(engine.closed, true);
  assert.throws(() => engine.info(), /closed/);
  assert.throws(
    () => engine.decodePaged({ batch: 1, hQ: 1, dQk: 64, dV: 64 }),
    /closed/
  );
  assert.throws(() => new mlart.KvPool(engine, { numBlocks: 4 }), /closed/);
});

test('a pool outlives the engine it was made from', () => {
  const engine = new mlart.Engine({ backend: 'cpu' });
  const pool = new mlart.KvPool(engine, { kvFormat: 'f32', dQk: 16, blockSize: 4, numBlocks: 4 });
  engine.close();
  pool.createSeq(1);
  pool.append(1, 0, new Float32Array(16).fill(1));
  const { out } = pool.decode({ seqIds: [1], hQ: 2, dV: 16, q: new Float32Array(32) });
  assert.deepEqual(Array.from(out), new Array(32).fill(1));
  pool.close();
});

test('unknown backend name is a RangeError; an unknown backend number is the library\'s error', () => {
  assert.throws(() => new mlart.Engine({ backend: 'tpu' }), (e) => e instanceof RangeError && /backend/.test(e.message));
  assert.throws(
    () => new mlart.Engine({ backend: 77 }),
    (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && e.status === mlart.Status.INVALID_ARGUMENT
  );
});

test('deviceCount is a number; deviceInfo without a device is an MlartError', () => {
  const n = mlart.deviceCount();
  assert.ok(Number.isInteger(n) && n >= 0);
  if (n === 0) {
    assert.throws(
      () => mlart.deviceInfo(0),
      (e) => e instanceof mlart.MlartError && ['UNSUPPORTED', 'NOT_FOUND'].includes(e.code)
    );
  } else {
    const d = mlart.deviceInfo(0);
    assert.equal(typeof d.name, 'string');
    assert.ok(d.totalMemory > 0);
  }
});

test('kvRowBytes / kvBlockBytes', () => {
  assert.equal(mlart.kvRowBytes('bf16', 576), 1152);
  assert.equal(mlart.kvRowBytes('f32', 64), 256);
  assert.equal(mlart.kvRowBytes(mlart.KvFormat.FP8_V32, 576), 656);
  assert.equal(mlart.kvBlockBytes('f32', 64, 7), 7 * 256);
  assert.throws(
    () => mlart.kvRowBytes(99, 64),
    (e) => e instanceof mlart.MlartError && e.code === 'INVALID_ARGUMENT' && /format/.test(e.message)
  );
});

test('statusName and constants', () => {
  assert.equal(mlart.Status.INVALID_ARGUMENT, 1);
  assert.equal(mlart.Status.INTERNAL, 11);
  assert.match(mlart.statusName(mlart.Status.POOL_EXHAUSTED), /pool|exhaust/i);
});

const nodeBin = process.execPath;
const pkgDir = path.resolve(__dirname, '..');

test('a missing library is a clear Error naming both paths', () => {
  const r = spawnSync(nodeBin, ['-e', "require('./')"], {
    cwd: pkgDir,
    env: { ...process.env, MLART_LIBRARY: '/nonexistent/libmlart.so' },
    encoding: 'utf8',
  });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /MLART_LIBRARY=\/nonexistent\/libmlart\.so/);
  assert.match(r.stderr, /target\/release\/libmlart\.so/);
});

test('FinalizationRegistry releases unclosed handles', () => {
  const script = `
    const mlart = require('./');
    (async () => {
      for (let i = 0; i < 20; i++) {
        const e = new mlart.Engine({ backend: 'cpu', threads: 1 });
        const p = new mlart.KvPool(e, { kvFormat: 'f32', dQk: 64, blockSize: 16, numBlocks: 64 });
        p.createSeq(1);
      }
      for (let i = 0; i < 10 && mlart.handleStats().finalized < 40; i++) {
        global.gc();
        await new Promise((r) => setTimeout(r, 10));
      }
      process.stdout.write(JSON.stringify(mlart.handleStats()));
    })();
  `;
  const r = spawnSync(nodeBin, ['--expose-gc', '-e', script], { cwd: pkgDir, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const stats = JSON.parse(r.stdout);
  assert.equal(stats.created, 40);
  assert.equal(stats.closed, 0);
  assert.ok(stats.finalized >= 30, `only ${stats.finalized} of 40 handles finalized`);
});
