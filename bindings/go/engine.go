package mlart

/*
#include "mlart.h"
*/
import "C"

import (
	"runtime"
	"sync"
)

// EngineOptions configures NewEngine. The zero value is the library's
// default: BackendAuto, device 0, one worker thread per core, AffinityAuto.
type EngineOptions struct {
	Backend        Backend
	DeviceIndex    int            // GPU ordinal (0 for the CPU backend)
	NumThreads     int            // CPU worker threads; 0 = one per available core
	ThreadAffinity ThreadAffinity // whether CPU worker threads are pinned
}

// Engine is a compute engine: one backend, its workspace and its memory.
//
// An Engine may be used from many goroutines at once; concurrent decodes
// share its worker threads. Close waits for calls in flight. Pools and
// models created from an engine keep the underlying engine alive, so they
// stay usable after the Engine is closed.
type Engine struct {
	mu  sync.RWMutex
	ptr *C.mlart_engine
}

// NewEngine creates an engine. Close it when done; a finalizer frees it if
// it becomes unreachable first.
func NewEngine(opts EngineOptions) (*Engine, error) {
	var o C.mlart_engine_options
	C.mlart_engine_options_init(&o)
	o.backend = C.mlart_backend(opts.Backend)
	o.thread_affinity = C.mlart_thread_affinity(opts.ThreadAffinity)
	var err error
	if o.device_index, err = toI32("EngineOptions.DeviceIndex", opts.DeviceIndex); err != nil {
		return nil, err
	}
	if o.num_threads, err = toI32("EngineOptions.NumThreads", opts.NumThreads); err != nil {
		return nil, err
	}
	var ptr *C.mlart_engine
	if err := takeError(C.mlart_engine_create(&o, &ptr)); err != nil {
		return nil, err
	}
	e := &Engine{ptr: ptr}
	runtime.SetFinalizer(e, (*Engine).Close)
	return e, nil
}

// Close releases the engine. It is safe to call more than once; later
// calls of other methods return ErrClosed.
func (e *Engine) Close() error {
	if e == nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ptr != nil {
		C.mlart_engine_free(e.ptr)
		e.ptr = nil
		runtime.SetFinalizer(e, nil)
	}
	return nil
}

// acquire read-locks a live engine; the caller must call e.mu.RUnlock.
func (e *Engine) acquire() (*C.mlart_engine, error) {
	if e == nil {
		return nil, ErrClosed
	}
	e.mu.RLock()
	if e.ptr == nil {
		e.mu.RUnlock()
		return nil, ErrClosed
	}
	return e.ptr, nil
}

// EngineInfo describes what an engine runs on.
type EngineInfo struct {
	Backend     Backend // never BackendAuto
	CPUISA      CPUISA  // CPU engines
	NumThreads  int     // CPU engines
	DeviceIndex int     // CUDA engines, else 0
	DeviceName  string  // CPU model or GPU name
	CPUFeatures string  // space separated
	Reason      string  // why this backend and kernel variant were chosen
	// CPU engines: "pinned to CPUs 0,1 (...)" or "not pinned (...)".
	ThreadPlacement string
}

// Info describes what the engine runs on.
func (e *Engine) Info() (EngineInfo, error) {
	ptr, err := e.acquire()
	if err != nil {
		return EngineInfo{}, err
	}
	defer e.mu.RUnlock()
	var p C.mlart_engine_props
	C.mlart_engine_props_init(&p)
	if err := takeError(C.mlart_engine_info(ptr, &p)); err != nil {
		return EngineInfo{}, err
	}
	return EngineInfo{
		Backend:     Backend(p.backend),
		CPUISA:      CPUISA(p.cpu_isa),
		NumThreads:  int(p.num_threads),
		DeviceIndex: int(p.device_index),
		DeviceName:  C.GoString(&p.device_name[0]),
		CPUFeatures: C.GoString(&p.cpu_features[0]),
		Reason:      C.GoString(&p.reason[0]),

		ThreadPlacement: C.GoString(&p.thread_placement[0]),
	}, nil
}
