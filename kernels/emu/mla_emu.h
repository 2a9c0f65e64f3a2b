// A small CUDA emulator for mlart's kernels, so their logic is tested on
// machines without a GPU (tests/kernel_emulation.rs builds and runs
// kernels/emu/emu_main.cpp with the host C++ compiler).
//
// Each block runs as 32 * warps cooperative fibers (entered once with
// ucontext, then switched with _setjmp/_longjmp). __syncthreads
// parks a fiber until every live thread of the block arrives; warp
// collectives (shuffles, mma.sync, ldmatrix) exchange through per-warp slots
// between warp barriers, and compute exactly the fragment layouts the PTX ISA
// documents for mma.m16n8k16 and ldmatrix .trans (and wgmma, below).
// Asynchronous work completes as late as the hardware may complete it:
// cp.async copies land at the cp.async.wait_group that covers them, wgmma
// products at wgmma.wait_group, so reading either early gives stale data.
// Threads run in order between barriers, or last to first with
// MLA_EMU_ORDER=reverse, so a missing barrier shows in one order or the
// other. Blocks run one after another, so `static` stands in for __shared__.
// Built with -fsanitize=thread, every emulated thread is a ThreadSanitizer
// fiber and __syncthreads / __syncwarp are its only synchronization, so
// ThreadSanitizer reports any two accesses of a block's threads to the same
// memory, one a write, with no barrier between them: a data race on the GPU
// whatever order the threads run in.
//
// This checks indexing, masking, the schedule, softmax, the combine and the
// FP8 decoding: everything but the hardware itself and the assumption, shared
// with the kernels, of what those fragment layouts are.
#pragma once
// Fibers switch with _setjmp/_longjmp between stacks, which glibc's
// fortified longjmp would refuse.
#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif
#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <vector>

#if defined(__SANITIZE_THREAD__)
#define MLA_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) alignas(n)

