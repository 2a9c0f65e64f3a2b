package mlart_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"

	"mlart"
)

// ---------------------------------------------------------------------------
// Helpers: an independent float64 reference and bf16 rounding.

func newEngine(t testing.TB) *mlart.Engine {
	t.Helper()
	e, err := mlart.NewEngine(mlart.EngineOptions{Backend: mlart.BackendCPU, NumThreads: 2})
	if err != nil {
		t.Fatalf("NewEngine: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// bf16Bits rounds to bfloat16 (nearest even), written here independently of
// the package's helper.
func bf16Bits(f float32) uint16 {
	u := math.Float32bits(f)
	lsb := (u >> 16) & 1
	return uint16((u + 0x7fff + lsb) >> 16)
}

func bf16Val(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

func roundBF16(f float32) float32 { return bf16Val(bf16Bits(f)) }

func randF32(r *rand.Rand, n int, scale float32) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = (2*r.Float32() - 1) * scale
	}
	return s
}

// attend is the reference: softmax(scale * q.K^T) V with V = K[:, :dv], in
// float64. No key: out = 0, lse = +inf.
func attend(q []float32, keys [][]float32, dv int, scale float64) ([]float64, float64) {
	out := make([]float64, dv)
	if len(keys) == 0 {
		return out, math.Inf(1)
	}
	s := make([]float64, len(keys))
	m := math.Inf(-1)
	for t, k := range keys {
		var dot float64
		for j := range q {
			dot += float64(q[j]) * float64(k[j])
		}
		s[t] = scale * dot
		m = math.Max(m, s[t])
	}
	var sum float64
	for t := range s {
		s[t] = math.Exp(s[t] - m)
		sum += s[t]
	}
	for t, k := range keys {
		w := s[t] / sum
		for j := 0; j < dv; j++ {
			out[j] += w * float64(k[j])
		}
	}
	return out, m + math.Log(sum)
}

func relL2(got []float32, want []float64) float64 {
	if len(got) != len(want) {
		panic(fmt.Sprintf("relL2: %d vs %d elements", len(got), len(want)))
	}
	var num, den float64
	for i := range got {
		d := float64(got[i]) - want[i]
		num += d * d
		den += want[i] * want[i]
	}
	if den == 0 {
		return math.Sqrt(num)
	}
	return math.Sqrt(num / den)
}

func checkLSE(t *testing.T, got []float32, want []float64) {
	t.Helper()
	for i := range want {
		g, w := float64(got[i]), want[i]
		if math.IsInf(w, 1) {
			if !math.IsInf(g, 1) {
				t.Fatalf("lse[%d] = %v, want +inf (no key)", i, g)
			}
			continue
		}
		if !(math.Abs(g-w) <= 1e-4*(1+math.Abs(w))) {
			t.Fatalf("lse[%d] = %v, want %v", i, g, w)
		}
	}
}

func nanF32s(n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(math.NaN())
	}
	return s
}

func nanU16s(n int) []uint16 {
	s := make([]uint16, n)
	for i := range s {
		s[i] = 0x7fc0
	}
	return s
}

func errStatus(t *testing.T, err error) *mlart.Error {
	t.Helper()
	var me *mlart.Error
	if !errors.As(err, &me) {
		t.Fatalf("error %v (%T) is not an *mlart.Error", err, err)
	}
	return me
}

// ---------------------------------------------------------------------------
// A dense paged-decode problem built by hand.

type denseCase struct {
	name     string
	dqk, dv  int
	hq, sq   int
	bs       int
	seqlens  []int
	causal   bool
	kvFormat mlart.KvFormat // F32 (written by hand) or BF16 (via KvQuantize)
	qType    mlart.DType
	outType  mlart.DType
	tol      float64
	scale    float32 // 0: the default 1/sqrt(dqk)
	sink     bool    // pass a per-head attention sink
}

type denseProblem struct {
	c     denseCase
	args  mlart.DecodeArgs
	keys  [][][]float32 // per sequence, the rows as the library stores them
	q     []float32     // queries as the library sees them
	scale float64
	sink  []float32
}

func buildDense(t *testing.T, c denseCase, seed int64) *denseProblem {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	p := &denseProblem{c: c, scale: 1 / math.Sqrt(float64(c.dqk))}
	if c.scale != 0 {
		p.scale = float64(c.scale)
	}
	batch := len(c.seqlens)

	// Blocks per sequence, assigned from a shuffled list (plus spares).
	nb := make([]int, batch)
	total, stride := 2, 1
	for b, n := range c.seqlens {
		nb[b] = (n + c.bs - 1) / c.bs
		total += nb[b]
		if nb[b]+1 > stride {
			stride = nb[b] + 1
		}
	}
	perm := r.Perm(total)
	blockBytes, err := mlart.KvBlockBytes(c.kvFormat, c.dqk, c.bs)
	if err != nil {
		t.Fatal(err)
	}
	elem := map[mlart.KvFormat]int{mlart.KvFormatF32: 4, mlart.KvFormatBF16: 2}[c.kvFormat]
	if blockBytes != c.bs*c.dqk*elem {
		t.Fatalf("KvBlockBytes(%v, %d, %d) = %d, want %d", c.kvFormat, c.dqk, c.bs, blockBytes, c.bs*c.dqk*elem)
	}
	rowBytes, err := mlart.KvRowBytes(c.kvFormat, c.dqk)
	if err != nil || rowBytes != c.dqk*elem {
		t.Fatalf("KvRowBytes = %d, %v; want %d", rowBytes, err, c.dqk*elem)
	}

	kv := make([]byte, total*blockBytes)
	// Everything not written below is NaN: never read by contract.
	if c.kvFormat == mlart.KvFormatF32 {
		for i := 0; i < len(kv); i += 4 {
			binary.LittleEndian.PutUint32(kv[i:], 0x7fc00000)
		}
	} else {
		for i := 0; i < len(kv); i += 2 {
			binary.LittleEndian.PutUint16(kv[i:], 0x7fc0)
		}
	}
	table := make([]int32, batch*stride)
	for i := range table {
		table[i] = 1 << 30 // entries past a sequence's length are not read
	}
	seqlens := make([]int32, batch)
	next := 0
	p.keys = make([][][]float32, batch)
	for b, n := range c.seqlens {
		seqlens[b] = int32(n)
		src := randF32(r, n*c.dqk, 1)
		for i := 0; i < nb[b]; i++ {
			table[b*stride+i] = int32(perm[next+i])
		}
		rows := make([][]float32, n)
		switch c.kvFormat {
		case mlart.KvFormatF32:
			for tok := 0; tok < n; tok++ {
				blk := int(table[b*stride+tok/c.bs])
				off := blk*blockBytes + (tok%c.bs)*c.dqk*4
				for j := 0; j < c.dqk; j++ {
					binary.LittleEndian.PutUint32(kv[off+4*j:], math.Float32bits(src[tok*c.dqk+j]))
				}
				rows[tok] = src[tok*c.dqk : (tok+1)*c.dqk]
			}
		case mlart.KvFormatBF16:
			if n > 0 {
				tmp := make([]byte, nb[b]*blockBytes)
				for i := 0; i < len(tmp); i += 2 {
					binary.LittleEndian.PutUint16(tmp[i:], 0x7fc0)
				}
				if err := mlart.KvQuantize(c.kvFormat, c.dqk, c.bs, src, tmp); err != nil {
					t.Fatalf("KvQuantize: %v", err)
				}
				back := make([]float32, n*c.dqk)
				if err := mlart.KvDequantize(c.kvFormat, c.dqk, c.bs, tmp, back); err != nil {
					t.Fatalf("KvDequantize: %v", err)
				}
				for i, v := range src {
					if back[i] != roundBF16(v) {
						t.Fatalf("KvQuantize/KvDequantize: element %d = %v, want bf16(%v) = %v", i, back[i], v, roundBF16(v))
					}
				}
				for i := 0; i < nb[b]; i++ {
					blk := int(table[b*stride+i])
					copy(kv[blk*blockBytes:(blk+1)*blockBytes], tmp[i*blockBytes:(i+1)*blockBytes])
				}
			}
			for tok := 0; tok < n; tok++ {
				row := make([]float32, c.dqk)
				for j := range row {
					row[j] = roundBF16(src[tok*c.dqk+j])
				}
				rows[tok] = row
			}
		default:
			t.Fatalf("format %v not built by this test", c.kvFormat)
		}
		p.keys[b] = rows
		next += nb[b]
	}

	nq := batch * c.sq * c.hq * c.dqk
	q := randF32(r, nq, 2)
	a := mlart.DecodeArgs{
		Batch: batch, SQ: c.sq, HQ: c.hq, DQK: c.dqk, DV: c.dv, Causal: c.causal,
		QDType: c.qType, KvFormat: c.kvFormat, KV: kv, NumBlocks: total, BlockSize: c.bs,
		BlockTable: table, BlockTableStride: stride, Seqlens: seqlens,
		OutDType: c.outType, LSE: nanF32s(batch * c.hq * c.sq), SoftmaxScale: c.scale,
	}
	if c.sink {
		p.sink = randF32(r, c.hq, 2)
		a.AttnSink = p.sink
	}
	if c.qType == mlart.DTypeBF16 {
		a.Q16 = make([]uint16, nq)
		for i, v := range q {
			a.Q16[i] = bf16Bits(v)
			q[i] = bf16Val(a.Q16[i])
		}
	} else {
		a.Q = q
	}
	nout := batch * c.sq * c.hq * c.dv
	if c.outType == mlart.DTypeBF16 {
		a.Out16 = nanU16s(nout)
	} else {
		a.Out = nanF32s(nout)
	}
	p.q, p.args = q, a
	return p
}

// reference computes out [B, SQ, HQ, DV] and lse [B, HQ, SQ].
func (p *denseProblem) reference() ([]float64, []float64) {
	c := p.c
	batch := len(c.seqlens)
	out := make([]float64, 0, batch*c.sq*c.hq*c.dv)
	lse := make([]float64, batch*c.hq*c.sq)
	for b := 0; b < batch; b++ {
		for i := 0; i < c.sq; i++ {
			visible := c.seqlens[b]
			if c.causal {
				visible = max(0, visible-(c.sq-1-i))
			}
			for h := 0; h < c.hq; h++ {
				off := ((b*c.sq+i)*c.hq + h) * c.dqk
				o, l := attend(p.q[off:off+c.dqk], p.keys[b][:visible], c.dv, p.scale)
				if p.sink != nil && !math.IsInf(l, 1) {
					f := 1 / (1 + math.Exp(float64(p.sink[h])-l))
					for j := range o {
						o[j] *= f
					}
				}
				out = append(out, o...)
				lse[(b*c.hq+h)*c.sq+i] = l
			}
		}
	}
	return out, lse
}

func outF32(a *mlart.DecodeArgs) []float32 {
	if a.OutDType == mlart.DTypeBF16 {
		return mlart.FromBF16(a.Out16)
	}
	return a.Out
}

var denseCases = []denseCase{
	{name: "small_f32_causal", dqk: 64, dv: 48, hq: 5, sq: 2, bs: 3, seqlens: []int{0, 1, 7, 10}, causal: true,
		kvFormat: mlart.KvFormatF32, qType: mlart.DTypeF32, outType: mlart.DTypeF32, tol: 1e-5},
	{name: "mla576_f32", dqk: 576, dv: 512, hq: 20, sq: 1, bs: 17, seqlens: []int{0, 1, 33, 50, 17},
		kvFormat: mlart.KvFormatF32, qType: mlart.DTypeF32, outType: mlart.DTypeF32, tol: 1e-5},
	{name: "small_bf16", dqk: 64, dv: 48, hq: 7, sq: 1, bs: 5, seqlens: []int{1, 0, 12},
		kvFormat: mlart.KvFormatBF16, qType: mlart.DTypeBF16, outType: mlart.DTypeBF16, tol: 4e-3},
	{name: "mla576_bf16", dqk: 576, dv: 512, hq: 20, sq: 2, bs: 17, seqlens: []int{0, 1, 40, 23},
		kvFormat: mlart.KvFormatBF16, qType: mlart.DTypeBF16, outType: mlart.DTypeBF16, tol: 4e-3},
	{name: "small_f32_scale_sink", dqk: 64, dv: 64, hq: 17, sq: 3, bs: 4, seqlens: []int{5, 2, 0}, causal: true,
		kvFormat: mlart.KvFormatF32, qType: mlart.DTypeF32, outType: mlart.DTypeF32, tol: 1e-5, scale: 0.3, sink: true},
	{name: "mla576_bf16cache_f32io", dqk: 576, dv: 512, hq: 3, sq: 1, bs: 6, seqlens: []int{9, 1, 0},
		kvFormat: mlart.KvFormatBF16, qType: mlart.DTypeF32, outType: mlart.DTypeF32, tol: 1e-5},
}

// ---------------------------------------------------------------------------
// Tests.

func TestVersionAndStatus(t *testing.T) {
	want := fmt.Sprintf("%d.%d.", mlart.HeaderVersionMajor, mlart.HeaderVersionMinor)
	if v := mlart.Version(); !strings.HasPrefix(v, want) {
		t.Errorf("Version() = %q, want %sx (the header's)", v, want)
	}
	if got := mlart.LibraryABIVersion(); got != mlart.ABIVersion {
		t.Errorf("LibraryABIVersion() = %d, header ABIVersion = %d", got, mlart.ABIVersion)
	}
	if s := mlart.StatusInvalidArgument.String(); s != "invalid argument" {
		t.Errorf("StatusInvalidArgument.String() = %q", s)
	}
	if s := mlart.StatusNotFound.String(); s != "not found" {
		t.Errorf("StatusNotFound.String() = %q", s)
	}
	if s := mlart.Status(999).String(); s != "unknown status" {
		t.Errorf("Status(999).String() = %q", s)
	}
	n, err := mlart.DeviceCount()
	if err != nil {
		t.Fatalf("DeviceCount: %v", err)
	}
	t.Logf("version %s, %d CUDA devices", mlart.Version(), n)
	if _, err := mlart.DeviceInfo(n); !errors.Is(err, mlart.ErrNotFound) && !errors.Is(err, mlart.ErrUnsupported) {
		t.Errorf("DeviceInfo(%d) = %v, want not found / unsupported", n, err)
	}
	for _, f := range []float32{0, 1, -2.5, 3.14159, 1e-30, float32(math.Inf(1)), 65504, 1.00390625, 1.01171875} {
		if got, want := mlart.BF16(f), bf16Bits(f); got != want {
			t.Errorf("BF16(%v) = %#x, want %#x", f, got, want)
		}
	}
}

func TestEngineInfo(t *testing.T) {
	e := newEngine(t)
	info, err := e.Info()
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if info.Backend != mlart.BackendCPU {
		t.Errorf("Backend = %v, want cpu", info.Backend)
	}
	if info.Reason == "" {
		t.Error("Reason is empty")
	}
	if info.NumThreads != 2 {
		t.Errorf("NumThreads = %d, want 2", info.NumThreads)
	}
	if info.ThreadPlacement == "" {
		t.Error("ThreadPlacement is empty")
	}
	t.Logf("engine: %+v", info)
}

func TestEngineThreadAffinity(t *testing.T) {
	e, err := mlart.NewEngine(mlart.EngineOptions{Backend: mlart.BackendCPU, NumThreads: 2, ThreadAffinity: mlart.AffinityNone})
	if err != nil {
		t.Fatalf("NewEngine: %v", err)
	}
	defer e.Close()
	info, err := e.Info()
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if want := "not pinned (affinity NONE)"; info.ThreadPlacement != want {
		t.Errorf("ThreadPlacement = %q, want %q", info.ThreadPlacement, want)
	}
	_, err = mlart.NewEngine(mlart.EngineOptions{ThreadAffinity: 9})
	var me *mlart.Error
	if !errors.As(err, &me) || me.Status != mlart.StatusInvalidArgument || !strings.Contains(me.Message, "thread_affinity = 9") {
		t.Errorf("ThreadAffinity 9: err = %v, want INVALID_ARGUMENT naming thread_affinity = 9", err)
	}
	if got := mlart.AffinityPin.String(); got != "pin" {
		t.Errorf("AffinityPin.String() = %q", got)
	}
}

func TestDecodePaged(t *testing.T) {
	e := newEngine(t)
	for i, c := range denseCases {
		t.Run(c.name, func(t *testing.T) {
			p := buildDense(t, c, int64(100+i))
			if err := e.DecodePaged(&p.args); err != nil {
				t.Fatalf("DecodePaged: %v", err)
			}
			wantOut, wantLSE := p.reference()
			got := outF32(&p.args)
			for i, v := range got {
				if math.IsNaN(float64(v)) {
					t.Fatalf("out[%d] is NaN (not written, or NaN slot read)", i)
				}
			}
			if d := relL2(got, wantOut); !(d <= c.tol) {
				t.Fatalf("out rel-L2 = %.3g > %.1g", d, c.tol)
			} else {
				t.Logf("out rel-L2 = %.3g", d)
			}
			checkLSE(t, p.args.LSE, wantLSE)
		})
	}
}

func TestDecodeSparse(t *testing.T) {
	e := newEngine(t)
	r := rand.New(rand.NewSource(7))
	const dqk, dv, hq, sq, bs, nblocks, topk, batch = 64, 48, 3, 2, 4, 6, 5, 2
	src := randF32(r, nblocks*bs*dqk, 1)
	kv := make([]byte, nblocks*bs*dqk*4)
	for i, v := range src {
		binary.LittleEndian.PutUint32(kv[4*i:], math.Float32bits(v))
	}
	indices := []int32{
		0, 23, -1, 5, 5, // b0 i0: a duplicate counts twice
		7, 1, 2, 3, 4, //   b0 i1
		-1, -1, -1, 1 << 30, 1 << 30, // b1 i0: no key (the tail past topk_length is not read)
		9, 10, 11, 12, 13, // b1 i1: only the first 3
	}
	topkLen := []int32{5, 3}
	q := randF32(r, batch*sq*hq*dqk, 2)
	a := mlart.DecodeArgs{
		Batch: batch, SQ: sq, HQ: hq, DQK: dqk, DV: dv,
		Q: q, KvFormat: mlart.KvFormatF32, KV: kv, NumBlocks: nblocks, BlockSize: bs,
		Indices: indices, TopK: topk, TopKLength: topkLen,
		Out: nanF32s(batch * sq * hq * dv), LSE: nanF32s(batch * hq * sq),
	}
	if err := e.DecodePaged(&a); err != nil {
		t.Fatalf("DecodePaged (sparse): %v", err)
	}
	var want []float64
	wantLSE := make([]float64, batch*hq*sq)
	for b := 0; b < batch; b++ {
		for i := 0; i < sq; i++ {
			var keys [][]float32
			for _, x := range indices[(b*sq+i)*topk : (b*sq+i)*topk+int(topkLen[b])] {
				if x >= 0 {
					keys = append(keys, src[int(x)*dqk:int(x+1)*dqk])
				}
			}
			for h := 0; h < hq; h++ {
				off := ((b*sq+i)*hq + h) * dqk
				o, l := attend(q[off:off+dqk], keys, dv, 1/math.Sqrt(dqk))
				want = append(want, o...)
				wantLSE[(b*hq+h)*sq+i] = l
			}
		}
	}
	if d := relL2(a.Out, want); !(d <= 1e-5) {
		t.Fatalf("sparse out rel-L2 = %.3g", d)
	}
	checkLSE(t, a.LSE, wantLSE)
}

func TestKvPool(t *testing.T) {
	e := newEngine(t)
	r := rand.New(rand.NewSource(11))
	const dqk, dv, hq, bs = 64, 48, 5, 5
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{KvFormat: mlart.KvFormatF32, DQK: dqk, NumLayers: 2, BlockSize: bs, NumBlocks: 16})
	if err != nil {
		t.Fatalf("NewKvPool: %v", err)
	}
	defer pool.Close()
	if o := pool.Options(); o.DQK != dqk || o.NumLayers != 2 || o.BlockSize != bs || o.NumBlocks != 16 || o.IndexHeadDim != 0 {
		t.Fatalf("Options() = %+v", o)
	}

	length := func(id uint64, layer int) int {
		t.Helper()
		n, err := pool.SeqLength(id, layer)
		if err != nil {
			t.Fatalf("SeqLength(%d, %d): %v", id, layer, err)
		}
		return n
	}
	// decode checks a pool decode of seqs (layer 0) against the reference
	// over keys[i] for seqs[i].
	decode := func(seqs []uint64, keys [][]float32) {
		t.Helper()
		q := randF32(r, len(seqs)*hq*dqk, 2)
		a := mlart.PoolDecodeArgs{Layer: 0, SeqIDs: seqs, HQ: hq, DV: dv, Q: q,
			Out: nanF32s(len(seqs) * hq * dv), LSE: nanF32s(len(seqs) * hq)}
		if err := pool.Decode(&a); err != nil {
			t.Fatalf("pool Decode: %v", err)
		}
		var want []float64
		wantLSE := make([]float64, len(seqs)*hq)
		for b := range seqs {
			var rows [][]float32
			for i := 0; i+dqk <= len(keys[b]); i += dqk {
				rows = append(rows, keys[b][i:i+dqk])
			}
			for h := 0; h < hq; h++ {
				off := (b*hq + h) * dqk
				o, l := attend(q[off:off+dqk], rows, dv, 1/math.Sqrt(dqk))
				want = append(want, o...)
				wantLSE[b*hq+h] = l
			}
		}
		if d := relL2(a.Out, want); !(d <= 1e-5) {
			t.Fatalf("pool decode %v: rel-L2 = %.3g", seqs, d)
		}
		checkLSE(t, a.LSE, wantLSE)
	}

	if err := pool.CreateSeq(1); err != nil {
		t.Fatal(err)
	}
	rows1 := randF32(r, 7*dqk, 1)
	if err := pool.Append(1, 0, rows1); err != nil {
		t.Fatalf("Append: %v", err)
	}
	if err := pool.Append(1, 1, randF32(r, 3*dqk, 1)); err != nil {
		t.Fatalf("Append layer 1: %v", err)
	}
	if err := pool.Append(1, 0, nil); err != nil { // zero rows: a no-op
		t.Fatalf("Append(nil): %v", err)
	}
	if n0, n1 := length(1, 0), length(1, 1); n0 != 7 || n1 != 3 {
		t.Fatalf("lengths = %d, %d; want 7, 3", n0, n1)
	}
	st, err := pool.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.BlocksTotal != 16 || st.Sequences != 1 || st.BlocksUsed != 2 || st.BlocksFree != 14 ||
		st.BytesPerBlock != 2*bs*dqk*4 || st.BytesTotal != 16*st.BytesPerBlock {
		t.Fatalf("Stats = %+v", st)
	}

	// Fork shares the prefix; appends are copy-on-write.
	if err := pool.ForkSeq(1, 2); err != nil {
		t.Fatalf("ForkSeq: %v", err)
	}
	extra := randF32(r, 2*dqk, 1)
	if err := pool.Append(2, 0, extra); err != nil {
		t.Fatal(err)
	}
	if n1, n2 := length(1, 0), length(2, 0); n1 != 7 || n2 != 9 {
		t.Fatalf("after fork+append: lengths %d, %d; want 7, 9", n1, n2)
	}
	rows2 := append(append([]float32{}, rows1...), extra...)
	decode([]uint64{1, 2, 1}, [][]float32{rows1, rows2, rows1})

	// Truncate (rollback) every layer.
	if err := pool.TruncateSeq(2, 4); err != nil {
		t.Fatalf("TruncateSeq: %v", err)
	}
	if n0, n1 := length(2, 0), length(2, 1); n0 != 4 || n1 != 3 {
		t.Fatalf("after truncate: lengths %d, %d; want 4, 3", n0, n1)
	}
	decode([]uint64{2, 1}, [][]float32{rows2[:4*dqk], rows1})

	// A sparse pool decode over logical positions of sequence 1.
	{
		q := randF32(r, hq*dqk, 2)
		a := mlart.PoolDecodeArgs{SeqIDs: []uint64{1}, HQ: hq, DV: dv, Q: q, Out: nanF32s(hq * dv),
			Indices: []int32{6, 0, -1, 3}, TopK: 4}
		if err := pool.Decode(&a); err != nil {
			t.Fatalf("sparse pool decode: %v", err)
		}
		keys := [][]float32{rows1[6*dqk : 7*dqk], rows1[0:dqk], rows1[3*dqk : 4*dqk]}
		var want []float64
		for h := 0; h < hq; h++ {
			o, _ := attend(q[h*dqk:(h+1)*dqk], keys, dv, 1/math.Sqrt(dqk))
			want = append(want, o...)
		}
		if d := relL2(a.Out, want); !(d <= 1e-5) {
			t.Fatalf("sparse pool decode rel-L2 = %.3g", d)
		}
	}

	// Library errors keep their status.
	err = pool.CreateSeq(1)
	if me := errStatus(t, err); me.Status != mlart.StatusInvalidArgument || !strings.Contains(me.Message, "already exists") {
		t.Fatalf("duplicate CreateSeq: %v", err)
	}
	if !errors.Is(err, mlart.ErrInvalidArgument) || errors.Is(err, mlart.ErrNotFound) {
		t.Fatalf("errors.Is on %v is wrong", err)
	}
	if err := pool.FreeSeq(99); !errors.Is(err, mlart.ErrNotFound) {
		t.Fatalf("FreeSeq(99) = %v, want not found", err)
	}
	if _, err := pool.SeqLength(99, 0); !errors.Is(err, mlart.ErrNotFound) {
		t.Fatalf("SeqLength(99) = %v, want not found", err)
	}
	if err := pool.Append(1, 0, make([]float32, dqk+1)); !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "multiple of") {
		t.Fatalf("Append of a partial row = %v", err)
	}

	// Exhaustion changes nothing; FreeSeq returns blocks.
	if err := pool.CreateSeq(3); err != nil {
		t.Fatal(err)
	}
	before, _ := pool.Stats()
	big := randF32(r, (int(before.BlocksFree)*bs+1)*dqk, 1)
	if err := pool.Append(3, 0, big); !errors.Is(err, mlart.ErrPoolExhausted) {
		t.Fatalf("oversized Append = %v, want pool exhausted", err)
	}
	if n := length(3, 0); n != 0 {
		t.Fatalf("length after failed append = %d", n)
	}
	if after, _ := pool.Stats(); after != before {
		t.Fatalf("stats changed by a failed append: %+v -> %+v", before, after)
	}
	for _, id := range []uint64{1, 2, 3} {
		if err := pool.FreeSeq(id); err != nil {
			t.Fatal(err)
		}
	}
	if st, _ := pool.Stats(); st.BlocksUsed != 0 || st.BlocksFree != 16 || st.Sequences != 0 {
		t.Fatalf("Stats after freeing all = %+v", st)
	}
}

