package mlart

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#include <stdlib.h>
#include "mlart.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"unsafe"
)

// Status is the category of a failed call, mirroring MLART_STATUS_*.
// Values are stable and only ever appended.
type Status int

// The statuses of mlart.h.
const (
	StatusOK              Status = C.MLART_STATUS_OK
	StatusInvalidArgument Status = C.MLART_STATUS_INVALID_ARGUMENT
	StatusNullPointer     Status = C.MLART_STATUS_NULL_POINTER
	StatusOutOfMemory     Status = C.MLART_STATUS_OUT_OF_MEMORY
	StatusPoolExhausted   Status = C.MLART_STATUS_POOL_EXHAUSTED
	StatusUnsupported     Status = C.MLART_STATUS_UNSUPPORTED
	StatusDevice          Status = C.MLART_STATUS_DEVICE
	StatusIO              Status = C.MLART_STATUS_IO
	StatusFormat          Status = C.MLART_STATUS_FORMAT
	StatusNotFound        Status = C.MLART_STATUS_NOT_FOUND
	StatusCancelled       Status = C.MLART_STATUS_CANCELLED
	StatusInternal        Status = C.MLART_STATUS_INTERNAL
)

// String returns the library's name for the status ("invalid argument", ...).
func (s Status) String() string {
	if s < 0 || int64(s) > math.MaxUint32 {
		return "unknown status"
	}
	return C.GoString(C.mlart_status_name(C.mlart_status(s)))
}

// Error is a failed call: the library's status and its message, which names
// the argument and value at fault. Arguments the binding rejects before
// calling the library (a Go slice too short for the shape) are Errors with
// StatusInvalidArgument whose message names the Go field.
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "mlart: " + e.Status.String()
	}
	return "mlart: " + e.Status.String() + ": " + e.Message
}

// Is reports whether target is an *Error with the same Status and either no
// Message (a sentinel such as ErrInvalidArgument) or the same Message, so
// errors.Is(err, mlart.ErrNotFound) tests the status.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok || t == nil || e == nil {
		return false
	}
	return t.Status == e.Status && (t.Message == "" || t.Message == e.Message)
}

// Sentinels for errors.Is: each matches every *Error of its status.
var (
	ErrInvalidArgument = &Error{Status: StatusInvalidArgument}
	ErrNullPointer     = &Error{Status: StatusNullPointer}
	ErrOutOfMemory     = &Error{Status: StatusOutOfMemory}
	ErrPoolExhausted   = &Error{Status: StatusPoolExhausted}
	ErrUnsupported     = &Error{Status: StatusUnsupported}
	ErrDevice          = &Error{Status: StatusDevice}
	ErrIO              = &Error{Status: StatusIO}
	ErrFormat          = &Error{Status: StatusFormat}
	ErrNotFound        = &Error{Status: StatusNotFound}
	ErrCancelled       = &Error{Status: StatusCancelled}
	ErrInternal        = &Error{Status: StatusInternal}
)

// ErrClosed is returned by every method of an Engine, KvPool or Model after
// its Close.
var ErrClosed = errors.New("mlart: use of closed handle")

// takeError converts a C error into a Go *Error and frees it. nil stays nil.
func takeError(e *C.mlart_error) error {
	if e == nil {
		return nil
	}
	err := &Error{
		Status:  Status(C.mlart_error_code(e)),
		Message: C.GoString(C.mlart_error_message(e)),
	}
	C.mlart_error_free(e)
	return err
}

// argError is a Go-side argument error (the library was not called).
func argError(format string, a ...any) error {
	return &Error{Status: StatusInvalidArgument, Message: fmt.Sprintf(format, a...)}
}

// DType is an element type (MLART_DTYPE_*). Its zero value is DTypeF32.
type DType uint32

// Element types.
const (
	DTypeF32     DType = C.MLART_DTYPE_F32
	DTypeBF16    DType = C.MLART_DTYPE_BF16
	DTypeF16     DType = C.MLART_DTYPE_F16
	DTypeFP8E4M3 DType = C.MLART_DTYPE_FP8_E4M3
)

