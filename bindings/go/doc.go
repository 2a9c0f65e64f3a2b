// Package mlart is the Go binding of mlart, an embeddable DeepSeek
// Multi-head Latent Attention (MLA) decode library with a stable C ABI
// (include/mlart.h).
//
// The handles are [Engine] (a CPU thread pool or a GPU), [KvPool] (a paged
// KV cache holding sequences by id) and [Model] (the attention weights of a
// checkpoint). Each has a Close method (safe to call twice; a finalizer is
// only a safety net) and may be used from many goroutines at once. Calls on
// a closed handle return [ErrClosed].
//
// Failed calls return an [*Error] carrying the library's [Status] and its
// message, which names the argument at fault; test the status with
// errors.Is(err, mlart.ErrInvalidArgument) and friends, or errors.As. The
// binding checks every slice against the shape it is given before calling
// the library, so a short slice is an error naming the Go field, never an
// out-of-bounds read. Buffers are ordinary Go slices (host memory):
// float32, or []uint16 holding bfloat16/float16 bits (see [BF16], [ToBF16],
// [FromBF16]), selected by a DType field.
//
// Example: a pool of bf16 cache rows, one decode step for two sequences.
//
//	engine, err := mlart.NewEngine(mlart.EngineOptions{}) // auto backend, all cores
//	if err != nil { ... }
//	defer engine.Close()
//	pool, err := mlart.NewKvPool(engine, mlart.KvPoolOptions{NumBlocks: 1024}) // bf16 rows of 576, 64 tokens/block
//	if err != nil { ... }
//	defer pool.Close()
//	for _, id := range []uint64{1, 2} {
//		pool.CreateSeq(id)
//		pool.Append(id, 0, rows) // []float32, n*576 (prefill); AppendBF16 for []uint16
//	}
//	out := make([]float32, 2*128*512)
//	err = pool.Decode(&mlart.PoolDecodeArgs{
//		SeqIDs: []uint64{1, 2}, HQ: 128, DV: 512,
//		Q:      q,   // []float32 [2, 1, 128, 576]
//		Out:    out, // [2, 1, 128, 512]
//	})
//	if errors.Is(err, mlart.ErrNotFound) { ... }
//
// [Engine.DecodePaged] is the raw operation over a cache the caller owns
// (FlashMLA's flash_mla_with_kvcache), with a block table or sparse
// indices; [KvQuantize] writes rows in any cache format.
//
// # Building
//
// Build the library first (cargo build --release in the mlart checkout).
// By default the package links target/release/libmlart.a statically, so Go
// programs need no libmlart.so at run time. With -tags mlart_shared it
// links -lmlart dynamically instead: put the folder holding libmlart.so in
// CGO_LDFLAGS (-L/dir, optionally -Wl,-rpath,/dir) and make libmlart.so.0
// findable at run time (LD_LIBRARY_PATH or the rpath).
package mlart
