// mlart.h must be self-contained: this C++17 translation unit includes it
// and nothing else, and uses what it declares.
#include "mlart.h"

static_assert(sizeof(uint32_t) == 4 && sizeof(size_t) >= 4, "stdint/stddef via mlart.h");
static_assert(offsetof(mlart_decode_args, struct_size) == 0, "struct_size first");
static_assert(offsetof(mlart_kv_pool_decode_args, struct_size) == 0, "struct_size first");
static_assert(offsetof(mlart_engine_props, device_name) > 0, "fixed-size char arrays");

namespace {
// The C declarations must be usable from C++: extern "C" linkage, complete types.
constexpr mlart_status kExhausted = MLART_STATUS_POOL_EXHAUSTED;
using decode_fn = mlart_error *(*)(mlart_engine *, const mlart_decode_args *);
constexpr decode_fn kDecode = &mlart_decode_paged;
}  // namespace

int main() {
    mlart_kv_pool_options options{};
    mlart_kv_pool_options_init(&options);
    mlart_kv_pool_stats stats{};
    mlart_kv_pool_stats_init(&stats);
    mlart_error *err = kDecode(nullptr, nullptr);
    const bool ok = options.struct_size == sizeof options && stats.struct_size == sizeof stats &&
                    options.num_blocks == 0 && mlart_error_code(err) == MLART_STATUS_NULL_POINTER &&
                    mlart_abi_version() == MLART_ABI_VERSION && mlart_version() != nullptr &&
                    mlart_error_code(nullptr) == MLART_STATUS_OK && kExhausted == 4;
    mlart_error_free(err);
    return ok ? 0 : 1;
}