func TestKvPoolBF16(t *testing.T) {
	e := newEngine(t)
	r := rand.New(rand.NewSource(12))
	const dqk, dv, hq = 576, 512, 20
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{BlockSize: 7, NumBlocks: 8}) // defaults: BF16, 576, 1 layer
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if o := pool.Options(); o.KvFormat != mlart.KvFormatBF16 || o.DQK != 576 || o.NumLayers != 1 || o.IndexHeadDim != 0 {
		t.Fatalf("defaults: %+v", o)
	}
	rows := randF32(r, 11*dqk, 1)
	if err := pool.CreateSeq(5); err != nil {
		t.Fatal(err)
	}
	if err := pool.AppendBF16(5, 0, mlart.ToBF16(rows)); err != nil {
		t.Fatal(err)
	}
	q := randF32(r, hq*dqk, 2)
	q16 := make([]uint16, len(q))
	for i := range q {
		q16[i] = bf16Bits(q[i])
		q[i] = bf16Val(q16[i])
	}
	a := mlart.PoolDecodeArgs{SeqIDs: []uint64{5}, HQ: hq, DV: dv, QDType: mlart.DTypeBF16, Q16: q16,
		OutDType: mlart.DTypeBF16, Out16: nanU16s(hq * dv)}
	if err := pool.Decode(&a); err != nil {
		t.Fatal(err)
	}
	keys := make([][]float32, 11)
	for i := range keys {
		keys[i] = make([]float32, dqk)
		for j := range keys[i] {
			keys[i][j] = roundBF16(rows[i*dqk+j])
		}
	}
	var want []float64
	for h := 0; h < hq; h++ {
		o, _ := attend(q[h*dqk:(h+1)*dqk], keys, dv, 1/math.Sqrt(dqk))
		want = append(want, o...)
	}
	if d := relL2(mlart.FromBF16(a.Out16), want); !(d <= 4e-3) {
		t.Fatalf("bf16 pool decode rel-L2 = %.3g", d)
	} else {
		t.Logf("bf16 pool decode rel-L2 = %.3g", d)
	}
}