// CUDA's vector types with CUDA's alignment: a kernel that loads or stores
// one through a pointer the hardware would fault on ("misaligned address")
// fails the UBSan build (-fsanitize=alignment) here too.
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- bf16 / f16 ---------------------------------------------------------
struct __nv_bfloat16 { uint16_t bits; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half { uint16_t bits; };
struct alignas(4) __half2 { __half x, y; };

inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t emu_float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline uint32_t __float_as_uint(float f) { return emu_float_bits(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = emu_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float __half2float(__half h) {
    uint32_t s = (h.bits >> 15) & 1, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 0x400), (int)e - 25);
    return s ? -v : v;
}
inline __half __float2half_rn(float f) {
    // Via the nearest representable value found by rounding the mantissa.
    uint32_t u = emu_float_bits(f);
    uint16_t sign = (u >> 16) & 0x8000;
    float a = fabsf(f);
    if (isnan(f)) return {(uint16_t)(sign | 0x7e00)};
    if (a >= 65520.0f) return {(uint16_t)(sign | 0x7c00)};
    if (a < ldexpf(1.0f, -14)) {  // subnormal: multiples of 2^-24
        float q = nearbyintf(a * ldexpf(1.0f, 24));
        return {(uint16_t)(sign | (uint16_t)q)};
    }
    int e;
    float m = frexpf(a, &e);  // a = m * 2^e, m in [0.5, 1)
    float q = nearbyintf(m * 2048.0f);  // 11 significant bits
    if (q == 2048.0f) { q = 1024.0f; e += 1; }
    int exp = e - 1 + 15;
    if (exp >= 31) return {(uint16_t)(sign | 0x7c00)};
    return {(uint16_t)(sign | (exp << 10) | ((uint16_t)q & 0x3ff))};
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half __ushort_as_half(unsigned short b) { return {b}; }

// ---- threads, blocks, fibers ----------------------------------------------
struct dim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {

enum Wait { RUN = 0, BLOCK = 1, WARP = 2, DONE = 3 };

// A wgmma issued by a thread and not yet waited for.
struct PendingMma {
    float* d;
    int n;
    uint64_t da, db;
    bool trans_b, f16;
};

// A cp.async copy not yet waited for, in commit group `group`.
struct PendingCopy {
    void* dst;
    const void* src;
    int bytes, group;
};

struct Fiber {
    ucontext_t ctx;  // to enter the fiber the first time (ThreadSanitizer: every time)
    jmp_buf jb;      // where it parked
    bool alive = false;
    std::vector<char> stack;
    int tid = 0;
    Wait wait = RUN;
    std::vector<PendingMma> pending;
    int wgmmas = 0;  // wgmma.mma_async issued (a warpgroup's must agree)
    std::vector<PendingCopy> copies;
    int committed = 0;  // cp.async groups committed so far
#ifdef MLA_EMU_TSAN
    void* tsan = nullptr;             // its ThreadSanitizer fiber
    unsigned block_syncs = 0, warp_syncs = 0;  // barriers passed in this block
#endif
};

struct WarpSlots {
    uint32_t a[32][4], b[32][2];
    float c[32][4], f[32];
    const void* addr[32];
    int pred[32];
    unsigned val[32];
    const char* kind[32];  // the collective each lane is in (converged())
};

struct State {
    ucontext_t sched;
    jmp_buf sched_jb;
    std::vector<Fiber> fibers;
    std::vector<WarpSlots> warps;
    int cur = 0;
    dim3 block_idx, block_dim, grid_dim;
    uint32_t dyn_smem = 0;
    void (*body)(const void*) = nullptr;
    const void* arg = nullptr;
#ifdef MLA_EMU_TSAN
    void* sched_tsan = nullptr;  // the scheduler's (the launching thread's) fiber
    // Synchronization objects: barrier k of the block is block_bar[k % 2]
    // (warp w's: warp_bar[w][k % 2]). Two alternate, so a thread that has
    // passed barrier k and released at k + 1 adds nothing to what a thread
    // still at k acquires. `done`: the block's threads have ended.
    char block_bar[2], warp_bar[32][2], done;
#endif
};

inline State& st() {
    static State s;
    return s;
}

// Fibers switch without system calls: swapcontext (which saves the signal
// mask, a syscall each time) only enters a fiber the first time; after that
// the fiber and the scheduler _setjmp where they stop and _longjmp to the
// other. A fiber lives across blocks: when its thread ends it parks DONE
// and, sent off again, runs the next block's body.
//
// Under ThreadSanitizer every switch is a swapcontext announced with
// __tsan_switch_to_fiber. The scheduler hands over with synchronization (its
// set-up happens before the thread runs), a thread hands back without (so
// running threads one after another orders nothing); a thread releases the
// barrier's object when it parks there and acquires it when let go.
inline void park(Wait w) {
    State& s = st();
    Fiber& f = s.fibers[s.cur];
    // Other lanes read it in warp collectives (wait_of) while this thread
    // may already be parking at its next barrier: the emulator's own state,
    // atomic so ThreadSanitizer does not take it for the kernel's.
    __atomic_store_n(&f.wait, w, __ATOMIC_RELAXED);
#ifdef MLA_EMU_TSAN
    char* obj = w == BLOCK  ? &s.block_bar[f.block_syncs % 2]
                : w == WARP ? &s.warp_bar[(f.tid / 32) % 32][f.warp_syncs % 2]
                            : &s.done;
    __tsan_release(obj);
    __tsan_switch_to_fiber(s.sched_tsan, 1 /* __tsan_switch_to_fiber_no_sync */);
    swapcontext(&f.ctx, &s.sched);
    if (w == BLOCK) {
        __tsan_acquire(obj);
        ++f.block_syncs;
    } else if (w == WARP) {
        __tsan_acquire(obj);
        ++f.warp_syncs;
    }
#else
    if (!_setjmp(f.jb)) _longjmp(s.sched_jb, 1);
#endif
}

inline void entry() {
    for (;;) {
        State& s = st();
        s.body(s.arg);
        if (!s.fibers[s.cur].pending.empty()) {
            fprintf(stderr, "emu: thread %d ended with a wgmma it never waited for\n", s.fibers[s.cur].tid);
            abort();
        }
        park(DONE);
    }
}

// Whether fiber f's thread is parked, running or done, as another lane of
// its warp sees it.
inline Wait wait_of(const Fiber& f) { return __atomic_load_n(&f.wait, __ATOMIC_RELAXED); }

// Runs fiber t until it parks.
inline void resume(int t) {
    State& s = st();
    Fiber& f = s.fibers[t];
    s.cur = t;
#ifdef MLA_EMU_TSAN
    if (!f.alive) {
        f.alive = true;
        f.stack.resize(512 * 1024);  // instrumented frames are larger
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
        f.tsan = __tsan_create_fiber(0);
        char name[32];
        snprintf(name, sizeof name, "GPU thread %d", t);
        __tsan_set_fiber_name(f.tsan, name);
    }
    if (!s.sched_tsan) s.sched_tsan = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(f.tsan, 0);
    swapcontext(&s.sched, &f.ctx);
#else
    if (_setjmp(s.sched_jb)) return;
    if (f.alive) _longjmp(f.jb, 1);
    f.alive = true;
    f.stack.resize(64 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
    swapcontext(&s.sched, &f.ctx);
#endif
}

// Runs one block of `threads` fibers to completion.
inline void run_block(int threads) {
    State& s = st();
    // Fibers are kept (parked DONE) for later blocks.
    // Room for CUDA's largest block up front: a ucontext_t points into
    // itself, so a fiber must never move (ThreadSanitizer builds switch
    // through it every time).
    if (threads > 1024) {
        fprintf(stderr, "emu: %d threads in a block (CUDA allows 1024)\n", threads);
        abort();
    }
    if (s.fibers.empty()) s.fibers.reserve(1024);
    if ((int)s.fibers.size() < threads) s.fibers.resize(threads);
    s.warps.resize((threads + 31) / 32);
    for (int t = 0; t < threads; ++t) {
        Fiber& f = s.fibers[t];
        f.tid = t;
        f.wait = RUN;
        f.pending.clear();
        f.wgmmas = 0;
        f.copies.clear();
        f.committed = 0;
#ifdef MLA_EMU_TSAN
        f.block_syncs = 0;
        f.warp_syncs = 0;
#endif
    }
    // MLA_EMU_ORDER=reverse runs the threads of each barrier interval last
    // to first: a missing barrier then shows with the other threads first.
    static const bool reverse = [] {
        const char* o = getenv("MLA_EMU_ORDER");
        return o && strcmp(o, "reverse") == 0;
    }();
    for (;;) {
        bool ran = false;
        for (int i = 0; i < threads; ++i) {
            const int t = reverse ? threads - 1 - i : i;
            if (s.fibers[t].wait != RUN) continue;
            resume(t);
            ran = true;
        }
        // Release warps whose live lanes all wait at a warp barrier.
        bool released = false;
        for (int w = 0; w * 32 < threads; ++w) {
            int live = 0, waiting = 0;
            for (int t = w * 32; t < threads && t < w * 32 + 32; ++t) {
                if (s.fibers[t].wait != DONE) ++live;
                if (s.fibers[t].wait == WARP) ++waiting;
            }
            if (live > 0 && waiting == live) {
                for (int t = w * 32; t < threads && t < w * 32 + 32; ++t)
                    if (s.fibers[t].wait == WARP) s.fibers[t].wait = RUN;
                released = true;
            }
        }
        int live = 0, at_block = 0;
        for (int t = 0; t < threads; ++t) {
            if (s.fibers[t].wait != DONE) ++live;
            if (s.fibers[t].wait == BLOCK) ++at_block;
        }
        if (live == 0) {
#ifdef MLA_EMU_TSAN
            // The block's end happens before what runs after it.
            __tsan_acquire(&s.done);
#endif
            // wgmma is .sync.aligned: every thread of a warpgroup issues the
            // same ones.
            for (int t = 0; t < threads; ++t)
                if (s.fibers[t].wgmmas != s.fibers[t - t % 128].wgmmas) {
                    fprintf(stderr, "emu: thread %d issued %d wgmma, thread %d of its warpgroup %d\n", t,
                            s.fibers[t].wgmmas, t - t % 128, s.fibers[t - t % 128].wgmmas);
                    abort();
                }
            return;
        }
        if (at_block == live) {
            for (int t = 0; t < threads; ++t) s.fibers[t].wait = RUN;
            released = true;
        }
        if (!ran && !released) {
            fprintf(stderr, "emu: deadlock in block (%u,%u): barriers do not match\n",
                    s.block_idx.x, s.block_idx.y);
            abort();
        }
    }
}

// The dynamic shared memory of the running block (filled with 0xff before
// each block: on the hardware it starts as garbage).
inline uint8_t* dynamic_smem() {
    alignas(16) static uint8_t buf[256 * 1024];
    return buf;
}

// What the hardware faults on: an address that is not a multiple of `align`.
inline void check_aligned(const char* what, const void* p, int align) {
    if ((uintptr_t)p % (uintptr_t)align != 0) {
        fprintf(stderr, "emu: %s at %p, not %d-byte aligned (misaligned address on a GPU)\n", what, p,
                align);
        abort();
    }
}

// cp.async: the copy is recorded and lands at the cp.async.wait_group that
// completes its group, the latest moment the hardware may deliver it, so a
// kernel that reads a tile before waiting for it reads stale bytes. Both
// addresses must be aligned to the copy's size.
inline void cp_async(void* dst, const void* src, int bytes) {
    check_aligned("cp.async destination", dst, bytes);
    check_aligned("cp.async source", src, bytes);
    Fiber& f = st().fibers[st().cur];
    f.copies.push_back({dst, src, bytes, f.committed});
}
inline void cp_async_commit() { ++st().fibers[st().cur].committed; }
// cp.async.wait_group n: all but the n most recent committed groups land.
inline void cp_async_wait(int n) {
    Fiber& f = st().fibers[st().cur];
    std::vector<PendingCopy> keep;
    for (const PendingCopy& c : f.copies) {
        if (c.group < f.committed - n) {
            memcpy(c.dst, c.src, c.bytes);
        } else {
            keep.push_back(c);
        }
    }
    f.copies.swap(keep);
}

// Launches `kernel(arg)` over `grid` x `block` with `smem` dynamic bytes.
template <typename P>
void launch(void (*kernel)(P), dim3 grid, dim3 block, uint32_t smem, P arg) {
#ifdef MLA_EMU_TSAN
    // The scheduler's own reads and writes (thread states, the arguments,
    // the garbage it fills shared memory with) are the emulator's, not the
    // kernel's: ThreadSanitizer does not see them.
    __tsan_ignore_thread_begin();
#endif
    State& s = st();
    static P held;
    held = arg;
    s.body = [](const void* a) { reinterpret_cast<void (*)(P)>(st().arg)(held); };
    s.arg = reinterpret_cast<const void*>(kernel);
    s.grid_dim = grid;
    s.block_dim = block;
    s.dyn_smem = smem;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                s.block_idx = {x, y, z};
                // Fresh shared memory is garbage: 0xff bytes read as NaN in
                // every float type, so reading what no thread wrote shows.
                memset(dynamic_smem(), 0xff, smem);
                run_block((int)block.x);
            }
#ifdef MLA_EMU_TSAN
    __tsan_ignore_thread_end();
#endif
}


inline dim3 thread_idx() {
    dim3 d;
    d.x = st().fibers[st().cur].tid;
    return d;
}
inline int lane() { return st().fibers[st().cur].tid % 32; }
inline WarpSlots& slots() { return st().warps[st().fibers[st().cur].tid / 32]; }

// A warp collective's rule on the hardware: every lane named in `mask` (a
// .aligned instruction: all 32) must exist, must not have exited, and must
// execute this same collective; else the result is undefined (or the warp
// hangs). Each lane records its collective in `kind` before the warp
// barrier that opens it; after it, each checks the lanes it names.
inline constexpr char K_SHFL[] = "__shfl_xor_sync", K_BALLOT[] = "__ballot_sync",
                      K_MATCH[] = "__match_any_sync", K_MMA[] = "mma.sync.aligned",
                      K_LDMATRIX[] = "ldmatrix.sync.aligned";
inline void converged(unsigned mask, const char* kind) {
    WarpSlots& w = slots();
    State& s = st();
    const int l = lane(), base = s.fibers[s.cur].tid - l;
    for (int i = 0; i < 32; ++i) {
        if (!(mask >> i & 1)) continue;
        const char* why = nullptr;
        if (base + i >= (int)s.block_dim.x)
            why = "does not exist (the block's size is not a multiple of 32)";
        else if (wait_of(s.fibers[base + i]) == DONE)
            why = "has exited";
        else if (w.kind[i] != kind)
            why = "is in another collective";
        if (why) {
            fprintf(stderr, "emu: %s in thread %d: lane %d of its warp, named in mask %#x, %s\n", kind,
                    base + l, i, mask, why);
            abort();
        }
    }
}

// The lanes of this thread's warp named in `mask` that are live threads of
// the block and for which `keep(lane)` holds, as a bit set.
template <typename F>
inline unsigned live_lanes(unsigned mask, F keep) {
    State& s = st();
    const int base = s.fibers[s.cur].tid - lane();
    unsigned r = 0;
    for (int i = 0; i < 32 && base + i < (int)s.block_dim.x; ++i)
        if ((mask >> i & 1) && wait_of(s.fibers[base + i]) != DONE && keep(i)) r |= 1u << i;
    return r;
}

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::st().block_idx)
#define blockDim (emu::st().block_dim)
#define gridDim (emu::st().grid_dim)

inline void __syncthreads() { emu::park(emu::BLOCK); }
inline void __syncwarp() { emu::park(emu::WARP); }

inline float __shfl_xor_sync(unsigned mask, float v, int off) {
    emu::WarpSlots& w = emu::slots();
    int l = emu::lane();
    w.f[l] = v;
    w.kind[l] = emu::K_SHFL;
    __syncwarp();
    emu::converged(mask, emu::K_SHFL);
    if (!(mask >> (l ^ off) & 1)) {
        fprintf(stderr, "emu: __shfl_xor_sync in lane %d reads lane %d, not in mask %#x\n", l, l ^ off, mask);
        abort();
    }
    float r = w.f[l ^ off];
    __syncwarp();
    return r;
}

// __ballot_sync: bit i set when lane i is named in `mask`, is a live
// thread of the block and passed a nonzero `pred`.
inline unsigned __ballot_sync(unsigned mask, int pred) {
    emu::WarpSlots& w = emu::slots();
    const int l = emu::lane();
    w.pred[l] = pred != 0;
    w.kind[l] = emu::K_BALLOT;
    __syncwarp();
    emu::converged(mask, emu::K_BALLOT);
    const unsigned r = emu::live_lanes(mask, [&](int i) { return w.pred[i] != 0; });
    __syncwarp();
    return r;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }

// __match_any_sync: the lanes named in `mask` (live threads of the block)
// whose `value` equals this lane's.
inline unsigned __match_any_sync(unsigned mask, unsigned value) {
    emu::WarpSlots& w = emu::slots();
    const int l = emu::lane();
    w.val[l] = value;
    w.kind[l] = emu::K_MATCH;
    __syncwarp();
    emu::converged(mask, emu::K_MATCH);
    const unsigned r = emu::live_lanes(mask, [&](int i) { return w.val[i] == value; });
    __syncwarp();
    return r;
}

// Fibers never run concurrently, so these are atomic anyway; the builtins
// tell ThreadSanitizer so (an atomic is no data race, and orders nothing).
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

namespace emu {

inline float lo_f(uint32_t r, bool f16) {
    return f16 ? __half2float({(uint16_t)(r & 0xffff)}) : __bfloat162float({(uint16_t)(r & 0xffff)});
}
inline float hi_f(uint32_t r, bool f16) {
    return f16 ? __half2float({(uint16_t)(r >> 16)}) : __bfloat162float({(uint16_t)(r >> 16)});
}

// mma.sync.m16n8k16.row.col, f32 accumulators. Lane l = 4g + q holds
// A[g][2q..2q+1], A[g+8][2q..], A[g][2q+8..], A[g+8][2q+8..] (a0..a3),
// B[2q..2q+1][g], B[2q+8..2q+9][g] (b0, b1) and C/D[g][2q..], [g+8][2q..].
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool f16) {
    WarpSlots& w = slots();
    int l = lane();
    for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
    w.b[l][0] = b0;
    w.b[l][1] = b1;
    for (int i = 0; i < 4; ++i) w.c[l][i] = d[i];
    w.kind[l] = K_MMA;
    __syncwarp();
    converged(0xffffffffu, K_MMA);
    float A[16][16], B[16][8];
    for (int t = 0; t < 32; ++t) {
        int g = t / 4, q = t % 4;
        A[g][2 * q] = lo_f(w.a[t][0], f16);
        A[g][2 * q + 1] = hi_f(w.a[t][0], f16);
        A[g + 8][2 * q] = lo_f(w.a[t][1], f16);
        A[g + 8][2 * q + 1] = hi_f(w.a[t][1], f16);
        A[g][2 * q + 8] = lo_f(w.a[t][2], f16);
        A[g][2 * q + 9] = hi_f(w.a[t][2], f16);
        A[g + 8][2 * q + 8] = lo_f(w.a[t][3], f16);
        A[g + 8][2 * q + 9] = hi_f(w.a[t][3], f16);
        B[2 * q][g] = lo_f(w.b[t][0], f16);
        B[2 * q + 1][g] = hi_f(w.b[t][0], f16);
        B[2 * q + 8][g] = lo_f(w.b[t][1], f16);
        B[2 * q + 9][g] = hi_f(w.b[t][1], f16);
    }
    int g = l / 4, q = l % 4;
    int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    float out[4];
    for (int i = 0; i < 4; ++i) {
        float acc = w.c[l][i];
        for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
        out[i] = acc;
    }
    __syncwarp();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.m8n8.x4.trans.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; lane l gets, in register i, M_i[2(l%4)][l/4] (low half) and
// M_i[2(l%4)+1][l/4] (high half).
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    check_aligned("ldmatrix row", row, 16);
    WarpSlots& w = slots();
    int l = lane();
    w.addr[l] = row;
    w.kind[l] = K_LDMATRIX;
    __syncwarp();
    converged(0xffffffffu, K_LDMATRIX);
    for (int i = 0; i < 4; ++i) {
        int k = 2 * (l % 4), n = l / 4;
        const uint16_t* r0 = static_cast<const uint16_t*>(w.addr[8 * i + k]);
        const uint16_t* r1 = static_cast<const uint16_t*>(w.addr[8 * i + k + 1]);
        r[i] = (uint32_t)r0[n] | ((uint32_t)r1[n] << 16);
    }
    __syncwarp();
}

// wgmma.mma_async.m64nNk16 with both operands in shared memory (no-swizzle
// descriptors): D(64 x N) += A(64 x 16) B(16 x N). A is K-major; B is
// K-major, or N-major when trans_b. Each thread updates the accumulators
// it holds (mma.sync's C layout per 8 columns, warp w of its warpgroup
// owning rows 16w..16w+15). The product is computed at wgmma.wait_group,
// the latest moment the hardware may read the operands: a kernel that
// writes them, or reads the accumulators, before waiting gets wrong results.
inline void wgmma_run(const PendingMma& op) {
    float* d = op.d;
    const int n = op.n;
    const uint64_t da = op.da, db = op.db;
    const bool trans_b = op.trans_b, f16 = op.f16;
    auto field = [](uint64_t desc, int shift) { return (uint32_t)((desc >> shift) & 0x3fff) << 4; };
    if ((da >> 49) != 0 || (db >> 49) != 0) {
        fprintf(stderr, "emu: wgmma descriptor with base offset or swizzle bits set\n");
        abort();
    }
    const uint8_t* smem = dynamic_smem();
    const uint32_t a0 = field(da, 0), a_lbo = field(da, 16), a_sbo = field(da, 32);
    const uint32_t b0 = field(db, 0), b_lbo = field(db, 16), b_sbo = field(db, 32);
    auto elem = [&](uint32_t at) {
        if (at + 2 > 256 * 1024) {
            fprintf(stderr, "emu: wgmma operand outside shared memory\n");
            abort();
        }
        uint16_t v;
        memcpy(&v, smem + at, 2);
        return f16 ? __half2float({v}) : __bfloat162float({v});
    };
    auto A = [&](int m, int k) {
        return elem(a0 + (m / 8) * a_sbo + (m % 8) * 16 + (k / 8) * a_lbo + (k % 8) * 2);
    };
    auto B = [&](int k, int j) {
        return trans_b ? elem(b0 + (j / 8) * b_sbo + (j % 8) * 2 + (k / 8) * b_lbo + (k % 8) * 16)
                       : elem(b0 + (j / 8) * b_sbo + (j % 8) * 16 + (k / 8) * b_lbo + (k % 8) * 2);
    };
    const int tid = st().fibers[st().cur].tid % 128, l = tid % 32, w = tid / 32;
    for (int j = 0; j < n / 8; ++j)
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * w + l / 4 + 8 * (i / 2), col = 8 * j + 2 * (l % 4) + (i % 2);
            float acc = d[4 * j + i];
            for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
            d[4 * j + i] = acc;
        }
}

inline void wgmma(float* d, int n, uint64_t da, uint64_t db, bool trans_b, bool f16) {
    Fiber& f = st().fibers[st().cur];
    f.pending.push_back({d, n, da, db, trans_b, f16});
    ++f.wgmmas;
}

// wgmma.wait_group 0: completes this thread's outstanding products.
inline void wgmma_wait() {
    auto& pending = st().fibers[st().cur].pending;
    for (const PendingMma& op : pending) wgmma_run(op);
    pending.clear();
}

}  // namespace emu
