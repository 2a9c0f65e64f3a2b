package mlart

/*
#include "mlart.h"
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// KvPoolOptions configures NewKvPool. Zero fields take the library's
// defaults (KvFormatBF16, DQK 576, 1 layer, 64 tokens per block, no indexer
// keys) except NumBlocks, which is required.
type KvPoolOptions struct {
	KvFormat  KvFormat
	DQK       int // elements per row; 0 = 576 (DeepSeek V2/V3: 512 latent + 64 rope)
	NumLayers int // layers, each with its own cache; 0 = 1
	BlockSize int // tokens per block; 0 = 64
	NumBlocks int // blocks shared by all sequences and layers (required)
	// IndexHeadDim is the width of a DeepSeek-V3.2 indexer key per token and
	// layer (ModelInfo.IndexHeadDim), or 0 (none). A V3.2 model's Forward
	// needs a pool with its value; such a pool keeps each token's indexer
	// key beside its cache row and takes rows only from that Forward (Append
	// is rejected).
	IndexHeadDim int
}

// KvPool is a pool of KV-cache blocks for several layers, holding sequences
// identified by caller-chosen uint64 ids.
//
// Every method may be called from many goroutines at once: mutations
// (CreateSeq, FreeSeq, ForkSeq, TruncateSeq, Append) are serialized by the
// library against each other and against decodes; decodes and queries run
// concurrently. Close waits for calls in flight. A pool keeps its engine
// alive.
type KvPool struct {
	mu   sync.RWMutex
	ptr  *C.mlart_kv_pool
	opts KvPoolOptions // resolved (defaults filled in)
}

// NewKvPool creates a pool whose memory the engine's backend owns.
func NewKvPool(engine *Engine, opts KvPoolOptions) (*KvPool, error) {
	var o C.mlart_kv_pool_options
	C.mlart_kv_pool_options_init(&o)
	o.kv_format = C.mlart_kv_format(opts.KvFormat)
	for _, f := range []struct {
		name string
		v    int
		dst  *C.int32_t
	}{
		{"KvPoolOptions.DQK", opts.DQK, &o.d_qk},
		{"KvPoolOptions.NumLayers", opts.NumLayers, &o.num_layers},
		{"KvPoolOptions.BlockSize", opts.BlockSize, &o.block_size},
		{"KvPoolOptions.NumBlocks", opts.NumBlocks, &o.num_blocks},
		{"KvPoolOptions.IndexHeadDim", opts.IndexHeadDim, &o.index_head_dim},
	} {
		if f.v == 0 && f.name != "KvPoolOptions.NumBlocks" {
			continue // keep the library default
		}
		v, err := toI32(f.name, f.v)
		if err != nil {
			return nil, err
		}
		*f.dst = v
	}
	eptr, err := engine.acquire()
	if err != nil {
		return nil, err
	}
	defer engine.mu.RUnlock()
	var ptr *C.mlart_kv_pool
	if err := takeError(C.mlart_kv_pool_create(eptr, &o, &ptr)); err != nil {
		return nil, err
	}
	runtime.KeepAlive(engine)
	p := &KvPool{ptr: ptr, opts: KvPoolOptions{
		KvFormat:     KvFormat(o.kv_format),
		DQK:          int(o.d_qk),
		NumLayers:    int(o.num_layers),
		BlockSize:    int(o.block_size),
		NumBlocks:    int(o.num_blocks),
		IndexHeadDim: int(o.index_head_dim),
	}}
	runtime.SetFinalizer(p, (*KvPool).Close)
	return p, nil
}

// Options returns the pool's options with the defaults filled in.
func (p *KvPool) Options() KvPoolOptions { return p.opts }

// Close releases the pool and all its sequences. Safe to call more than
// once; later calls of other methods return ErrClosed.
func (p *KvPool) Close() error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ptr != nil {
		C.mlart_kv_pool_free(p.ptr)
		p.ptr = nil
		runtime.SetFinalizer(p, nil)
	}
	return nil
}

func (p *KvPool) acquire() (*C.mlart_kv_pool, error) {
	if p == nil {
		return nil, ErrClosed
	}
	p.mu.RLock()
	if p.ptr == nil {
		p.mu.RUnlock()
		return nil, ErrClosed
	}
	return p.ptr, nil
}

// KvPoolStats is the occupancy of a pool.
type KvPoolStats struct {
	BlocksTotal   int64 // blocks in the pool
	BlocksUsed    int64 // blocks held by at least one sequence
	BlocksFree    int64 // blocks available for appends
	Sequences     int64 // live sequences
	BytesPerBlock int64 // bytes of one block across all layers
	BytesTotal    int64 // bytes of cache memory owned by the pool
}

// Stats reports the pool's occupancy.
func (p *KvPool) Stats() (KvPoolStats, error) {
	ptr, err := p.acquire()
	if err != nil {
		return KvPoolStats{}, err
	}
	defer p.mu.RUnlock()
	var s C.mlart_kv_pool_stats
	C.mlart_kv_pool_stats_init(&s)
	if err := takeError(C.mlart_kv_pool_stats_get(ptr, &s)); err != nil {
		return KvPoolStats{}, err
	}
	return KvPoolStats{
		BlocksTotal:   int64(s.blocks_total),
		BlocksUsed:    int64(s.blocks_used),
		BlocksFree:    int64(s.blocks_free),
		Sequences:     int64(s.sequences),
		BytesPerBlock: int64(s.bytes_per_block),
		BytesTotal:    int64(s.bytes_total),
	}, nil
}

// CreateSeq creates the empty sequence id (an id not in use).
func (p *KvPool) CreateSeq(id uint64) error {
	ptr, err := p.acquire()
	if err != nil {
		return err
	}
	defer p.mu.RUnlock()
	return takeError(C.mlart_kv_seq_create(ptr, C.uint64_t(id)))
}

// FreeSeq frees sequence id; blocks no other sequence shares become free.
func (p *KvPool) FreeSeq(id uint64) error {
	ptr, err := p.acquire()
	if err != nil {
		return err
	}
	defer p.mu.RUnlock()
	return takeError(C.mlart_kv_seq_free(ptr, C.uint64_t(id)))
}

// ForkSeq creates dst as a copy of src in O(blocks) with copy-on-write
// blocks: the two sequences never see each other's appends.
func (p *KvPool) ForkSeq(src, dst uint64) error {
	ptr, err := p.acquire()
	if err != nil {
		return err
	}
	defer p.mu.RUnlock()
	return takeError(C.mlart_kv_seq_fork(ptr, C.uint64_t(src), C.uint64_t(dst)))
}

// TruncateSeq cuts every layer of id to at most length tokens (speculative
// decode rollback) and frees blocks no longer needed.
func (p *KvPool) TruncateSeq(id uint64, length int) error {
	ptr, err := p.acquire()
	if err != nil {
		return err
	}
	defer p.mu.RUnlock()
	return takeError(C.mlart_kv_seq_truncate(ptr, C.uint64_t(id), C.int64_t(length)))
}

// SeqLength returns the number of tokens stored in layer of id.
func (p *KvPool) SeqLength(id uint64, layer int) (int, error) {
	l, err := toI32("layer", layer)
	if err != nil {
		return 0, err
	}
	ptr, err := p.acquire()
	if err != nil {
		return 0, err
	}
	defer p.mu.RUnlock()
	var n C.int64_t
	if err := takeError(C.mlart_kv_seq_length(ptr, C.uint64_t(id), l, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Append appends float32 rows [n, DQK] (n = len(rows)/DQK) to layer of
// sequence id, converting them to the pool's format. A full pool gives
// StatusPoolExhausted; on any error nothing changes. A pool with
// IndexHeadDim takes rows only from a V3.2 model's Forward: Append is
// StatusInvalidArgument there.
func (p *KvPool) Append(id uint64, layer int, rows []float32) error {
	return p.append(id, layer, DTypeF32, len(rows), ptrOf(rows))
}

// AppendBF16 is Append for rows of bfloat16 bits.
func (p *KvPool) AppendBF16(id uint64, layer int, rows []uint16) error {
	return p.append(id, layer, DTypeBF16, len(rows), ptrOf(rows))
}

// AppendF16 is Append for rows of IEEE half-precision bits.
func (p *KvPool) AppendF16(id uint64, layer int, rows []uint16) error {
	return p.append(id, layer, DTypeF16, len(rows), ptrOf(rows))
}

func (p *KvPool) append(id uint64, layer int, dtype DType, n int, rows unsafe.Pointer) error {
	l, err := toI32("layer", layer)
	if err != nil {
		return err
	}
	ptr, err := p.acquire()
	if err != nil {
		return err
	}
	defer p.mu.RUnlock()
	if n%p.opts.DQK != 0 {
		return argError("Append: rows has %d elements, not a multiple of the pool's d_qk = %d", n, p.opts.DQK)
	}
	nt, err := toI32("n_tokens", n/p.opts.DQK)
	if err != nil {
		return err
	}
	// rows, a Go pointer passed as an argument, stays pinned for the call.
	return takeError(C.mlart_kv_append(ptr, C.uint64_t(id), l, nt, C.mlart_dtype(dtype), rows))
}

// PoolDecodeArgs are the arguments of KvPool.Decode (mlart_kv_pool_decode):
// like DecodeArgs, with the pool supplying the cache, block table and
// lengths (each sequence's current length in Layer). Batch is len(SeqIDs);
// DQK is the pool's. The zero values of QDType and OutDType mean F32.
type PoolDecodeArgs struct {
	Layer        int
	SeqIDs       []uint64 // [batch], repeats allowed
	SQ           int      // query tokens per sequence; 0 means 1
	HQ           int      // query heads (>= 1)
	DV           int      // value dimension (<= the pool's DQK)
	SoftmaxScale float32  // 0 means 1/sqrt(DQK)
	Causal       bool

	QDType DType     // DTypeF32 reads Q; DTypeBF16/DTypeF16 read Q16
	Q      []float32 // [batch, SQ, HQ, DQK]
	Q16    []uint16

	// Optional sparse attention: per query token, logical positions
	// [batch, SQ, TopK] of its sequence (0 .. length-1; -1 = none).
	Indices    []int32
	TopK       int
	TopKLength []int32 // optional [batch]

	AttnSink []float32 // optional [HQ]

	OutDType DType     // DTypeF32 writes Out; DTypeBF16/DTypeF16 write Out16
	Out      []float32 // [batch, SQ, HQ, DV]
	Out16    []uint16
	LSE      []float32 // optional [batch, HQ, SQ]
}

// Decode decodes one layer for a list of sequences held by the pool, with
// the semantics of Engine.DecodePaged. Safe to call from many goroutines.
func (p *KvPool) Decode(args *PoolDecodeArgs) error {
	if args == nil {
		return argError("KvPool.Decode: args is nil")
	}
	sq := args.SQ
	if sq == 0 {
		sq = 1
	}
	var ca C.mlart_kv_pool_decode_args
	C.mlart_kv_pool_decode_args_init(&ca)
	for _, f := range []struct {
		name string
		v    int
		dst  *C.int32_t
	}{
		{"PoolDecodeArgs.Layer", args.Layer, &ca.layer},
		{"PoolDecodeArgs.SeqIDs (length)", len(args.SeqIDs), &ca.batch},
		{"PoolDecodeArgs.SQ", sq, &ca.s_q},
		{"PoolDecodeArgs.HQ", args.HQ, &ca.h_q},
		{"PoolDecodeArgs.DV", args.DV, &ca.d_v},
		{"PoolDecodeArgs.TopK", args.TopK, &ca.topk},
	} {
		v, err := toI32(f.name, f.v)
		if err != nil {
			return err
		}
		*f.dst = v
	}
	b, hq, dqk, dv := len(args.SeqIDs), args.HQ, p.opts.DQK, args.DV
	if allPositive(b, sq, hq, dv) {
		if err := checkActivation(args.QDType, args.Q, args.Q16, "PoolDecodeArgs.Q", "PoolDecodeArgs.Q16",
			"batch*s_q*h_q*d_qk", b, sq, hq, dqk); err != nil {
			return err
		}
		if err := checkActivation(args.OutDType, args.Out, args.Out16, "PoolDecodeArgs.Out", "PoolDecodeArgs.Out16",
			"batch*s_q*h_q*d_v", b, sq, hq, dv); err != nil {
			return err
		}
		if len(args.LSE) > 0 {
			if err := checkLen("PoolDecodeArgs.LSE", len(args.LSE), "elements", "batch*h_q*s_q", b, hq, sq); err != nil {
				return err
			}
		}
		if len(args.AttnSink) > 0 {
			if err := checkLen("PoolDecodeArgs.AttnSink", len(args.AttnSink), "elements", "h_q", hq); err != nil {
				return err
			}
		}
		if len(args.Indices) > 0 && args.TopK >= 1 {
			if err := checkLen("PoolDecodeArgs.Indices", len(args.Indices), "elements", "batch*s_q*topk", b, sq, args.TopK); err != nil {
				return err
			}
		}
		if len(args.TopKLength) > 0 {
			if err := checkLen("PoolDecodeArgs.TopKLength", len(args.TopKLength), "elements", "batch", b); err != nil {
				return err
			}
		}
	}

	ptr, err := p.acquire()
	if err != nil {
		return err
	}
	defer p.mu.RUnlock()

	var pn runtime.Pinner
	defer pn.Unpin()
	ca.seq_ids = (*C.uint64_t)(pin(&pn, args.SeqIDs))
	ca.softmax_scale = C.float(args.SoftmaxScale)
	ca.causal = C.bool(args.Causal)
	ca.memory = C.MLART_MEMORY_HOST
	ca.q_dtype = C.mlart_dtype(args.QDType)
	ca.q = qPointer(&pn, args.QDType, args.Q, args.Q16)
	ca.indices = (*C.int32_t)(pin(&pn, args.Indices))
	ca.topk_length = (*C.int32_t)(pin(&pn, args.TopKLength))
	ca.attn_sink = (*C.float)(pin(&pn, args.AttnSink))
	ca.out_dtype = C.mlart_dtype(args.OutDType)
	ca.out = qPointer(&pn, args.OutDType, args.Out, args.Out16)
	ca.lse = (*C.float)(pin(&pn, args.LSE))
	ca.stream = nil

	err = takeError(C.mlart_kv_pool_decode(ptr, &ca))
	runtime.KeepAlive(p)
	runtime.KeepAlive(args)
	return err
}