// A pool with indexer keys (DeepSeek-V3.2): the option round-trips, the
// keys take room in every block, and a plain Append is refused.
func TestKvPoolIndexHeadDim(t *testing.T) {
	e := newEngine(t)
	opts := mlart.KvPoolOptions{KvFormat: mlart.KvFormatF32, DQK: 80, NumLayers: 1, BlockSize: 4, NumBlocks: 8}
	plain, err := mlart.NewKvPool(e, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	opts.IndexHeadDim = 32
	pool, err := mlart.NewKvPool(e, opts)
	if err != nil {
		t.Fatalf("NewKvPool(IndexHeadDim 32): %v", err)
	}
	defer pool.Close()
	if o := pool.Options(); o != opts {
		t.Fatalf("Options() = %+v, want %+v", o, opts)
	}
	ps, err := plain.Stats()
	if err != nil {
		t.Fatal(err)
	}
	is, err := pool.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if is.BytesPerBlock <= ps.BytesPerBlock {
		t.Fatalf("indexer keys take no room: %d bytes per block, %d without", is.BytesPerBlock, ps.BytesPerBlock)
	}
	if err := pool.CreateSeq(1); err != nil {
		t.Fatal(err)
	}
	err = pool.Append(1, 0, make([]float32, 80))
	if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "index_head_dim") {
		t.Fatalf("Append to a pool with indexer keys: %v", err)
	}
	if n, _ := pool.SeqLength(1, 0); n != 0 {
		t.Fatalf("refused Append changed the length to %d", n)
	}
	opts.IndexHeadDim = -1
	if _, err := mlart.NewKvPool(e, opts); !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "index_head_dim") {
		t.Fatalf("IndexHeadDim -1: %v", err)
	}
}

