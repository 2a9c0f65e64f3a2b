// mlart.h included twice must compile (include guard MLART_H).
#include "mlart.h"
#include "mlart.h"

#ifndef MLART_H
#error "mlart.h does not define its include guard MLART_H"
#endif

int main() {
    mlart_kv_pool_decode_args args{};
    mlart_kv_pool_decode_args_init(&args);
    return args.struct_size == sizeof args && mlart_abi_version() == MLART_ABI_VERSION ? 0 : 1;
}
