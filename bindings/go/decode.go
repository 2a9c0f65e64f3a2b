package mlart

/*
#include "mlart.h"
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// DecodeArgs are the arguments of Engine.DecodePaged, lowered to
// mlart_decode_args. All buffers are host memory, contiguous and row-major:
//
//	Q / Q16     [Batch, SQ, HQ, DQK]
//	KV          [NumBlocks, BlockSize, row]   (KvBlockBytes per block)
//	BlockTable  [Batch, BlockTableStride]     (dense decode)
//	Seqlens     [Batch]                       (dense decode)
//	Indices     [Batch, SQ, TopK]             (sparse decode)
//	Out / Out16 [Batch, SQ, HQ, DV]
//	LSE         [Batch, HQ, SQ]               (optional)
//
// Every buffer the shape makes the library read or write is checked against
// the shape in Go before the call, so a short slice is an *Error with
// StatusInvalidArgument naming the field. Shape values themselves (HQ = 0,
// DV > DQK, a bad block id, ...) are validated by the library.
//
// Unlike the C defaults, the zero values of QDType and OutDType mean F32.
type DecodeArgs struct {
	Batch        int     // sequences (>= 1)
	SQ           int     // query tokens per sequence; 0 means 1
	HQ           int     // query heads (>= 1, any number)
	DQK          int     // query/key head dimension (<= 1024)
	DV           int     // value dimension: the first DV elements of each row (<= DQK)
	SoftmaxScale float32 // scale of q.k; 0 means 1/sqrt(DQK)
	Causal       bool    // bottom-right-aligned causal mask among the SQ query tokens

	// QDType selects the query slice: DTypeF32 reads Q, DTypeBF16 and
	// DTypeF16 read the raw 16-bit values in Q16.
	QDType DType
	Q      []float32
	Q16    []uint16

	KvFormat  KvFormat // row format of KV (zero value: KvFormatBF16)
	KV        []byte   // the paged cache
	NumBlocks int      // blocks in KV (>= 1); every block id used must be below it
	BlockSize int      // tokens per block (>= 1, any size)

	// Dense decode (Indices empty).
	BlockTable       []int32 // block ids per sequence; entries past its length are not read
	BlockTableStride int     // entries per row of BlockTable
	Seqlens          []int32 // tokens per sequence, in [0, BlockTableStride*BlockSize]

	// Sparse decode (DeepSeek Sparse Attention), used when Indices is
	// non-empty: query i of sequence b attends to the cache positions
	// Indices[b][i][0:TopK] (block*BlockSize + offset; -1 = none).
	Indices    []int32
	TopK       int
	TopKLength []int32 // optional [Batch]: prefix of Indices used per sequence

	// Optional second cache (same format) joining the softmax, sparse only.
	ExtraKV         []byte
	ExtraNumBlocks  int
	ExtraBlockSize  int
	ExtraIndices    []int32 // [Batch, SQ, ExtraTopK]
	ExtraTopK       int
	ExtraTopKLength []int32 // optional [Batch]

	AttnSink []float32 // optional per-head sink [HQ]

	// OutDType selects the output slice: DTypeF32 writes Out, DTypeBF16 and
	// DTypeF16 write Out16. Every element is written.
	OutDType DType
	Out      []float32
	Out16    []uint16
	LSE      []float32 // optional natural-log log-sum-exp [Batch, HQ, SQ]
}

// DecodePaged runs multi-head latent attention decode over a paged KV cache
// the caller owns (mlart_decode_paged). It returns when Out and LSE are
// complete; on error nothing is written. Safe to call from many goroutines
// at once on one Engine.
func (e *Engine) DecodePaged(args *DecodeArgs) error {
	if args == nil {
		return argError("DecodePaged: args is nil")
	}
	sq := args.SQ
	if sq == 0 {
		sq = 1
	}
	a := *args
	a.SQ = sq

	var ca C.mlart_decode_args
	C.mlart_decode_args_init(&ca)
	ints := []struct {
		name string
		v    int
		dst  *C.int32_t
	}{
		{"DecodeArgs.Batch", a.Batch, &ca.batch},
		{"DecodeArgs.SQ", a.SQ, &ca.s_q},
		{"DecodeArgs.HQ", a.HQ, &ca.h_q},
		{"DecodeArgs.DQK", a.DQK, &ca.d_qk},
		{"DecodeArgs.DV", a.DV, &ca.d_v},
		{"DecodeArgs.NumBlocks", a.NumBlocks, &ca.num_blocks},
		{"DecodeArgs.BlockSize", a.BlockSize, &ca.block_size},
		{"DecodeArgs.BlockTableStride", a.BlockTableStride, &ca.block_table_stride},
		{"DecodeArgs.TopK", a.TopK, &ca.topk},
		{"DecodeArgs.ExtraNumBlocks", a.ExtraNumBlocks, &ca.extra_num_blocks},
		{"DecodeArgs.ExtraBlockSize", a.ExtraBlockSize, &ca.extra_block_size},
		{"DecodeArgs.ExtraTopK", a.ExtraTopK, &ca.extra_topk},
	}
	for _, f := range ints {
		v, err := toI32(f.name, f.v)
		if err != nil {
			return err
		}
		*f.dst = v
	}
	if err := checkDecodeLens(&a); err != nil {
		return err
	}

	ptr, err := e.acquire()
	if err != nil {
		return err
	}
	defer e.mu.RUnlock()

	var pn runtime.Pinner
	defer pn.Unpin()
	ca.softmax_scale = C.float(a.SoftmaxScale)
	ca.causal = C.bool(a.Causal)
	ca.memory = C.MLART_MEMORY_HOST
	ca.q_dtype = C.mlart_dtype(a.QDType)
	ca.q = qPointer(&pn, a.QDType, a.Q, a.Q16)
	ca.kv_format = C.mlart_kv_format(a.KvFormat)
	ca.kv = pin(&pn, a.KV)
	ca.block_table = (*C.int32_t)(pin(&pn, a.BlockTable))
	ca.seqlens = (*C.int32_t)(pin(&pn, a.Seqlens))
	ca.indices = (*C.int32_t)(pin(&pn, a.Indices))
	ca.topk_length = (*C.int32_t)(pin(&pn, a.TopKLength))
	ca.extra_kv = pin(&pn, a.ExtraKV)
	ca.extra_indices = (*C.int32_t)(pin(&pn, a.ExtraIndices))
	ca.extra_topk_length = (*C.int32_t)(pin(&pn, a.ExtraTopKLength))
	ca.attn_sink = (*C.float)(pin(&pn, a.AttnSink))
	ca.out_dtype = C.mlart_dtype(a.OutDType)
	ca.out = qPointer(&pn, a.OutDType, a.Out, a.Out16)
	ca.lse = (*C.float)(pin(&pn, a.LSE))
	ca.stream = nil

	err = takeError(C.mlart_decode_paged(ptr, &ca))
	runtime.KeepAlive(e)
	runtime.KeepAlive(args)
	return err
}

// qPointer pins and returns the buffer dtype selects (nil for an unknown
// dtype, which the library rejects before reading).
func qPointer(pn *runtime.Pinner, dtype DType, f32 []float32, b16 []uint16) unsafe.Pointer {
	switch dtype {
	case DTypeF32:
		return pin(pn, f32)
	case DTypeBF16, DTypeF16:
		return pin(pn, b16)
	}
	return nil
}

// checkActivation checks the slice dtype selects against the needed length.
func checkActivation(dtype DType, f32 []float32, b16 []uint16, name32, name16, what string, dims ...int) error {
	switch dtype {
	case DTypeF32:
		return checkLen(name32, len(f32), "float32 elements (dtype F32)", what, dims...)
	case DTypeBF16, DTypeF16:
		return checkLen(name16, len(b16), "16-bit elements (dtype "+dtype.String()+")", what, dims...)
	}
	return nil // the library rejects the dtype before touching the buffer
}

// checkDecodeLens checks every buffer whose required length follows from
// valid shape values. Where a shape value is not positive the library
// rejects it before reading any buffer, so the check is skipped.
func checkDecodeLens(a *DecodeArgs) error {
	b, sq, hq, dqk, dv := a.Batch, a.SQ, a.HQ, a.DQK, a.DV
	if !allPositive(b, sq, hq, dqk, dv) {
		return nil
	}
	if err := checkActivation(a.QDType, a.Q, a.Q16, "DecodeArgs.Q", "DecodeArgs.Q16",
		"batch*s_q*h_q*d_qk", b, sq, hq, dqk); err != nil {
		return err
	}
	if err := checkActivation(a.OutDType, a.Out, a.Out16, "DecodeArgs.Out", "DecodeArgs.Out16",
		"batch*s_q*h_q*d_v", b, sq, hq, dv); err != nil {
		return err
	}
	if len(a.LSE) > 0 {
		if err := checkLen("DecodeArgs.LSE", len(a.LSE), "elements", "batch*h_q*s_q", b, hq, sq); err != nil {
			return err
		}
	}
	if len(a.AttnSink) > 0 {
		if err := checkLen("DecodeArgs.AttnSink", len(a.AttnSink), "elements", "h_q", hq); err != nil {
			return err
		}
	}
	if allPositive(a.NumBlocks, a.BlockSize) {
		if bb, err := KvBlockBytes(a.KvFormat, dqk, a.BlockSize); err == nil {
			if err := checkLen("DecodeArgs.KV", len(a.KV), "bytes", "num_blocks*block_bytes", a.NumBlocks, bb); err != nil {
				return err
			}
		}
	}
	if len(a.Indices) == 0 {
		// Dense: the block table and lengths are read.
		if a.BlockTableStride >= 1 {
			if err := checkLen("DecodeArgs.BlockTable", len(a.BlockTable), "elements", "batch*block_table_stride", b, a.BlockTableStride); err != nil {
				return err
			}
		}
		if err := checkLen("DecodeArgs.Seqlens", len(a.Seqlens), "elements", "batch", b); err != nil {
			return err
		}
		// Sparse-only fields set in a dense call are rejected by the library.
		return nil
	}
	if a.TopK >= 1 {
		if err := checkLen("DecodeArgs.Indices", len(a.Indices), "elements", "batch*s_q*topk", b, sq, a.TopK); err != nil {
			return err
		}
	}
	if len(a.TopKLength) > 0 {
		if err := checkLen("DecodeArgs.TopKLength", len(a.TopKLength), "elements", "batch", b); err != nil {
			return err
		}
	}
	if len(a.ExtraKV) > 0 && allPositive(a.ExtraNumBlocks, a.ExtraBlockSize) {
		if bb, err := KvBlockBytes(a.KvFormat, dqk, a.ExtraBlockSize); err == nil {
			if err := checkLen("DecodeArgs.ExtraKV", len(a.ExtraKV), "bytes", "extra_num_blocks*block_bytes", a.ExtraNumBlocks, bb); err != nil {
				return err
			}
		}
	}
	if len(a.ExtraIndices) > 0 && a.ExtraTopK >= 1 {
		if err := checkLen("DecodeArgs.ExtraIndices", len(a.ExtraIndices), "elements", "batch*s_q*extra_topk", b, sq, a.ExtraTopK); err != nil {
			return err
		}
	}
	if len(a.ExtraTopKLength) > 0 {
		if err := checkLen("DecodeArgs.ExtraTopKLength", len(a.ExtraTopKLength), "elements", "batch", b); err != nil {
			return err
		}
	}
	return nil
}
