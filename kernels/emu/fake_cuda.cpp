// A CUDA driver for machines without a GPU: built as libcuda.so.1, it
// implements the driver calls mlart (through cudarc) and its GPU tests make,
// with "device" memory in host memory and kernels run by the warp emulator
// (mla_emu.h) from these same sources. Loaded instead of NVIDIA's driver
// (LD_LIBRARY_PATH), it lets the whole CUDA backend run on the CPU: the
// Rust host code (staging, launches, workspaces, pools in device memory,
// graph capture, the model's GPU projections) and the kernels together.
//
// It checks what a driver checks and mlart relies on: device pointers of
// copies and frees must lie inside live allocations, kernels may not use
// more dynamic shared memory than their attribute allows, a capturing
// stream may not be synchronized nor wait on an event recorded outside the
// capture, and work enqueued while capturing only runs when its graph is
// launched. Streams run their work at once, in order. Each allocation ends
// (rounded up to 256 bytes) where an inaccessible page begins, so a kernel
// or copy that reads or writes past it faults at once; the fault is
// reported with the kernel and the allocation, and the process exits.
//
//   c++ -std=c++17 -O1 -shared -fPIC -I kernels kernels/emu/fake_cuda.cpp -o libcuda.so.1
//
// Environment: MLART_FAKE_CUDA_CC=80|90 (compute capability, default 80),
// MLART_FAKE_CUDA_SMS (SM count, default 4).
#define MLA_EMULATE 1
#include "../mlart_kernels.cu"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace fake {

typedef int Res;
enum : Res {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_ISOLATION = 906,
};

int env_int(const char* name, int dflt) {
    const char* v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}
int cc() { return env_int("MLART_FAKE_CUDA_CC", 80); }
size_t smem_optin() { return cc() >= 90 ? 232448 : 166912; }  // H100 / A100

std::recursive_mutex mu;

// What the host asked of the driver, for tests that bound a call's cost in
// driver work (fake_cuda_counts).
struct Counts {
    uint64_t launches, uploads, downloads, waits;
} counts{};

// ---- memory ----
std::map<uint64_t, size_t> allocs;  // start -> bytes

// Each allocation's mapping: a guard page, its pages, a guard page.
struct Mapping {
    uint8_t* base;
    size_t len;
};
std::map<uint64_t, Mapping> mappings;  // allocation start -> its mapping
const char* running_kernel = nullptr;  // for the fault report

size_t page() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

// Maps `n` bytes that end (rounded up to 256) at an inaccessible page.
uint8_t* guarded_alloc(size_t n) {
    const size_t used = (n + 255) / 256 * 256, pg = page();
    const size_t body = (used + pg - 1) / pg * pg, len = body + 2 * pg;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    uint8_t* base = static_cast<uint8_t*>(m);
    mprotect(base, pg, PROT_NONE);
    mprotect(base + pg + body, pg, PROT_NONE);
    uint8_t* start = base + pg + body - used;
    mappings[(uint64_t)start] = {base, len};
    return start;
}

struct sigaction previous_segv;

// A fault in a guard page: says which kernel touched which allocation's
// neighbourhood, then exits (the emulated GPU has no way to go on).
void on_segv(int sig, siginfo_t* info, void* ctx) {
    const uint64_t a = (uint64_t)info->si_addr;
    for (const auto& [start, m] : mappings) {
        const uint64_t lo = (uint64_t)m.base, hi = lo + m.len;
        if (a < lo || a >= hi) continue;
        char msg[256];
        const size_t bytes = allocs.count(start) ? allocs[start] : 0;
        const int len = snprintf(msg, sizeof msg,
                                 "fake_cuda: %s touched %#llx, %lld bytes from the start of the %zu-byte "
                                 "allocation at %#llx (outside it)\n",
                                 running_kernel ? running_kernel : "a copy", (unsigned long long)a,
                                 (long long)(a - start), bytes, (unsigned long long)start);
        if (write(2, msg, (size_t)len) < 0) {
        }
        _exit(86);
    }
    // Not ours (a Rust stack guard, a real bug elsewhere): the previous
    // handler takes the re-raised fault.
    sigaction(SIGSEGV, &previous_segv, nullptr);
    (void)sig;
    (void)ctx;
}

void install_fault_report() {
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
}

// The report runs on its own stack: a fault may happen on an emulated
// thread's small fiber stack.
void ensure_signal_stack() {
    thread_local bool done = false;
    if (done) return;
    done = true;
    static thread_local std::vector<uint8_t> stack(1 << 16);
    stack_t ss{};
    ss.ss_sp = stack.data();
    ss.ss_size = stack.size();
    sigaltstack(&ss, nullptr);
}