func (d DType) String() string {
	switch d {
	case DTypeF32:
		return "F32"
	case DTypeBF16:
		return "BF16"
	case DTypeF16:
		return "F16"
	case DTypeFP8E4M3:
		return "FP8_E4M3"
	}
	return fmt.Sprintf("DType(%d)", uint32(d))
}

// KvFormat is the layout of one KV-cache row (MLART_KV_FORMAT_*). Its zero
// value is KvFormatBF16, the library's default.
type KvFormat uint32

// Cache row formats.
const (
	KvFormatBF16      KvFormat = C.MLART_KV_FORMAT_BF16
	KvFormatF16       KvFormat = C.MLART_KV_FORMAT_F16
	KvFormatF32       KvFormat = C.MLART_KV_FORMAT_F32
	KvFormatFP8V32    KvFormat = C.MLART_KV_FORMAT_FP8_V32
	KvFormatFP8Model1 KvFormat = C.MLART_KV_FORMAT_FP8_MODEL1
)

func (f KvFormat) String() string {
	switch f {
	case KvFormatBF16:
		return "BF16"
	case KvFormatF16:
		return "F16"
	case KvFormatF32:
		return "F32"
	case KvFormatFP8V32:
		return "FP8_V32"
	case KvFormatFP8Model1:
		return "FP8_MODEL1"
	}
	return fmt.Sprintf("KvFormat(%d)", uint32(f))
}

// Activations is how a model's projections take their activations
// (MLART_ACTIVATIONS_*). Its zero value is ActivationsPrecise.
type Activations uint32

// Activation precisions.
const (
	// ActivationsPrecise keeps about 16 bits of each activation in every
	// product (the library's default).
	ActivationsPrecise Activations = C.MLART_ACTIVATIONS_PRECISE
	// ActivationsBF16 rounds each projection's input to bf16, as
	// DeepSeek's reference implementation does: faster prefill.
	ActivationsBF16 Activations = C.MLART_ACTIVATIONS_BF16
)

func (a Activations) String() string {
	switch a {
	case ActivationsPrecise:
		return "precise"
	case ActivationsBF16:
		return "bf16"
	}
	return fmt.Sprintf("Activations(%d)", uint32(a))
}

// GPUProjections says where a CUDA engine's model runs its projections
// (q_a, q_b or q_proj, kv_a, o_proj): mlart_model_options.gpu_projections.
// Its zero value is GPUProjectionsDefault. CPU engines ignore it; on a CUDA
// engine, ModelInfo.ProjectionsOnGPU tells what the model does.
type GPUProjections int32

// Projection placements. The Go values are not the C ones: the zero value
// is the library's default, which C spells -1.
const (
	// GPUProjectionsDefault (C: -1) follows the MLART_CUDA_PROJECTIONS
	// environment variable, else the library's default (the CPU).
	GPUProjectionsDefault GPUProjections = iota
	// GPUProjectionsOff (C: 0) runs the projections on the CPU.
	GPUProjectionsOff
	// GPUProjectionsOn (C: 1) runs them on the GPU (bf16 and FP8 weights;
	// f32/f16 ones stay on the CPU). Over a pool of the same engine the
	// whole layer then runs there.
	GPUProjectionsOn
)

func (g GPUProjections) String() string {
	switch g {
	case GPUProjectionsDefault:
		return "default"
	case GPUProjectionsOff:
		return "off"
	case GPUProjectionsOn:
		return "on"
	}
	return fmt.Sprintf("GPUProjections(%d)", int32(g))
}

// c is the mlart_model_options.gpu_projections value; false for a value
// that is none of the constants.
func (g GPUProjections) c() (C.int32_t, bool) {
	switch g {
	case GPUProjectionsDefault:
		return -1, true
	case GPUProjectionsOff:
		return 0, true
	case GPUProjectionsOn:
		return 1, true
	}
	return 0, false
}

