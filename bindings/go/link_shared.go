//go:build mlart_shared

package mlart

// With -tags mlart_shared: link -lmlart, searched first in the -L folders of
// CGO_LDFLAGS, then in this checkout's target/release. The run-time loader
// must find libmlart.so.0 (LD_LIBRARY_PATH, or -Wl,-rpath in CGO_LDFLAGS).
// The system libraries after -lmlart are only used when the -L folder holds
// just libmlart.a (a static library from elsewhere).

/*
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -lmlart -lgcc_s -lutil -lrt -lpthread -lm -ldl
*/
import "C"