// The allocation holding [p, p + n), if any.
bool inside(uint64_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

// ---- kernels ----
struct Kernel {
    const char* name;
    void (*run)(void** params, dim3 grid, dim3 block, unsigned smem);
    size_t param_bytes;  // its one parameter, a struct passed by value
    int max_dyn_smem;
};
template <typename P>
void run_as(void (*k)(P), void** params, dim3 g, dim3 b, unsigned smem) {
    emu::launch(k, g, b, smem, *static_cast<P*>(params[0]));
}
template <typename P>
constexpr size_t param_bytes(void (*)(P)) {
    return sizeof(P);
}
#define K(NAME)                                                                                   \
    Kernel {                                                                                      \
        #NAME, [](void** p, dim3 g, dim3 b, unsigned s) { run_as(NAME, p, g, b, s); }, param_bytes(NAME), \
            48 * 1024                                                                             \
    }
#define K3(NAME) K(NAME), K(NAME##_m64), K(NAME##_wg)
std::vector<Kernel>& kernels() {
    static std::vector<Kernel> v = {
        K3(mla_decode_bf16_d576), K3(mla_decode_bf16_d512), K3(mla_decode_f16_d576),
        K3(mla_decode_f16_d512), K3(mla_decode_f32_d576), K3(mla_decode_f32_d512),
        K3(mla_decode_fp8v32_d576), K3(mla_decode_fp8model1_d512),
        K(mla_plan), K(mla_combine), K(mla_append), K(mla_wgmma_probe),
        K(mla_linear_bf16_m1), K(mla_linear_bf16_m4), K(mla_linear_fp8_m1), K(mla_linear_fp8_m4),
        K(mla_linear_reduce), K(mla_rows),
        K(mla_index_scatter), K(mla_index_score), K(mla_index_score_mma), K(mla_index_topk), K(mla_index_rows),
    };
    return v;
}

// ---- streams, events, graphs ----
using Clock = std::chrono::steady_clock;
struct Event {
    Clock::time_point at{};
    int capture = 0;  // the capture it was recorded in (0: none)
};
struct Op;
typedef std::vector<Op> Graph;
struct Op {
    enum { LAUNCH, COPY, SET, RECORD, GRAPH } kind;
    Kernel* k = nullptr;
    dim3 grid, block;
    unsigned smem = 0;
    std::vector<uint8_t> param;  // the kernel's one parameter, copied at launch
    uint64_t dst = 0, src = 0;
    size_t n = 0;
    uint8_t value = 0;
    Event* ev = nullptr;
    Graph* graph = nullptr;
};
struct Stream {
    int capture = 0;  // capture id while capturing
    Graph ops;        // what the capture recorded
};
int next_capture = 1;
Stream legacy;

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &legacy; }

void run(const Op& op) {
    switch (op.kind) {
        case Op::LAUNCH: {
            void* params[1] = {const_cast<uint8_t*>(op.param.data())};
            ensure_signal_stack();
            running_kernel = op.k->name;
            op.k->run(params, op.grid, op.block, op.smem);
            running_kernel = nullptr;
            break;
        }
        case Op::COPY: memmove((void*)op.dst, (const void*)op.src, op.n); break;
        case Op::SET: memset((void*)op.dst, op.value, op.n); break;
        case Op::RECORD: op.ev->at = Clock::now(); break;
        case Op::GRAPH:
            for (const Op& o : *op.graph) run(o);
            break;
    }
}

// Runs `op` now, or records it into the capture of stream `s`.
Res enqueue(void* s, Op op) {
    Stream* st = stream_of(s);
    if (st->capture) {
        if (op.kind == Op::RECORD) op.ev->capture = st->capture;
        st->ops.push_back(std::move(op));
        return OK;
    }
    run(op);
    return OK;
}

// Checks a copy's device side(s): `dev` pointers must be inside allocations.
Res check_dev(uint64_t p, size_t n) { return n == 0 || inside(p, n) ? OK : INVALID_VALUE; }

}  // namespace fake

using namespace fake;
typedef uint64_t CUdeviceptr;

