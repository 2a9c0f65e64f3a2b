package mlart

/*
#include <stdlib.h>
#include "mlart.h"
*/
import "C"

import (
	"runtime"
	"runtime/cgo"
	"strings"
	"sync"
	"unsafe"
)

// ModelOptions configures LoadModel. The zero value loads every layer in
// its stored precision.
type ModelOptions struct {
	FirstLayer int // first layer to load
	NumLayers  int // layers to load; 0 = all from FirstLayer on
	// ConvertWeights converts the projection weights at load to
	// WeightDType (DTypeF32, DTypeBF16 or DTypeF16) instead of keeping
	// their stored precision.
	ConvertWeights bool
	WeightDType    DType
	// Activations is how the projections take their activations:
	// ActivationsPrecise (the zero value) or ActivationsBF16.
	Activations Activations
	// GPUProjections is where a CUDA engine runs the projections:
	// GPUProjectionsDefault (the zero value: MLART_CUDA_PROJECTIONS, else
	// the CPU), GPUProjectionsOff (the CPU) or GPUProjectionsOn (the GPU).
	// CPU engines ignore it. ModelInfo.ProjectionsOnGPU tells the outcome.
	GPUProjections GPUProjections
	// KeptKeysBytes is the most bytes of up-projected keys (K and V of
	// every head) one Forward keeps between the passes of a long prompt (a
	// sequence's new tokens past 512 run in passes); past it, the positions
	// beyond the kept ones are up-projected again in every pass, which
	// costs time, not correctness. 0 (the zero value) means the default of
	// 1 GiB; less than one 64-position block's rows keeps none;
	// math.MaxUint64 sets no limit. Only the CPU's prefill keeps keys.
	// ModelInfo.KeptKeysBytes tells the value in effect.
	KeptKeysBytes uint64
	// Progress, when set, is called during the load with fraction in
	// [0, 1] and the name of the tensor just loaded; returning false
	// cancels the load (StatusCancelled). A panic in Progress cancels the
	// load and is re-raised by LoadModel.
	Progress func(fraction float32, stage string) bool
}

// YaRN holds a model's YaRN rope scaling parameters.
type YaRN struct {
	Factor               float64
	OriginalMaxPosition  int64
	BetaFast, BetaSlow   float64
	MScale, MScaleAllDim float64
}

// ModelInfo describes a loaded model.
type ModelInfo struct {
	NumLayers     int // layers in the checkpoint
	FirstLayer    int // first loaded layer
	LoadedLayers  int
	HiddenSize    int
	NumHeads      int
	QLoraRank     int // 0 without a query low-rank projection (V2-Lite)
	KvLoraRank    int
	QKNopeHeadDim int
	QKRopeHeadDim int
	VHeadDim      int
	DQK           int // cache row width a pool needs: KvLoraRank + QKRopeHeadDim
	RopeTheta     float64
	YaRN          *YaRN       // nil without YaRN rope scaling
	SoftmaxScale  float64     // the attention softmax scale used
	WeightDType   DType       // projection weights in memory
	BytesLoaded   uint64      // bytes of weights held in memory
	Activations   Activations // how the projections take their activations
	// ProjectionISA is the projections' vector code: the engine's CPU
	// kernel variant capped by the CPU (scalar, avx2, avx512 or avx512bf16).
	ProjectionISA CPUISA
	// DeepSeek-V3.2's sparse-attention indexer: its heads, its key width
	// and the tokens each query attends to; all 0 for models without one.
	// A pool for this model needs KvPoolOptions.IndexHeadDim = IndexHeadDim.
	IndexNHeads  int
	IndexHeadDim int
	IndexTopK    int
	// ProjectionsOnGPU is true when the projections run on the GPU (a CUDA
	// engine, asked for by ModelOptions.GPUProjections or
	// MLART_CUDA_PROJECTIONS, bf16 or FP8 weights); then the whole layer
	// runs there over a pool of the same engine. Always false on a CPU
	// engine.
	ProjectionsOnGPU bool
	// KeptKeysBytes is ModelOptions.KeptKeysBytes in effect, 0 resolved
	// to its default of 1 GiB (1073741824).
	KeptKeysBytes uint64
}

// Model is a loaded model: the attention weights of a range of layers.
// It is immutable after loading: any number of goroutines may run Forward
// at once on disjoint sets of sequences (forwards sharing a sequence must
// not overlap). Close waits for calls in flight. A model keeps its engine
// alive.
type Model struct {
	mu        sync.RWMutex
	ptr       *C.mlart_model
	hidden    int
	indexTopK int
}

// progressState is what the C progress callback reaches through a handle.
type progressState struct {
	fn       func(float32, string) bool
	panicked bool
	panicVal any
}

