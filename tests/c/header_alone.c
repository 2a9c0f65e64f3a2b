/* mlart.h must be self-contained: this C11 translation unit includes it and
 * nothing else, and uses what it declares. */
#include "mlart.h"

_Static_assert(sizeof(uint32_t) == 4 && sizeof(size_t) >= 4, "stdint/stddef via mlart.h");
_Static_assert(offsetof(mlart_decode_args, struct_size) == 0, "struct_size first");
_Static_assert(offsetof(mlart_kv_pool_decode_args, struct_size) == 0, "struct_size first");
_Static_assert(offsetof(mlart_engine_options, struct_size) == 0, "struct_size first");
_Static_assert(offsetof(mlart_engine_props, struct_size) == 0, "struct_size first");
_Static_assert(offsetof(mlart_kv_pool_options, struct_size) == 0, "struct_size first");
_Static_assert(offsetof(mlart_kv_pool_stats, struct_size) == 0, "struct_size first");

int main(void) {
    mlart_decode_args args;
    mlart_engine_options options;
    mlart_engine *engine = NULL;
    mlart_error *err;
    bool ok;
    mlart_decode_args_init(&args);
    mlart_engine_options_init(&options);
    ok = args.struct_size == sizeof args && options.struct_size == sizeof options &&
         !args.causal && args.q_dtype == MLART_DTYPE_BF16 &&
         mlart_abi_version() == MLART_ABI_VERSION && mlart_version() != NULL;
    options.backend = MLART_BACKEND_CPU;
    options.num_threads = 1;
    err = mlart_engine_create(&options, &engine);
    ok = ok && err == NULL && engine != NULL;
    mlart_error_free(err);
    mlart_engine_free(engine);
    return ok ? 0 : 1;
}