extern "C" {

Res cuInit(unsigned) {
    static std::once_flag once;
    std::call_once(once, install_fault_report);
    return OK;
}
Res cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
Res cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
Res cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
Res cuDeviceGetName(char* buf, int len, int) {
    snprintf(buf, len, "mlart emulated GPU (sm_%d, CPU warp emulator)", cc());
    return OK;
}
Res cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 16: *v = env_int("MLART_FAKE_CUDA_SMS", 4); return OK;   // SM count
        case 75: *v = cc() / 10; return OK;                            // cc major
        case 76: *v = cc() % 10; return OK;                            // cc minor
        case 97: *v = (int)smem_optin(); return OK;                   // smem opt-in
        default: *v = 0; return OK;
    }
}
Res cuDeviceTotalMem_v2(size_t* b, int) {
    *b = (size_t)16 << 30;
    return OK;
}
Res cuDevicePrimaryCtxRetain(void** ctx, int) {
    static int the_context;
    *ctx = &the_context;
    return OK;
}
Res cuDevicePrimaryCtxRelease_v2(int) { return OK; }
Res cuCtxSetCurrent(void*) { return OK; }
Res cuCtxGetCurrent(void** c) {
    static int the_context;
    *c = &the_context;
    return OK;
}
Res cuCtxSynchronize() {
    ++counts.waits;
    return OK;
}

Res cuModuleLoadData(void** m, const void* image) {
    static int the_module;
    if (!image) return INVALID_VALUE;
    *m = &the_module;
    return OK;
}
Res cuModuleUnload(void*) { return OK; }
Res cuModuleGetFunction(void** f, void*, const char* name) {
    for (auto& k : kernels())
        if (strcmp(k.name, name) == 0) {
            *f = &k;
            return OK;
        }
    return NOT_FOUND;
}
Res cuFuncSetAttribute(void* f, int attr, int value) {
    if (attr == 8) {  // max dynamic shared memory
        if (value < 0 || (size_t)value > smem_optin()) return INVALID_VALUE;
        static_cast<Kernel*>(f)->max_dyn_smem = value;
    }
    return OK;
}
Res cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return OK;
}
Res cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void*, int block, size_t smem) {
    const size_t per_sm = smem_optin() + 1024;
    int by_threads = 2048 / (block > 0 ? block : 1);
    int by_smem = smem ? (int)(per_sm / smem) : by_threads;
    *n = by_threads < by_smem ? by_threads : by_smem;
    return OK;
}

// ---- memory ----
Res cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (n == 0) return INVALID_VALUE;
    void* m = guarded_alloc(n);
    if (!m) return OUT_OF_MEMORY;
    memset(m, 0xa5, n);  // fresh device memory is not zero
    *p = (uint64_t)m;
    allocs[*p] = n;
    return OK;
}
Res cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = allocs.find(p);
    if (it == allocs.end()) return INVALID_VALUE;
    allocs.erase(it);
    auto mp = mappings.find(p);
    munmap(mp->second.base, mp->second.len);
    mappings.erase(mp);
    return OK;
}
Res cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = *total = (size_t)16 << 30;
    return OK;
}
Res cuPointerGetAttributes(unsigned n, int* attrs, void** data, CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(mu);
    uint64_t start = 0;
    size_t size = 0;
    auto it = allocs.upper_bound(p);
    if (it != allocs.begin()) {
        --it;
        if (p < it->first + it->second) {
            start = it->first;
            size = it->second;
        }
    }
    for (unsigned i = 0; i < n; ++i) {
        if (attrs[i] == 11) *static_cast<uint64_t*>(data[i]) = start;       // range start
        else if (attrs[i] == 12) *static_cast<size_t*>(data[i]) = size;     // range size
        else return INVALID_VALUE;
    }
    return OK;
}

// Unified addressing: either side may be host or device memory.
Res cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    std::lock_guard<std::recursive_mutex> g(mu);
    counts.uploads += inside(dst, n) && !inside(src, n);
    counts.downloads += inside(src, n) && !inside(dst, n);
    ++counts.waits;  // it returns when done
    memmove((void*)dst, (const void*)src, n);
    return OK;
}
Res copy(void* s, uint64_t dst, uint64_t src, size_t n, bool dst_dev, bool src_dev) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if ((dst_dev && check_dev(dst, n)) || (src_dev && check_dev(src, n))) return INVALID_VALUE;
    counts.uploads += dst_dev && !src_dev;
    counts.downloads += src_dev && !dst_dev;
    Op op{Op::COPY};
    op.dst = dst;
    op.src = src;
    op.n = n;
    return enqueue(s, op);
}
Res cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) { return copy(nullptr, d, (uint64_t)h, n, true, false); }
Res cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    ++counts.waits;  // it returns when done
    return copy(nullptr, (uint64_t)h, d, n, false, true);
}
Res cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { return copy(nullptr, d, s, n, true, true); }
Res cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* s) {
    return copy(s, d, (uint64_t)h, n, true, false);
}
Res cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* s) {
    return copy(s, (uint64_t)h, d, n, false, true);
}
Res cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, void* s) {
    return copy(s, d, src, n, true, true);
}
Res cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* s) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (check_dev(d, n)) return INVALID_VALUE;
    Op op{Op::SET};
    op.dst = d;
    op.value = v;
    op.n = n;
    return enqueue(s, op);
}
Res cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { return cuMemsetD8Async(d, v, n, nullptr); }