func TestErrors(t *testing.T) {
	e := newEngine(t)
	c := denseCases[0]

	// A short Out is caught in Go: the block table also holds an id the
	// library would reject, so reaching C would give a block_table error.
	p := buildDense(t, c, 1)
	p.args.BlockTable[p.args.BlockTableStride*2] = 1000
	p.args.Out = p.args.Out[:len(p.args.Out)-1]
	err := e.DecodePaged(&p.args)
	me := errStatus(t, err)
	if me.Status != mlart.StatusInvalidArgument || !strings.Contains(me.Message, "DecodeArgs.Out ") ||
		strings.Contains(me.Message, "block_table") {
		t.Fatalf("short Out: %v", err)
	}
	t.Logf("short Out: %v", err)
	// ... while with the full Out the library reports the block id.
	p.args.Out = nanF32s(len(p.args.Out) + 1)
	if err := e.DecodePaged(&p.args); !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "block_table") {
		t.Fatalf("bad block id: %v", err)
	}

	short := func(name string, mutate func(a *mlart.DecodeArgs)) {
		t.Helper()
		p := buildDense(t, c, 2)
		mutate(&p.args)
		err := e.DecodePaged(&p.args)
		if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), name+" ") {
			t.Fatalf("short %s: %v", name, err)
		}
	}
	short("DecodeArgs.Q", func(a *mlart.DecodeArgs) { a.Q = a.Q[:10] })
	short("DecodeArgs.Q", func(a *mlart.DecodeArgs) { a.Q = nil })
	short("DecodeArgs.Q16", func(a *mlart.DecodeArgs) { a.QDType = mlart.DTypeBF16; a.Q16 = make([]uint16, 3) })
	short("DecodeArgs.KV", func(a *mlart.DecodeArgs) { a.KV = a.KV[:len(a.KV)-1] })
	short("DecodeArgs.BlockTable", func(a *mlart.DecodeArgs) { a.BlockTable = a.BlockTable[:1] })
	short("DecodeArgs.Seqlens", func(a *mlart.DecodeArgs) { a.Seqlens = a.Seqlens[:2] })
	short("DecodeArgs.LSE", func(a *mlart.DecodeArgs) { a.LSE = a.LSE[:1] })
	short("DecodeArgs.Out16", func(a *mlart.DecodeArgs) { a.OutDType = mlart.DTypeBF16 })

	// A bad shape is the library's error, naming the field.
	p = buildDense(t, c, 3)
	p.args.HQ = 0
	err = e.DecodePaged(&p.args)
	me = errStatus(t, err)
	if me.Status != mlart.StatusInvalidArgument || !strings.Contains(me.Message, "h_q") {
		t.Fatalf("h_q = 0: %v", err)
	}
	if !errors.Is(err, mlart.ErrInvalidArgument) || errors.Is(err, mlart.ErrNullPointer) {
		t.Fatalf("errors.Is(%v) wrong", err)
	}
	t.Logf("h_q = 0: %v", err)
	if got := me.Error(); !strings.HasPrefix(got, "mlart: invalid argument: ") {
		t.Errorf("Error() = %q", got)
	}
	p = buildDense(t, c, 3)
	p.args.DV = p.args.DQK + 1
	if err := e.DecodePaged(&p.args); !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "d_v") {
		t.Fatalf("d_v > d_qk: %v", err)
	}
	if err := e.DecodePaged(nil); !errors.Is(err, mlart.ErrInvalidArgument) {
		t.Fatalf("nil args: %v", err)
	}

	// Pool errors.
	if _, err := mlart.NewKvPool(e, mlart.KvPoolOptions{}); !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "num_blocks") {
		t.Fatalf("pool without NumBlocks: %v", err)
	}
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{DQK: 64, BlockSize: 4, NumBlocks: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if err := pool.CreateSeq(1); err != nil {
		t.Fatal(err)
	}
	pa := mlart.PoolDecodeArgs{SeqIDs: []uint64{1}, HQ: 2, DV: 32, Q: make([]float32, 64), Out: make([]float32, 64)}
	if err := pool.Decode(&pa); !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "PoolDecodeArgs.Q ") {
		t.Fatalf("short pool Q: %v", err)
	}
	pa.Q = make([]float32, 128)
	if err := pool.Decode(&pa); err != nil {
		t.Fatalf("empty sequence decode: %v", err)
	}
	for i, v := range pa.Out {
		if v != 0 {
			t.Fatalf("out[%d] = %v for an empty sequence, want 0", i, v)
		}
	}
	pa.SeqIDs = []uint64{42}
	if err := pool.Decode(&pa); !errors.Is(err, mlart.ErrNotFound) {
		t.Fatalf("decode of unknown seq: %v", err)
	}
}

