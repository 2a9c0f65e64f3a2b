package mlart_test

import (
	"fmt"

	"mlart"
)

// One sequence of two tokens in a float32 cache of rows of 8; a query that
// matches the second row far better than the first attends almost only to
// it, so the output is (nearly) that row's first DV = 4 values.
func ExampleKvPool_Decode() {
	engine, err := mlart.NewEngine(mlart.EngineOptions{Backend: mlart.BackendCPU})
	if err != nil {
		panic(err)
	}
	defer engine.Close()
	pool, err := mlart.NewKvPool(engine, mlart.KvPoolOptions{
		KvFormat: mlart.KvFormatF32, DQK: 8, BlockSize: 16, NumBlocks: 4,
	})
	if err != nil {
		panic(err)
	}
	defer pool.Close()

	if err := pool.CreateSeq(7); err != nil {
		panic(err)
	}
	rows := []float32{
		-1, 0, 0, 0, 0, 0, 0, 0, // token 0
		1, 2, 3, 4, 0, 0, 0, 0, // token 1
	}
	if err := pool.Append(7, 0, rows); err != nil {
		panic(err)
	}
	out := make([]float32, 4)
	err = pool.Decode(&mlart.PoolDecodeArgs{
		SeqIDs: []uint64{7}, HQ: 1, DV: 4, SoftmaxScale: 10,
		Q:   []float32{1, 0, 0, 0, 0, 0, 0, 0},
		Out: out,
	})
	if err != nil {
		panic(err)
	}
	fmt.Printf("%.3f\n", out)

	err = pool.CreateSeq(7)
	fmt.Println(err)
	// Output:
	// [1.000 2.000 3.000 4.000]
	// mlart: invalid argument: seq_id = 7 already exists
}