// ---- kernels ----
Res cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void* s, void** params, void** extra) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Kernel* k = static_cast<Kernel*>(f);
    if (!k || extra || !params || by != 1 || bz != 1 || bx == 0 || bx > 1024) return INVALID_VALUE;
    if ((int)smem > k->max_dyn_smem) return INVALID_VALUE;  // as the hardware refuses
    ++counts.launches;
    Op op{Op::LAUNCH};
    op.k = k;
    op.grid = {gx, gy, gz};
    op.block = {bx, 1, 1};
    op.smem = smem;
    // Every kernel takes one struct by value; params[0] points to it. Copy
    // it now, as the driver does.
    const uint8_t* arg = static_cast<const uint8_t*>(params[0]);
    op.param.assign(arg, arg + k->param_bytes);
    return enqueue(s, std::move(op));
}

// ---- streams ----
Res cuStreamCreate(void** s, unsigned) {
    *s = new Stream();
    return OK;
}
Res cuStreamDestroy_v2(void* s) {
    delete static_cast<Stream*>(s);
    return OK;
}
Res cuStreamSynchronize(void* s) {
    if (stream_of(s)->capture) return CAPTURE_UNSUPPORTED;
    ++counts.waits;
    return OK;
}
Res cuStreamIsCapturing(void* s, int* status) {
    *status = stream_of(s)->capture ? 1 : 0;
    return OK;
}
Res cuStreamBeginCapture_v2(void* s, int) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* st = stream_of(s);
    if (st->capture) return INVALID_VALUE;
    st->capture = next_capture++;
    st->ops.clear();
    return OK;
}
Res cuStreamEndCapture(void* s, void** graph) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* st = stream_of(s);
    if (!st->capture) return INVALID_VALUE;
    *graph = new Graph(std::move(st->ops));
    st->ops.clear();
    st->capture = 0;
    return OK;
}
Res cuStreamWaitEvent(void* s, void* e, unsigned) {
    Stream* st = stream_of(s);
    if (st->capture && static_cast<Event*>(e)->capture != st->capture) return CAPTURE_ISOLATION;
    return OK;
}

// ---- events ----
Res cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return OK;
}
Res cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return OK;
}
Res cuEventRecord(void* e, void* s) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Op op{Op::RECORD};
    op.ev = static_cast<Event*>(e);
    return enqueue(s, op);
}
Res cuEventSynchronize(void*) {
    ++counts.waits;
    return OK;
}
Res cuEventQuery(void*) { return OK; }
Res cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = std::chrono::duration<float, std::milli>(static_cast<Event*>(b)->at - static_cast<Event*>(a)->at).count();
    return OK;
}
Res cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// ---- graphs ----
Res cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*static_cast<Graph*>(graph));
    return OK;
}
Res cuGraphLaunch(void* exec, void* s) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Op op{Op::GRAPH};
    op.graph = static_cast<Graph*>(exec);
    return enqueue(s, op);
}
Res cuGraphUpload(void*, void*) { return OK; }
Res cuGraphDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return OK;
}
Res cuGraphExecDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return OK;
}

// ---- errors ----
struct ErrorText {
    Res code;
    const char *name, *text;
};
const ErrorText* error_text(Res r) {
    static const ErrorText table[] = {
        {OK, "CUDA_SUCCESS", "no error"},
        {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument (emulated driver)"},
        {OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory (emulated driver)"},
        {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found (emulated driver)"},
        {CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
         "operation not permitted when stream is capturing (emulated driver)"},
        {CAPTURE_ISOLATION, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
         "dependency created on uncaptured work in another stream (emulated driver)"},
    };
    static const ErrorText unknown = {-1, "CUDA_ERROR_UNKNOWN", "unknown error (emulated driver)"};
    for (const auto& e : table)
        if (e.code == r) return &e;
    return &unknown;
}
Res cuGetErrorString(Res r, const char** s) {
    *s = error_text(r)->text;
    return OK;
}
Res cuGetErrorName(Res r, const char** s) {
    *s = error_text(r)->name;
    return OK;
}

// Not a driver call: the counts of host-to-device copies, device-to-host
// copies, kernel launches and host waits (stream, context and event
// synchronizations, synchronous copies) since the driver was loaded.
void fake_cuda_counts(uint64_t out[4]) {
    std::lock_guard<std::recursive_mutex> g(mu);
    out[0] = counts.uploads;
    out[1] = counts.downloads;
    out[2] = counts.launches;
    out[3] = counts.waits;
}

}  // extern "C"