// LoadModel loads config.json and the attention tensors of a Hugging Face
// style DeepSeek V2/V2-Lite/V3/V3.2 checkpoint directory.
func LoadModel(engine *Engine, dir string, opts ModelOptions) (*Model, error) {
	if strings.IndexByte(dir, 0) >= 0 {
		return nil, argError("LoadModel: dir contains a NUL byte")
	}
	var o C.mlart_model_options
	C.mlart_model_options_init(&o)
	var err error
	if o.first_layer, err = toI32("ModelOptions.FirstLayer", opts.FirstLayer); err != nil {
		return nil, err
	}
	if o.num_layers, err = toI32("ModelOptions.NumLayers", opts.NumLayers); err != nil {
		return nil, err
	}
	o.convert_weights = C.bool(opts.ConvertWeights)
	o.weight_dtype = C.mlart_dtype(opts.WeightDType)
	o.activations = C.mlart_activations(opts.Activations)
	gp, ok := opts.GPUProjections.c()
	if !ok {
		return nil, argError("ModelOptions.GPUProjections = %d is not GPUProjectionsDefault, GPUProjectionsOff or GPUProjectionsOn (mlart_model_options.gpu_projections)",
			int32(opts.GPUProjections))
	}
	o.gpu_projections = gp
	o.kept_keys_bytes = C.uint64_t(opts.KeptKeysBytes)

	var state *progressState
	if opts.Progress != nil {
		state = &progressState{fn: opts.Progress}
		h := cgo.NewHandle(state)
		defer h.Delete()
		// The handle value lives in C memory: C keeps no Go pointer.
		ud := C.malloc(C.size_t(unsafe.Sizeof(h)))
		defer C.free(ud)
		*(*cgo.Handle)(ud) = h
		o.progress = progressCallback()
		o.progress_user_data = ud
	}

	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))

	eptr, err := engine.acquire()
	if err != nil {
		return nil, err
	}
	var ptr *C.mlart_model
	err = takeError(C.mlart_model_load(eptr, cdir, &o, &ptr))
	engine.mu.RUnlock()
	runtime.KeepAlive(engine)
	if state != nil && state.panicked {
		if err == nil {
			C.mlart_model_free(ptr)
		}
		panic(state.panicVal)
	}
	if err != nil {
		return nil, err
	}
	m := &Model{ptr: ptr}
	runtime.SetFinalizer(m, (*Model).Close)
	info, err := m.Info()
	if err != nil {
		m.Close()
		return nil, err
	}
	m.hidden = info.HiddenSize
	m.indexTopK = info.IndexTopK
	return m, nil
}

// Close releases the model. Safe to call more than once; later calls of
// other methods return ErrClosed.
func (m *Model) Close() error {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ptr != nil {
		C.mlart_model_free(m.ptr)
		m.ptr = nil
		runtime.SetFinalizer(m, nil)
	}
	return nil
}

func (m *Model) acquire() (*C.mlart_model, error) {
	if m == nil {
		return nil, ErrClosed
	}
	m.mu.RLock()
	if m.ptr == nil {
		m.mu.RUnlock()
		return nil, ErrClosed
	}
	return m.ptr, nil
}

// Info describes the loaded model.
func (m *Model) Info() (ModelInfo, error) {
	ptr, err := m.acquire()
	if err != nil {
		return ModelInfo{}, err
	}
	defer m.mu.RUnlock()
	var p C.mlart_model_props
	C.mlart_model_props_init(&p)
	if err := takeError(C.mlart_model_info(ptr, &p)); err != nil {
		return ModelInfo{}, err
	}
	info := ModelInfo{
		NumLayers:     int(p.num_layers),
		FirstLayer:    int(p.first_layer),
		LoadedLayers:  int(p.loaded_layers),
		HiddenSize:    int(p.hidden_size),
		NumHeads:      int(p.num_heads),
		QLoraRank:     int(p.q_lora_rank),
		KvLoraRank:    int(p.kv_lora_rank),
		QKNopeHeadDim: int(p.qk_nope_head_dim),
		QKRopeHeadDim: int(p.qk_rope_head_dim),
		VHeadDim:      int(p.v_head_dim),
		DQK:           int(p.d_qk),
		RopeTheta:     float64(p.rope_theta),
		SoftmaxScale:  float64(p.softmax_scale),
		WeightDType:   DType(p.weight_dtype),
		BytesLoaded:   uint64(p.bytes_loaded),
		Activations:   Activations(p.activations),
		ProjectionISA: CPUISA(p.projection_isa),
		IndexNHeads:   int(p.index_n_heads),
		IndexHeadDim:  int(p.index_head_dim),
		IndexTopK:     int(p.index_topk),

		ProjectionsOnGPU: p.projections_on_gpu != 0,
		KeptKeysBytes:    uint64(p.kept_keys_bytes),
	}
	if bool(p.yarn) {
		info.YaRN = &YaRN{
			Factor:              float64(p.yarn_factor),
			OriginalMaxPosition: int64(p.yarn_original_max_position),
			BetaFast:            float64(p.yarn_beta_fast),
			BetaSlow:            float64(p.yarn_beta_slow),
			MScale:              float64(p.yarn_mscale),
			MScaleAllDim:        float64(p.yarn_mscale_all_dim),
		}
	}
	return info, nil
}

