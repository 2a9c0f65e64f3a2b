"""Threads: ctypes releases the GIL during library calls, so calls run in
parallel; results stay exact, and close() never frees a handle under a
call in flight."""

import array
import threading
import unittest

import testlib
import mlart
from testlib import reference as R
from testlib.cache import build_cache


def run_threads(targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # reported by the test
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        if t.is_alive():
            raise AssertionError("a thread did not finish")
    if errors:
        raise errors[0]


def dense_problem(seed, d_qk=64, d_v=48, h_q=4, block_size=4, lens=(9, 0, 17)):
    rand = R.rng(seed)
    bb = mlart.kv_block_bytes("f32", d_qk, block_size)
    c = build_cache("f32", d_qk, block_size, bb, [R.random_f32(n * d_qk, rand) for n in lens], seed)
    return dict(
        batch=len(lens), h_q=h_q, d_qk=d_qk, d_v=d_v, q=R.random_f32(len(lens) * h_q * d_qk, rand),
        kv_format="f32", kv=c.kv, num_blocks=c.num_blocks, block_size=block_size,
        block_table=c.block_table, block_table_stride=c.stride, seqlens=c.seqlens, lse=True,
    )


class ThreadsTest(unittest.TestCase):
    def test_concurrent_decodes_on_one_engine_give_the_sequential_results(self):
        with mlart.Engine("cpu", num_threads=2) as engine:
            problems = [dense_problem(50 + g) for g in range(6)]
            want = [list(engine.decode_paged(**p).out) for p in problems]

            def worker(g):
                def run():
                    for _ in range(5):
                        r = engine.decode_paged(**problems[g])
                        if list(r.out) != want[g]:
                            raise AssertionError("thread %d: output differs from the sequential one" % g)
                return run

            run_threads([worker(g) for g in range(6)])

    def test_decodes_stay_exact_while_other_threads_mutate_the_pool(self):
        with mlart.Engine("cpu", num_threads=2) as engine, \
                mlart.KvPool(engine, kv_format="f32", d_qk=64, block_size=8, num_blocks=64) as pool:
            rand = R.rng(9)
            pool.create_seq(1)
            pool.append(1, 0, R.random_f32(20 * 64, rand))
            q = R.random_f32(4 * 64, rand, 2.0)
            want = list(pool.decode(seq_ids=[1], h_q=4, d_v=64, q=q).out)
            stop = threading.Event()
            rows = R.random_f32(5 * 64, rand)

            def mutator():
                i = 0
                while not stop.is_set():
                    sid = 100 + i % 3
                    pool.create_seq(sid)
                    pool.append(sid, 0, rows)
                    pool.fork_seq(1, sid + 10)
                    pool.append(sid + 10, 0, rows)
                    pool.truncate_seq(sid + 10, 3)
                    pool.free_seq(sid)
                    pool.free_seq(sid + 10)
                    i += 1

            def decoder():
                try:
                    for _ in range(30):
                        if list(pool.decode(seq_ids=[1], h_q=4, d_v=64, q=q).out) != want:
                            raise AssertionError("a decode changed under concurrent mutations")
                        pool.stats()
                finally:
                    stop.set()

            run_threads([mutator, decoder, decoder])
            self.assertEqual(pool.stats().sequences, 1)

    def test_close_racing_with_calls_each_call_succeeds_or_sees_closed(self):
        engine = mlart.Engine("cpu", num_threads=2)
        problems = [dense_problem(20 + g) for g in range(4)]
        started = threading.Barrier(5)
        counts = []

        def worker(p):
            def run():
                n = 0
                started.wait()
                while True:
                    try:
                        engine.decode_paged(**p)
                    except mlart.ClosedError:
                        counts.append(n)
                        return
                    n += 1
            return run

        def closer():
            started.wait()
            engine.close()

        run_threads([worker(p) for p in problems] + [closer])
        self.assertEqual(len(counts), 4)
        self.assertIsNone(engine._ptr, "the C engine was not freed after the last call")

    def test_close_during_a_call_frees_when_the_call_returns(self):
        model_dir = testlib.model_dir()
        engine = mlart.Engine("cpu", num_threads=1)
        in_load = threading.Event()
        may_finish = threading.Event()
        result = {}

        def progress(fraction, stage):
            in_load.set()
            if not may_finish.wait(30):
                raise AssertionError("the main thread never released the load")

        def load():
            result["model"] = mlart.Model.load(engine, model_dir, num_layers=1, progress=progress)

        t = threading.Thread(target=load)
        t.start()
        try:
            self.assertTrue(in_load.wait(30))
            engine.close()  # returns at once; the load still holds the C engine
            self.assertTrue(engine.closed)
            self.assertIsNotNone(engine._ptr, "the engine was freed under a call in flight")
            with self.assertRaises(mlart.ClosedError):
                engine.info()
        finally:
            may_finish.set()
            t.join(60)
        self.assertIsNone(engine._ptr, "the engine was not freed when the call returned")
        with result["model"] as model:
            self.assertEqual(model.info().loaded_layers, 1)
            # The model keeps the C engine alive: it still runs.
            with self.assertRaises(mlart.ClosedError):
                mlart.KvPool(engine, num_blocks=1)

    def test_closing_the_engine_from_the_progress_callback_does_not_deadlock(self):
        engine = mlart.Engine("cpu", num_threads=1)
        with mlart.Model.load(engine, testlib.model_dir(), num_layers=1,
                              progress=lambda f, s: engine.close()) as model:
            self.assertTrue(engine.closed)
            info = model.info()
            pool_engine = mlart.Engine("cpu", num_threads=1)
            with pool_engine, mlart.KvPool(pool_engine, d_qk=info.d_qk, num_blocks=2) as pool:
                pool.create_seq(1)
                out = model.forward(pool, layer=0, seq_ids=[1], n_tokens=1,
                                    x=array.array("f", [0.5] * info.hidden_size))
                self.assertEqual(len(out), info.hidden_size)


if __name__ == "__main__":
    unittest.main()
