package mlart

/*
#include <stdbool.h>
#include "mlart.h"
extern _Bool mlartGoProgress(float fraction, char* stage, void* user);
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// mlartGoProgress is the C progress callback of LoadModel: user points to
// C memory holding a cgo.Handle of a *progressState. A panic in the Go
// callback must not unwind through the library's frames: it is recorded,
// the load is cancelled, and LoadModel re-raises it.
//
//export mlartGoProgress
func mlartGoProgress(fraction C.float, stage *C.char, user unsafe.Pointer) (ok C.bool) {
	st := (*(*cgo.Handle)(user)).Value().(*progressState)
	if st.panicked {
		return false
	}
	defer func() {
		if r := recover(); r != nil {
			st.panicked, st.panicVal = true, r
			ok = false
		}
	}()
	return C.bool(st.fn(float32(fraction), C.GoString(stage)))
}

// progressCallback returns mlartGoProgress as an mlart_progress_fn.
func progressCallback() C.mlart_progress_fn {
	return C.mlart_progress_fn(C.mlartGoProgress)
}
