#!/usr/bin/env python3
"""Writes seed inputs for the `checkpoint` fuzz target: small but complete
checkpoints (bf16 and FP8 with block scales, with and without q_lora, and
DeepSeek-V3.2 ones with an indexer that keeps one token, so a forward of
two tokens runs the sparse path) in
the target's input format `[flags u8][config length u16 LE][config][safetensors]`.

Usage: python3 fuzz/seeds.py fuzz/corpus/checkpoint
"""
import json
import random
import struct
import sys
from pathlib import Path

H, HEADS, QL, KVL, NOPE, ROPE, V = 16, 2, 8, 8, 4, 4, 4
# The V3.2 indexer: heads, head_dim (a power of two >= ROPE), top-k.
IH, ID, ITOPK = 2, 4, 1


def config(q_lora, yarn, v32=False):
    c = {
        "model_type": "deepseek_v32" if v32 else "deepseek_v3",
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_hidden_layers": 1,
        "q_lora_rank": QL if q_lora else None,
        "kv_lora_rank": KVL,
        "qk_nope_head_dim": NOPE,
        "qk_rope_head_dim": ROPE,
        "v_head_dim": V,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
    }
    if v32:
        c.update({"index_n_heads": IH, "index_head_dim": ID, "index_topk": ITOPK})
    if yarn:
        c["rope_scaling"] = {
            "type": "yarn", "factor": 4, "original_max_position_embeddings": 256,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        }
    return json.dumps(c).encode()


def bf16(x):
    return struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:]


def tensors(q_lora, fp8, rng, v32=False):
    p = "model.layers.0.self_attn."
    shapes = {}
    if v32:
        shapes["indexer.wq_b.weight"] = [IH * ID, QL]
        shapes["indexer.wk.weight"] = [ID, H]
    if q_lora:
        shapes["q_a_proj.weight"] = [QL, H]
        shapes["q_b_proj.weight"] = [HEADS * (NOPE + ROPE), QL]
    else:
        shapes["q_proj.weight"] = [HEADS * (NOPE + ROPE), H]
    shapes["kv_a_proj_with_mqa.weight"] = [KVL + ROPE, H]
    shapes["kv_b_proj.weight"] = [HEADS * (NOPE + V), KVL]
    shapes["o_proj.weight"] = [H, HEADS * V]
    out = []
    for name, shape in shapes.items():
        n = shape[0] * shape[1]
        if fp8:
            # e4m3 codes of modest magnitude, one 128x128 block scale.
            data = bytes(rng.choice([0x30, 0x38, 0x40, 0xB0, 0xB8, 0xC0]) for _ in range(n))
            out.append((p + name, "F8_E4M3", shape, data))
            out.append((p + name + "_scale_inv", "F32", [1, 1], struct.pack("<f", 0.01)))
        else:
            data = b"".join(bf16(rng.uniform(-0.3, 0.3)) for _ in range(n))
            out.append((p + name, "BF16", shape, data))
    norms = (["q_a_layernorm.weight"] if q_lora else []) + ["kv_a_layernorm.weight"]
    for name in norms:
        n = QL if name.startswith("q_a") else KVL
        out.append((p + name, "BF16", [n], b"".join(bf16(1.0) for _ in range(n))))
    if v32:
        # weights_proj stays bf16 in FP8 checkpoints; k_norm has a bias.
        n = IH * H
        out.append((p + "indexer.weights_proj.weight", "BF16", [IH, H],
                    b"".join(bf16(rng.uniform(-0.3, 0.3)) for _ in range(n))))
        out.append((p + "indexer.k_norm.weight", "BF16", [ID], b"".join(bf16(1.0) for _ in range(ID))))
        out.append((p + "indexer.k_norm.bias", "BF16", [ID], b"".join(bf16(0.1) for _ in range(ID))))
    return out


def safetensors(ts):
    header, blob = {}, b""
    for name, dtype, shape, data in ts:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def main():
    dst = Path(sys.argv[1])
    dst.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for q_lora in (True, False):
        for fp8 in (False, True):
            for yarn in (False, True):
                cfg = config(q_lora, yarn)
                st = safetensors(tensors(q_lora, fp8, rng))
                flags = 0x08 if fp8 else 0x02  # bf16 activations / convert to f32
                name = f"{'lora' if q_lora else 'direct'}-{'fp8' if fp8 else 'bf16'}-{'yarn' if yarn else 'plain'}"
                (dst / name).write_bytes(bytes([flags]) + struct.pack("<H", len(cfg)) + cfg + st)
                # The same tensors as a one-shard checkpoint with an index.
                names = [t[0] for t in tensors(q_lora, fp8, random.Random(2))]
                ix = json.dumps({"metadata": {}, "weight_map": {n: "model-1.safetensors" for n in names}}).encode()
                (dst / (name + "-sharded")).write_bytes(
                    bytes([flags | 16]) + struct.pack("<H", len(cfg)) + cfg
                    + struct.pack("<H", len(ix)) + ix + st)
    # DeepSeek-V3.2 (q_lora only): the indexer's tensors too.
    for fp8 in (False, True):
        cfg = config(True, True, v32=True)
        st = safetensors(tensors(True, fp8, rng, v32=True))
        flags = 0x08 if fp8 else 0x02
        (dst / f"v32-{'fp8' if fp8 else 'bf16'}").write_bytes(
            bytes([flags]) + struct.pack("<H", len(cfg)) + cfg + st)


if __name__ == "__main__":
    main()