func TestClosed(t *testing.T) {
	e, err := mlart.NewEngine(mlart.EngineOptions{Backend: mlart.BackendCPU, NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{DQK: 64, BlockSize: 4, NumBlocks: 4, KvFormat: mlart.KvFormatF32})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil { // twice is fine
		t.Fatal(err)
	}
	if _, err := e.Info(); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("Info on closed engine: %v", err)
	}
	p := buildDense(t, denseCases[0], 4)
	if err := e.DecodePaged(&p.args); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("DecodePaged on closed engine: %v", err)
	}
	if _, err := mlart.NewKvPool(e, mlart.KvPoolOptions{NumBlocks: 1}); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("NewKvPool on closed engine: %v", err)
	}
	if _, err := mlart.LoadModel(e, "/nonexistent", mlart.ModelOptions{}); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("LoadModel on closed engine: %v", err)
	}
	var nilEngine *mlart.Engine
	if _, err := nilEngine.Info(); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("nil engine: %v", err)
	}

	// The pool keeps the library engine alive.
	if err := pool.CreateSeq(1); err != nil {
		t.Fatalf("pool after engine Close: %v", err)
	}
	if err := pool.Append(1, 0, randF32(rand.New(rand.NewSource(1)), 3*64, 1)); err != nil {
		t.Fatal(err)
	}
	a := mlart.PoolDecodeArgs{SeqIDs: []uint64{1}, HQ: 1, DV: 64, Q: make([]float32, 64), Out: make([]float32, 64)}
	if err := pool.Decode(&a); err != nil {
		t.Fatalf("pool decode after engine Close: %v", err)
	}
	pool.Close()
	pool.Close()
	if err := pool.CreateSeq(2); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("closed pool: %v", err)
	}
	if _, err := pool.Stats(); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("closed pool Stats: %v", err)
	}
	if err := pool.Decode(&a); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("closed pool Decode: %v", err)
	}
}

// Close racing with calls: every call either succeeds or sees ErrClosed.
func TestCloseWhileInUse(t *testing.T) {
	e, err := mlart.NewEngine(mlart.EngineOptions{Backend: mlart.BackendCPU, NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	started := make(chan struct{}, 4)
	for g := 0; g < 4; g++ {
		p := buildDense(t, denseCases[0], int64(20+g))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				if i == 2 {
					started <- struct{}{}
				}
				err := e.DecodePaged(&p.args)
				if errors.Is(err, mlart.ErrClosed) {
					return
				}
				if err != nil {
					t.Errorf("DecodePaged: %v", err)
					return
				}
			}
		}()
	}
	for g := 0; g < 4; g++ {
		<-started
	}
	e.Close()
	wg.Wait()
}

func modelDir(t *testing.T) string {
	dir := os.Getenv("MLART_TEST_MODEL_DIR")
	if dir == "" {
		dir = "/tmp/tiny-model"
	}
	if _, err := os.Stat(dir + "/config.json"); err != nil {
		t.Skipf("no test checkpoint at %s (set MLART_TEST_MODEL_DIR): %v", dir, err)
	}
	return dir
}

