//go:build !mlart_shared

package mlart

// Default: link the Rust static library from this checkout, so a Go program
// built with this package is self-contained (no libmlart.so at run time).
// The system libraries after it are what a Rust staticlib needs. Build with
// -tags mlart_shared to link -lmlart dynamically instead (see link_shared.go).

/*
#cgo LDFLAGS: ${SRCDIR}/../../target/release/libmlart.a -lgcc_s -lutil -lrt -lpthread -lm -ldl
*/
import "C"