// Backend is a compute backend (MLART_BACKEND_*). Its zero value is
// BackendAuto.
type Backend uint32

// Backends.
const (
	BackendAuto Backend = C.MLART_BACKEND_AUTO
	BackendCPU  Backend = C.MLART_BACKEND_CPU
	BackendCUDA Backend = C.MLART_BACKEND_CUDA
)

func (b Backend) String() string {
	switch b {
	case BackendAuto:
		return "auto"
	case BackendCPU:
		return "cpu"
	case BackendCUDA:
		return "cuda"
	}
	return fmt.Sprintf("Backend(%d)", uint32(b))
}

// ThreadAffinity says whether a CPU engine pins its worker threads
// (MLART_AFFINITY_*). Its zero value is AffinityAuto: pinned when the pool
// has one thread per CPU the process may use. EngineInfo.ThreadPlacement
// tells what was done.
type ThreadAffinity uint32

// Thread affinities.
const (
	AffinityAuto ThreadAffinity = C.MLART_AFFINITY_AUTO
	AffinityNone ThreadAffinity = C.MLART_AFFINITY_NONE
	AffinityPin  ThreadAffinity = C.MLART_AFFINITY_PIN
)

func (a ThreadAffinity) String() string {
	switch a {
	case AffinityAuto:
		return "auto"
	case AffinityNone:
		return "none"
	case AffinityPin:
		return "pin"
	}
	return fmt.Sprintf("ThreadAffinity(%d)", uint32(a))
}

// CPUISA is a CPU kernel variant (MLART_CPU_ISA_*).
type CPUISA uint32

// CPU kernel variants.
const (
	CPUISAScalar     CPUISA = C.MLART_CPU_ISA_SCALAR
	CPUISAAVX2       CPUISA = C.MLART_CPU_ISA_AVX2
	CPUISAAVX512     CPUISA = C.MLART_CPU_ISA_AVX512
	CPUISAAMX        CPUISA = C.MLART_CPU_ISA_AMX
	CPUISAAVX512BF16 CPUISA = C.MLART_CPU_ISA_AVX512_BF16
)

func (i CPUISA) String() string {
	switch i {
	case CPUISAScalar:
		return "scalar"
	case CPUISAAVX2:
		return "avx2"
	case CPUISAAVX512:
		return "avx512"
	case CPUISAAMX:
		return "amx"
	case CPUISAAVX512BF16:
		return "avx512bf16"
	}
	return fmt.Sprintf("CPUISA(%d)", uint32(i))
}

// ABIVersion is the ABI version of the header this package was compiled
// against; LibraryABIVersion reports the linked library's.
const ABIVersion = C.MLART_ABI_VERSION

// HeaderVersionMajor and HeaderVersionMinor are the version of the header
// this package was compiled against; Version reports the linked library's.
const (
	HeaderVersionMajor = C.MLART_VERSION_MAJOR
	HeaderVersionMinor = C.MLART_VERSION_MINOR
)

// Version returns the linked library's version, "MAJOR.MINOR.PATCH".
func Version() string { return C.GoString(C.mlart_version()) }

// LibraryABIVersion returns the ABI version of the linked library; it
// differs from ABIVersion only when header and library do not match.
func LibraryABIVersion() uint32 { return uint32(C.mlart_abi_version()) }