func TestModel(t *testing.T) {
	dir := modelDir(t)
	e := newEngine(t)
	var fractions []float32
	var stages []string
	m, err := mlart.LoadModel(e, dir, mlart.ModelOptions{Progress: func(f float32, stage string) bool {
		fractions = append(fractions, f)
		stages = append(stages, stage)
		return true
	}})
	if err != nil {
		t.Fatalf("LoadModel: %v", err)
	}
	defer m.Close()
	if len(fractions) == 0 {
		t.Fatal("progress never called")
	}
	for i, f := range fractions {
		if f < 0 || f > 1 || (i > 0 && f < fractions[i-1]) {
			t.Fatalf("progress fractions not monotone in [0,1]: %v", fractions)
		}
	}
	t.Logf("progress: %d calls, last %v %q", len(fractions), fractions[len(fractions)-1], stages[len(stages)-1])

	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("model: %+v yarn %+v", info, info.YaRN)
	if info.NumLayers != 2 || info.LoadedLayers != 2 || info.HiddenSize != 256 || info.NumHeads != 4 ||
		info.KvLoraRank != 64 || info.QKRopeHeadDim != 16 || info.DQK != 80 ||
		info.IndexNHeads != 0 || info.IndexHeadDim != 0 || info.IndexTopK != 0 {
		t.Fatalf("Info = %+v", info)
	}

	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{DQK: info.DQK, NumLayers: info.LoadedLayers, BlockSize: 4, NumBlocks: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	r := rand.New(rand.NewSource(5))
	const ntok = 3
	x := randF32(r, ntok*info.HiddenSize, 1)
	forward := func(id uint64, x []float32) []float32 {
		t.Helper()
		if err := pool.CreateSeq(id); err != nil {
			t.Fatal(err)
		}
		out := nanF32s(len(x))
		err := m.Forward(pool, &mlart.ForwardArgs{Layer: 0, SeqIDs: []uint64{id}, NTokens: []int32{ntok}, X: x, Out: out})
		if err != nil {
			t.Fatalf("Forward: %v", err)
		}
		if n, _ := pool.SeqLength(id, 0); n != ntok {
			t.Fatalf("seq length after Forward = %d, want %d", n, ntok)
		}
		return out
	}
	out1 := forward(1, x)
	var norm float64
	for i, v := range out1 {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("out[%d] = %v", i, v)
		}
		norm += float64(v) * float64(v)
	}
	if norm == 0 {
		t.Fatal("Forward output is all zeros")
	}
	out2 := forward(2, x) // same input, fresh sequence: same output
	if d := relL2(out2, toF64(out1)); !(d <= 1e-6) {
		t.Fatalf("same input gave different output: rel-L2 %.3g", d)
	}
	x3 := append([]float32{}, x...)
	x3[len(x3)-1] += 0.5
	out3 := forward(3, x3)
	if d := relL2(out3, toF64(out1)); !(d >= 1e-6) {
		t.Fatalf("changing the input did not change the output (rel-L2 %.3g)", d)
	}

	// Bf16 activations reach the library: close to the precise output,
	// not equal to it.
	mb, err := mlart.LoadModel(e, dir, mlart.ModelOptions{Activations: mlart.ActivationsBF16})
	if err != nil {
		t.Fatalf("LoadModel(ActivationsBF16): %v", err)
	}
	defer mb.Close()
	if err := pool.CreateSeq(4); err != nil {
		t.Fatal(err)
	}
	out4 := nanF32s(len(x))
	if err := mb.Forward(pool, &mlart.ForwardArgs{Layer: 0, SeqIDs: []uint64{4}, NTokens: []int32{ntok}, X: x, Out: out4}); err != nil {
		t.Fatalf("Forward (bf16 activations): %v", err)
	}
	if mi, err := mb.Info(); err != nil || mi.Activations != mlart.ActivationsBF16 || mi.ProjectionISA != info.ProjectionISA {
		t.Fatalf("Info of the bf16-activation model: %+v, %v", mi, err)
	}
	if d := relL2(out4, toF64(out1)); !(d > 1e-5 && d < 1e-2) {
		t.Fatalf("bf16 activations vs precise: rel-L2 %.3g, want in (1e-5, 1e-2)", d)
	} else {
		t.Logf("bf16 activations vs precise: rel-L2 %.3g", d)
	}
	if _, err := mlart.LoadModel(e, dir, mlart.ModelOptions{Activations: 9}); !errors.Is(err, mlart.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "activations = 9") {
		t.Fatalf("Activations 9: %v", err)
	}
	if got := mlart.ActivationsBF16.String(); got != "bf16" {
		t.Fatalf("ActivationsBF16.String() = %q", got)
	}

	// Go-side and library errors.
	err = m.Forward(pool, &mlart.ForwardArgs{Layer: 0, SeqIDs: []uint64{1}, NTokens: []int32{2}, X: x, Out: make([]float32, 10)})
	if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "ForwardArgs.Out ") {
		t.Fatalf("short Out: %v", err)
	}
	err = m.Forward(pool, &mlart.ForwardArgs{Layer: 0, SeqIDs: []uint64{77}, NTokens: []int32{1}, X: x[:256], Out: make([]float32, 256)})
	if !errors.Is(err, mlart.ErrNotFound) {
		t.Fatalf("unknown sequence: %v", err)
	}
	err = m.Forward(pool, &mlart.ForwardArgs{Layer: 5, SeqIDs: []uint64{1}, NTokens: []int32{1}, X: x[:256], Out: make([]float32, 256)})
	if err == nil {
		t.Fatal("layer 5 accepted")
	}
	t.Logf("layer 5: %v", err)
	// No indexer: IndexOut and a pool with indexer keys are the library's errors.
	err = m.Forward(pool, &mlart.ForwardArgs{Layer: 0, SeqIDs: []uint64{1}, NTokens: []int32{1}, X: x[:256], Out: make([]float32, 256),
		IndexOut: make([]int32, 8)})
	if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "index_out") {
		t.Fatalf("IndexOut without an indexer: %v", err)
	}
	ipool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{DQK: info.DQK, NumLayers: info.LoadedLayers, BlockSize: 4, NumBlocks: 4, IndexHeadDim: 32})
	if err != nil {
		t.Fatal(err)
	}
	defer ipool.Close()
	if err := ipool.CreateSeq(1); err != nil {
		t.Fatal(err)
	}
	err = m.Forward(ipool, &mlart.ForwardArgs{Layer: 0, SeqIDs: []uint64{1}, NTokens: []int32{1}, X: x[:256], Out: make([]float32, 256)})
	if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "index_head_dim") {
		t.Fatalf("pool with indexer keys, model without an indexer: %v", err)
	}
	if n, _ := pool.SeqLength(1, 0); n != ntok {
		t.Fatalf("failed forwards changed the pool: length %d, want %d", n, ntok)
	}

	m.Close()
	m.Close()
	if _, err := m.Info(); !errors.Is(err, mlart.ErrClosed) {
		t.Fatalf("closed model: %v", err)
	}
}