// ForwardArgs are the arguments of Model.Forward. Batch is len(SeqIDs).
// The zero values of XDType and OutDType mean F32.
type ForwardArgs struct {
	Layer   int      // absolute layer index (must be loaded)
	SeqIDs  []uint64 // distinct sequence ids, existing in the pool
	NTokens []int32  // new tokens per sequence (>= 1), len(SeqIDs) entries

	XDType DType     // DTypeF32 reads X; DTypeBF16/DTypeF16 read X16
	X      []float32 // hidden states [sum(NTokens), hidden], sequence by sequence
	X16    []uint16

	OutDType DType     // DTypeF32 writes Out; DTypeBF16/DTypeF16 write Out16
	Out      []float32 // attention block output [sum(NTokens), hidden]
	Out16    []uint16

	// IndexOut, optional and for DeepSeek-V3.2 models only (IndexTopK > 0
	// in ModelInfo), receives the positions each new token attended to, as
	// the indexer chose them: [sum(NTokens), IndexTopK], ascending, -1
	// after the last (a token at position p < IndexTopK attends to all of
	// 0..p). Empty: not requested. Set for a model without an indexer, it
	// is the library's StatusInvalidArgument naming index_out.
	IndexOut []int32
}

// Forward runs the MLA attention block of one layer for a batch of
// sequences: projections, norms, RoPE, appending the new cache rows to
// pool, causal attention, and the output projection. A DeepSeek-V3.2 model
// (ModelInfo.IndexTopK > 0) needs a pool created with its IndexHeadDim; its
// tokens past the first IndexTopK positions attend to the IndexTopK the
// indexer selects (ForwardArgs.IndexOut reports them). On error the pool is
// unchanged and Out and IndexOut are not written.
func (m *Model) Forward(pool *KvPool, args *ForwardArgs) error {
	if args == nil {
		return argError("Forward: args is nil")
	}
	var ca C.mlart_forward_args
	C.mlart_forward_args_init(&ca)
	var err error
	if ca.layer, err = toI32("ForwardArgs.Layer", args.Layer); err != nil {
		return err
	}
	if ca.batch, err = toI32("ForwardArgs.SeqIDs (length)", len(args.SeqIDs)); err != nil {
		return err
	}
	mptr, err := m.acquire()
	if err != nil {
		return err
	}
	defer m.mu.RUnlock()
	pptr, err := pool.acquire()
	if err != nil {
		return err
	}
	defer pool.mu.RUnlock()

	b := len(args.SeqIDs)
	if b >= 1 {
		if len(args.NTokens) < b {
			return argError("ForwardArgs.NTokens has %d elements, need %d (len(SeqIDs))", len(args.NTokens), b)
		}
		total, ok := 0, true
		for _, n := range args.NTokens[:b] {
			if n < 1 {
				ok = false // the library rejects it before reading X
				break
			}
			total += int(n)
		}
		if ok {
			if err := checkActivation(args.XDType, args.X, args.X16, "ForwardArgs.X", "ForwardArgs.X16",
				"sum(n_tokens)*hidden", total, m.hidden); err != nil {
				return err
			}
			if err := checkActivation(args.OutDType, args.Out, args.Out16, "ForwardArgs.Out", "ForwardArgs.Out16",
				"sum(n_tokens)*hidden", total, m.hidden); err != nil {
				return err
			}
			if len(args.IndexOut) > 0 && m.indexTopK > 0 {
				if err := checkLen("ForwardArgs.IndexOut", len(args.IndexOut), "elements",
					"sum(n_tokens)*index_topk", total, m.indexTopK); err != nil {
					return err
				}
			}
		}
	}

	var pn runtime.Pinner
	defer pn.Unpin()
	ca.seq_ids = (*C.uint64_t)(pin(&pn, args.SeqIDs))
	ca.n_tokens = (*C.int32_t)(pin(&pn, args.NTokens))
	ca.x_dtype = C.mlart_dtype(args.XDType)
	ca.x = qPointer(&pn, args.XDType, args.X, args.X16)
	ca.out_dtype = C.mlart_dtype(args.OutDType)
	ca.out = qPointer(&pn, args.OutDType, args.Out, args.Out16)
	ca.index_out = (*C.int32_t)(pin(&pn, args.IndexOut))
	ca.memory = C.MLART_MEMORY_HOST // Go slices; stream stays NULL

	err = takeError(C.mlart_model_forward(mptr, pptr, &ca))
	runtime.KeepAlive(m)
	runtime.KeepAlive(pool)
	runtime.KeepAlive(args)
	return err
}