// DeviceCount returns the number of CUDA devices: 0 without an NVIDIA
// driver (not an error).
func DeviceCount() (int, error) {
	var n C.int32_t
	if err := takeError(C.mlart_device_count(&n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// DeviceProps describes one CUDA device.
type DeviceProps struct {
	Index        int
	Name         string
	ComputeMajor int
	ComputeMinor int
	SMCount      int
	TotalMemory  uint64
	HasKernels   bool   // whether this build carries kernels that run on it
	Kernels      string // the kernel image the driver will use, or why none
}

// DeviceInfo describes CUDA device index (StatusNotFound for no such device,
// StatusUnsupported without a driver).
func DeviceInfo(index int) (DeviceProps, error) {
	i, err := toI32("index", index)
	if err != nil {
		return DeviceProps{}, err
	}
	var p C.mlart_device_props
	C.mlart_device_props_init(&p)
	if err := takeError(C.mlart_device_info(i, &p)); err != nil {
		return DeviceProps{}, err
	}
	return DeviceProps{
		Index:        int(p.device_index),
		Name:         C.GoString(&p.name[0]),
		ComputeMajor: int(p.compute_major),
		ComputeMinor: int(p.compute_minor),
		SMCount:      int(p.sm_count),
		TotalMemory:  uint64(p.total_memory),
		HasKernels:   bool(p.has_kernels),
		Kernels:      C.GoString(&p.kernels[0]),
	}, nil
}

// KvRowBytes returns the bytes one token occupies in format with rows of
// dQK elements (FP8V32: 656, FP8Model1: 584, plain: dQK x element size).
func KvRowBytes(format KvFormat, dQK int) (int, error) {
	d, err := toI32("d_qk", dQK)
	if err != nil {
		return 0, err
	}
	var n C.size_t
	if err := takeError(C.mlart_kv_row_bytes(C.mlart_kv_format(format), d, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// KvBlockBytes returns the bytes of one cache block of blockSize tokens
// (padding included: the stride between blocks).
func KvBlockBytes(format KvFormat, dQK, blockSize int) (int, error) {
	d, err := toI32("d_qk", dQK)
	if err != nil {
		return 0, err
	}
	b, err := toI32("block_size", blockSize)
	if err != nil {
		return 0, err
	}
	var n C.size_t
	if err := takeError(C.mlart_kv_block_bytes(C.mlart_kv_format(format), d, b, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// KvQuantize writes the float32 rows src [n, dQK] (n = len(src)/dQK) into
// dst, which must hold ceil(n/blockSize) blocks of format: token t goes to
// block t/blockSize, slot t%blockSize. Slots past n in the last block are
// left as they were.
func KvQuantize(format KvFormat, dQK, blockSize int, src []float32, dst []byte) error {
	return kvQuantize(format, dQK, blockSize, DTypeF32, len(src), ptrOf(src), dst)
}

// KvQuantize16 is KvQuantize for 16-bit rows: srcType is DTypeBF16 or
// DTypeF16 and src holds the raw bit patterns.
func KvQuantize16(format KvFormat, dQK, blockSize int, srcType DType, src []uint16, dst []byte) error {
	return kvQuantize(format, dQK, blockSize, srcType, len(src), ptrOf(src), dst)
}

func kvQuantize(format KvFormat, dQK, blockSize int, srcType DType, srcLen int, src unsafe.Pointer, dst []byte) error {
	if dQK <= 0 {
		return argError("KvQuantize: d_qk = %d must be >= 1", dQK)
	}
	if srcLen%dQK != 0 {
		return argError("KvQuantize: src has %d elements, not a multiple of d_qk = %d", srcLen, dQK)
	}
	n := srcLen / dQK
	nt, err := toI32("n_tokens", n)
	if err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	blockBytes, err := KvBlockBytes(format, dQK, blockSize)
	if err != nil {
		return err
	}
	need, ok := mulInt((n+blockSize-1)/blockSize, blockBytes)
	if !ok || len(dst) < need {
		return argError("KvQuantize: dst has %d bytes, need %d (ceil(%d tokens / block_size %d) blocks of %d bytes)",
			len(dst), need, n, blockSize, blockBytes)
	}
	err = takeError(C.mlart_kv_quantize(C.mlart_kv_format(format), C.int32_t(dQK), C.int32_t(blockSize),
		nt, C.mlart_dtype(srcType), src, unsafe.Pointer(&dst[0])))
	runtime.KeepAlive(dst)
	return err
}

// KvDequantize reads n = len(dst)/dQK tokens from the ceil(n/blockSize)
// blocks of src and writes them as float32 rows dst [n, dQK] (exact for
// every format).
func KvDequantize(format KvFormat, dQK, blockSize int, src []byte, dst []float32) error {
	if dQK <= 0 {
		return argError("KvDequantize: d_qk = %d must be >= 1", dQK)
	}
	if len(dst)%dQK != 0 {
		return argError("KvDequantize: dst has %d elements, not a multiple of d_qk = %d", len(dst), dQK)
	}
	n := len(dst) / dQK
	nt, err := toI32("n_tokens", n)
	if err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	blockBytes, err := KvBlockBytes(format, dQK, blockSize)
	if err != nil {
		return err
	}
	need, ok := mulInt((n+blockSize-1)/blockSize, blockBytes)
	if !ok || len(src) < need {
		return argError("KvDequantize: src has %d bytes, need %d (ceil(%d tokens / block_size %d) blocks of %d bytes)",
			len(src), need, n, blockSize, blockBytes)
	}
	err = takeError(C.mlart_kv_dequantize(C.mlart_kv_format(format), C.int32_t(dQK), C.int32_t(blockSize),
		nt, unsafe.Pointer(&src[0]), C.mlart_dtype(DTypeF32), unsafe.Pointer(&dst[0])))
	runtime.KeepAlive(src)
	runtime.KeepAlive(dst)
	return err
}

// BF16 converts f to bfloat16 bits, rounding to nearest even (NaN stays NaN).
func BF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// BF16ToFloat32 converts bfloat16 bits to float32 (exact).
func BF16ToFloat32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// ToBF16 converts a float32 slice to bfloat16 bits.
func ToBF16(src []float32) []uint16 {
	dst := make([]uint16, len(src))
	for i, v := range src {
		dst[i] = BF16(v)
	}
	return dst
}

// FromBF16 converts bfloat16 bits to a float32 slice.
func FromBF16(src []uint16) []float32 {
	dst := make([]float32, len(src))
	for i, v := range src {
		dst[i] = BF16ToFloat32(v)
	}
	return dst
}

// ---- internal helpers ----

// ptrOf returns &s[0], or nil for an empty slice. The caller keeps s alive
// (or pins it) for the duration of the C call.
func ptrOf[T any](s []T) unsafe.Pointer {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Pointer(&s[0])
}

// pin pins &s[0] (so it may be stored in a C argument struct) and returns it,
// or nil for an empty slice.
func pin[T any](p *runtime.Pinner, s []T) unsafe.Pointer {
	if len(s) == 0 {
		return nil
	}
	p.Pin(&s[0])
	return unsafe.Pointer(&s[0])
}

// toI32 converts a Go int argument to int32, naming it when it does not fit.
func toI32(name string, v int) (C.int32_t, error) {
	if v < math.MinInt32 || v > math.MaxInt32 {
		return 0, argError("%s = %d does not fit in int32", name, v)
	}
	return C.int32_t(v), nil
}

// mulInt multiplies non-negative sizes, reporting overflow.
func mulInt(dims ...int) (int, bool) {
	r := 1
	for _, d := range dims {
		if d < 0 {
			return 0, false
		}
		if d != 0 && r > math.MaxInt/d {
			return 0, false
		}
		r *= d
	}
	return r, true
}

// allPositive reports whether every value is >= 1.
func allPositive(v ...int) bool {
	for _, x := range v {
		if x < 1 {
			return false
		}
	}
	return true
}

// checkLen reports a Go slice shorter than a shape needs. what describes the
// requirement, e.g. "batch*s_q*h_q*d_qk".
func checkLen(field string, have int, unit string, what string, dims ...int) error {
	need, ok := mulInt(dims...)
	if !ok {
		return argError("%s: %s overflows", field, what)
	}
	if have < need {
		return argError("%s has %d %s, need %d (%s = %v)", field, have, unit, need, what, dims)
	}
	return nil
}