// GPUProjections reaches the library: a CPU engine accepts every placement,
// ignores it (the projections stay on the CPU: ProjectionsOnGPU false, the
// default model's output) and a value outside the constants is rejected.
func TestModelGPUProjections(t *testing.T) {
	dir := modelDir(t)
	e := newEngine(t)
	m, err := mlart.LoadModel(e, dir, mlart.ModelOptions{})
	if err != nil {
		t.Fatalf("LoadModel: %v", err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.ProjectionsOnGPU {
		t.Fatalf("default model on a CPU engine: ProjectionsOnGPU = true")
	}
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{DQK: info.DQK, NumLayers: info.LoadedLayers, BlockSize: 4, NumBlocks: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	r := rand.New(rand.NewSource(11))
	const ntok = 2
	x := randF32(r, ntok*info.HiddenSize, 1)
	id := uint64(0)
	forward := func(m *mlart.Model) []float32 {
		t.Helper()
		id++
		if err := pool.CreateSeq(id); err != nil {
			t.Fatal(err)
		}
		out := nanF32s(len(x))
		if err := m.Forward(pool, &mlart.ForwardArgs{Layer: 1, SeqIDs: []uint64{id}, NTokens: []int32{ntok}, X: x, Out: out}); err != nil {
			t.Fatalf("Forward: %v", err)
		}
		return out
	}
	want := toF64(forward(m))

	for _, g := range []mlart.GPUProjections{mlart.GPUProjectionsOn, mlart.GPUProjectionsOff, mlart.GPUProjectionsDefault} {
		mg, err := mlart.LoadModel(e, dir, mlart.ModelOptions{GPUProjections: g})
		if err != nil {
			t.Fatalf("LoadModel(GPUProjections %v) on a CPU engine: %v", g, err)
		}
		gi, err := mg.Info()
		if err != nil {
			t.Fatal(err)
		}
		if gi.ProjectionsOnGPU {
			t.Fatalf("GPUProjections %v on a CPU engine: ProjectionsOnGPU = true", g)
		}
		if d := relL2(forward(mg), want); !(d <= 1e-6) {
			t.Fatalf("GPUProjections %v on a CPU engine changed the output: rel-L2 %.3g", g, d)
		}
		mg.Close()
	}

	// -1 is C's default, not a Go constant: rejected like any other.
	for _, g := range []mlart.GPUProjections{3, -1} {
		_, err = mlart.LoadModel(e, dir, mlart.ModelOptions{GPUProjections: g})
		me := errStatus(t, err)
		if me.Status != mlart.StatusInvalidArgument || !strings.Contains(me.Message, "gpu_projections") ||
			!strings.Contains(me.Message, fmt.Sprintf("GPUProjections = %d ", int32(g))) {
			t.Fatalf("GPUProjections %d: %v", int32(g), err)
		}
		t.Logf("GPUProjections %d: %v", int32(g), err)
	}
	for g, want := range map[mlart.GPUProjections]string{
		mlart.GPUProjectionsDefault: "default", mlart.GPUProjectionsOff: "off", mlart.GPUProjectionsOn: "on", 5: "GPUProjections(5)",
	} {
		if got := g.String(); got != want {
			t.Errorf("GPUProjections(%d).String() = %q, want %q", int32(g), got, want)
		}
	}
}

// KeptKeysBytes reaches the library and comes back in ModelInfo (0 as the
// default of 1 GiB, math.MaxUint64 as no limit); a long prompt keeping no
// keys between its passes gives the default's output.
func TestModelKeptKeysBytes(t *testing.T) {
	dir := modelDir(t)
	e := newEngine(t)
	const gib = 1 << 30
	for _, c := range []struct{ set, want uint64 }{
		{0, gib}, {1, 1}, {5 << 20, 5 << 20}, {3 * gib, 3 * gib}, {math.MaxUint64, math.MaxUint64},
	} {
		m, err := mlart.LoadModel(e, dir, mlart.ModelOptions{KeptKeysBytes: c.set})
		if err != nil {
			t.Fatalf("LoadModel(KeptKeysBytes %d): %v", c.set, err)
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
		if info.KeptKeysBytes != c.want {
			t.Errorf("KeptKeysBytes %d: Info().KeptKeysBytes = %d, want %d", c.set, info.KeptKeysBytes, c.want)
		}
	}

	// Past 512 new tokens a forward runs in passes; keeping no keys between
	// them up-projects the earlier positions again: the same attention.
	base, err := mlart.LoadModel(e, dir, mlart.ModelOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	none, err := mlart.LoadModel(e, dir, mlart.ModelOptions{KeptKeysBytes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer none.Close()
	info, err := base.Info()
	if err != nil {
		t.Fatal(err)
	}
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{DQK: info.DQK, NumLayers: info.LoadedLayers, BlockSize: 64, NumBlocks: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	const ntok = 600
	x := randF32(rand.New(rand.NewSource(43)), ntok*info.HiddenSize, 1)
	forward := func(m *mlart.Model, id uint64) []float32 {
		t.Helper()
		if err := pool.CreateSeq(id); err != nil {
			t.Fatal(err)
		}
		out := nanF32s(len(x))
		if err := m.Forward(pool, &mlart.ForwardArgs{Layer: 1, SeqIDs: []uint64{id}, NTokens: []int32{ntok}, X: x, Out: out}); err != nil {
			t.Fatalf("Forward: %v", err)
		}
		return out
	}
	want := toF64(forward(base, 1))
	if d := relL2(forward(none, 2), want); !(d <= 1e-6) {
		t.Fatalf("KeptKeysBytes 1 changed a %d-token prompt: rel-L2 %.3g", ntok, d)
	}
}

func modelV32Dir(t *testing.T) string {
	dir := os.Getenv("MLART_TEST_MODEL_V32_DIR")
	if dir == "" {
		dir = "/tmp/tiny-v32-model"
	}
	if _, err := os.Stat(dir + "/config.json"); err != nil {
		t.Skipf("no tiny-v3.2 test checkpoint at %s (set MLART_TEST_MODEL_V32_DIR; mlart gen-model --preset tiny-v3.2): %v", dir, err)
	}
	return dir
}

// checkSelection checks IndexOut rows of tokens at positions first..: a
// token at p < topk attends to 0..p then -1; later ones to topk ascending
// positions in [0, p].
func checkSelection(t *testing.T, sel []int32, first, topk int) {
	t.Helper()
	for r := 0; r < len(sel)/topk; r++ {
		p, row := first+r, sel[r*topk:(r+1)*topk]
		for j, v := range row {
			var ok bool
			switch {
			case p < topk && j <= p:
				ok = int(v) == j
			case p < topk:
				ok = v == -1
			default:
				ok = v >= 0 && int(v) <= p && (j == 0 || v > row[j-1])
			}
			if !ok {
				t.Fatalf("position %d attended to %v (top-%d)", p, row, topk)
			}
		}
	}
}

// DeepSeek-V3.2 (tiny-v3.2 checkpoint): the indexer fields, the pool's
// IndexHeadDim, and IndexOut over a 13-token prefill (past top-8, so the
// last 5 tokens attend sparsely) and a decode step.
func TestModelV32(t *testing.T) {
	dir := modelV32Dir(t)
	e := newEngine(t)
	m, err := mlart.LoadModel(e, dir, mlart.ModelOptions{})
	if err != nil {
		t.Fatalf("LoadModel: %v", err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.IndexNHeads != 4 || info.IndexHeadDim != 32 || info.IndexTopK != 8 || info.DQK != 80 || info.HiddenSize != 256 {
		t.Fatalf("Info = %+v", info)
	}
	topk, hid := info.IndexTopK, info.HiddenSize
	opts := mlart.KvPoolOptions{DQK: info.DQK, NumLayers: info.LoadedLayers, BlockSize: 4, NumBlocks: 16}
	plain, err := mlart.NewKvPool(e, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	opts.IndexHeadDim = info.IndexHeadDim
	pool, err := mlart.NewKvPool(e, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if o := pool.Options(); o.IndexHeadDim != 32 {
		t.Fatalf("Options() = %+v", o)
	}

	r := rand.New(rand.NewSource(32))
	const n = 13
	x := randF32(r, (n+1)*hid, 1)
	for _, p := range []*mlart.KvPool{plain, pool} {
		if err := p.CreateSeq(1); err != nil {
			t.Fatal(err)
		}
	}
	// A pool without indexer keys is the library's error, naming the option.
	err = m.Forward(plain, &mlart.ForwardArgs{SeqIDs: []uint64{1}, NTokens: []int32{n}, X: x[:n*hid], Out: make([]float32, n*hid)})
	if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "index_head_dim") {
		t.Fatalf("pool without IndexHeadDim: %v", err)
	}
	// A short IndexOut is caught in Go, before the library.
	err = m.Forward(pool, &mlart.ForwardArgs{SeqIDs: []uint64{1}, NTokens: []int32{n}, X: x[:n*hid], Out: make([]float32, n*hid),
		IndexOut: make([]int32, n*topk-1)})
	if !errors.Is(err, mlart.ErrInvalidArgument) || !strings.Contains(err.Error(), "ForwardArgs.IndexOut has 103 elements, need 104") {
		t.Fatalf("short IndexOut: %v", err)
	}
	if l, _ := pool.SeqLength(1, 0); l != 0 {
		t.Fatalf("failed forwards changed the pool: length %d", l)
	}

	// Prefill: 13 tokens.
	sel := make([]int32, n*topk)
	for i := range sel {
		sel[i] = 12345
	}
	out := nanF32s(n * hid)
	if err := m.Forward(pool, &mlart.ForwardArgs{SeqIDs: []uint64{1}, NTokens: []int32{n}, X: x[:n*hid], Out: out, IndexOut: sel}); err != nil {
		t.Fatalf("Forward (prefill): %v", err)
	}
	for i, v := range out {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("out[%d] = %v", i, v)
		}
	}
	checkSelection(t, sel, 0, topk)
	t.Logf("prefill selections of positions 8..12: %v", sel[8*topk:])

	// IndexOut only reports: the same tokens on a fresh sequence without it
	// give the same output.
	if err := pool.CreateSeq(2); err != nil {
		t.Fatal(err)
	}
	out2 := nanF32s(n * hid)
	if err := m.Forward(pool, &mlart.ForwardArgs{SeqIDs: []uint64{2}, NTokens: []int32{n}, X: x[:n*hid], Out: out2}); err != nil {
		t.Fatalf("Forward (no IndexOut): %v", err)
	}
	if d := relL2(out2, toF64(out)); !(d == 0) {
		t.Fatalf("IndexOut changed the output: rel-L2 %.3g", d)
	}

	// Decode step at position 13.
	step := make([]int32, topk)
	if err := m.Forward(pool, &mlart.ForwardArgs{SeqIDs: []uint64{1}, NTokens: []int32{1}, X: x[n*hid:], Out: nanF32s(hid), IndexOut: step}); err != nil {
		t.Fatalf("Forward (decode): %v", err)
	}
	checkSelection(t, step, n, topk)
	if l, _ := pool.SeqLength(1, 0); l != n+1 {
		t.Fatalf("length after decode = %d, want %d", l, n+1)
	}
	t.Logf("decode selection of position 13: %v", step)
}

func toF64(s []float32) []float64 {
	d := make([]float64, len(s))
	for i, v := range s {
		d[i] = float64(v)
	}
	return d
}

func TestModelLoadErrors(t *testing.T) {
	e := newEngine(t)
	_, err := mlart.LoadModel(e, "/nonexistent/mlart-model", mlart.ModelOptions{})
	me := errStatus(t, err)
	if me.Status != mlart.StatusIO || !strings.Contains(me.Message, "config.json") {
		t.Fatalf("missing dir: %v (status %d)", err, me.Status)
	}
	t.Logf("missing dir: %v", err)

	dir := modelDir(t)
	_, err = mlart.LoadModel(e, dir, mlart.ModelOptions{Progress: func(float32, string) bool { return false }})
	if !errors.Is(err, mlart.ErrCancelled) {
		t.Fatalf("cancelled load: %v", err)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Fatalf("recovered %v, want the callback's panic", r)
			}
		}()
		mlart.LoadModel(e, dir, mlart.ModelOptions{Progress: func(float32, string) bool { panic("boom") }})
		t.Fatal("LoadModel did not re-raise the callback's panic")
	}()
	if _, err := mlart.LoadModel(e, dir, mlart.ModelOptions{FirstLayer: 7}); err == nil {
		t.Fatal("FirstLayer 7 of 2 accepted")
	} else {
		t.Logf("FirstLayer 7: %v", err)
	}
}

// Several goroutines decoding on one engine give the sequential results.
func TestConcurrentDecode(t *testing.T) {
	e := newEngine(t)
	const G, iters = 6, 3
	probs := make([]*denseProblem, G)
	want := make([][]float32, G)
	for g := range probs {
		c := denseCases[g%2] // one F32 causal small, one 576
		probs[g] = buildDense(t, c, int64(50+g))
		if err := e.DecodePaged(&probs[g].args); err != nil {
			t.Fatal(err)
		}
		want[g] = append([]float32{}, probs[g].args.Out...)
	}
	var wg sync.WaitGroup
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			a := probs[g].args // shares Q, KV, tables; own Out and LSE
			for i := 0; i < iters; i++ {
				a.Out = nanF32s(len(want[g]))
				a.LSE = nanF32s(len(a.LSE))
				if err := e.DecodePaged(&a); err != nil {
					t.Errorf("goroutine %d: %v", g, err)
					return
				}
				for j := range a.Out {
					if math.Float32bits(a.Out[j]) != math.Float32bits(want[g][j]) {
						t.Errorf("goroutine %d iter %d: out[%d] = %v, sequential %v", g, i, j, a.Out[j], want[g][j])
						return
					}
				}
			}
		}(g)
	}
	wg.Wait()
}

// Decodes of one sequence stay exact while other goroutines mutate the pool.
func TestConcurrentPool(t *testing.T) {
	e := newEngine(t)
	r := rand.New(rand.NewSource(9))
	const dqk, dv, hq = 64, 64, 4
	pool, err := mlart.NewKvPool(e, mlart.KvPoolOptions{KvFormat: mlart.KvFormatF32, DQK: dqk, BlockSize: 8, NumBlocks: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if err := pool.CreateSeq(1); err != nil {
		t.Fatal(err)
	}
	if err := pool.Append(1, 0, randF32(r, 20*dqk, 1)); err != nil {
		t.Fatal(err)
	}
	q := randF32(r, hq*dqk, 2)
	base := mlart.PoolDecodeArgs{SeqIDs: []uint64{1}, HQ: hq, DV: dv, Q: q, Out: make([]float32, hq*dv)}
	if err := pool.Decode(&base); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() { // mutator: other sequences only
		defer wg.Done()
		rows := randF32(rand.New(rand.NewSource(3)), 5*dqk, 1)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			id := uint64(100 + i%3)
			if err := pool.CreateSeq(id); err != nil {
				t.Errorf("CreateSeq: %v", err)
				return
			}
			if err := pool.Append(id, 0, rows); err != nil {
				t.Errorf("Append: %v", err)
				return
			}
			if err := pool.ForkSeq(1, id+10); err != nil {
				t.Errorf("ForkSeq: %v", err)
				return
			}
			if err := pool.Append(id+10, 0, rows); err != nil {
				t.Errorf("Append to fork: %v", err)
				return
			}
			for _, s := range []uint64{id, id + 10} {
				if err := pool.FreeSeq(s); err != nil {
					t.Errorf("FreeSeq: %v", err)
					return
				}
			}
		}
	}()
	var dec sync.WaitGroup
	for g := 0; g < 4; g++ {
		dec.Add(1)
		go func(g int) {
			defer dec.Done()
			for i := 0; i < 30; i++ {
				a := base
				a.Out = make([]float32, len(base.Out))
				if err := pool.Decode(&a); err != nil {
					t.Errorf("Decode: %v", err)
					return
				}
				for j := range a.Out {
					if a.Out[j] != base.Out[j] {
						t.Errorf("goroutine %d: out[%d] = %v, want %v", g, j, a.Out[j], base.Out[j])
						return
					}
				}
				if _, err := pool.Stats(); err != nil {
					t.Errorf("Stats: %v", err)
					return
				}
			}
		}(g)
	}
	dec.Wait()
	close(stop)
	wg.Wait()
	if n, _ := pool.SeqLength(1, 0); n != 20 {
		t.Fatalf("seq 1 length = %d, want 20", n)
	}
}
