"""The ctypes structs against include/mlart.h and the library's sizes."""

import ctypes
import os
import re
import unittest

import testlib
import mlart  # noqa: F401
from mlart import _ffi

HEADER = os.path.join(testlib.REPO_ROOT, "include", "mlart.h")

# C field type -> the ctypes type the binding must use.
SCALARS = {
    "uint32_t": ctypes.c_uint32,
    "int32_t": ctypes.c_int32,
    "uint64_t": ctypes.c_uint64,
    "int64_t": ctypes.c_int64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "bool": ctypes.c_bool,
}
ENUM_TYPEDEFS = {
    "mlart_memory", "mlart_dtype", "mlart_kv_format", "mlart_backend", "mlart_thread_affinity",
    "mlart_cpu_isa", "mlart_status", "mlart_activations",
}


def header_structs():
    """{name: [(field, C type, array length or None, is pointer)]} parsed
    from the header's ``typedef struct NAME { ... } NAME;`` blocks."""
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    structs = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", text, flags=re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            fm = re.fullmatch(r"(?:const )?([\w ]+?)\s*(\*?)\s*(\w+)(?:\[(\d+)\])?", decl)
            if fm is None:
                raise AssertionError("cannot parse field %r of %s" % (decl, m.group(1)))
            ctype, star, name, n = fm.groups()
            fields.append((name, ctype, int(n) if n else None, bool(star)))
        structs[m.group(1)] = fields
    return structs


class LayoutTest(unittest.TestCase):
    def test_every_struct_matches_the_header_field_by_field(self):
        structs = header_structs()
        self.assertEqual(set(structs), set(_ffi.STRUCTS), "structs of mlart.h vs the binding")
        for name, (py, _init) in _ffi.STRUCTS.items():
            want = structs[name]
            got = py._fields_
            self.assertEqual([f[0] for f in got], [f[0] for f in want], "%s: field names and order" % name)
            for (fname, ftype), (_, ctype, n, ptr) in zip(got, want):
                where = "%s.%s" % (name, fname)
                if ptr:
                    self.assertEqual(ftype, ctypes.c_void_p, where)
                elif ctype == "mlart_progress_fn":
                    self.assertIs(ftype, _ffi.PROGRESS_FN, where)
                elif n is not None:
                    self.assertEqual(ctype, "char", where)
                    self.assertTrue(issubclass(ftype, ctypes.Array), where)
                    self.assertEqual((ftype._type_, ftype._length_), (ctypes.c_char, n), where)
                elif ctype in ENUM_TYPEDEFS:
                    self.assertEqual(ftype, ctypes.c_uint32, where)
                else:
                    self.assertEqual(ftype, SCALARS[ctype], where)

    def test_progress_fn_signature_matches_the_header(self):
        with open(HEADER, encoding="utf-8") as f:
            text = f.read()
        self.assertIn(
            "typedef bool (*mlart_progress_fn)(float fraction, const char *stage, void *user_data);", text
        )
        self.assertEqual(_ffi.PROGRESS_FN._restype_, ctypes.c_bool)
        self.assertEqual(_ffi.PROGRESS_FN._argtypes_, (ctypes.c_float, ctypes.c_char_p, ctypes.c_void_p))

    def test_every_struct_size_matches_the_library(self):
        for name, (py, init) in _ffi.STRUCTS.items():
            s = _ffi.init_struct(init, py, name)
            self.assertEqual(s.struct_size, ctypes.sizeof(py), name)

    def test_a_size_mismatch_is_a_clear_error(self):
        class Longer(ctypes.Structure):
            _fields_ = _ffi.EngineOptions._fields_ + [("extra", ctypes.c_uint64)]

        with self.assertRaisesRegex(
            RuntimeError,
            r"^mlart: mlart_engine_options is 20 bytes in .*libmlart\.so but 32 in this binding$",
        ):
            _ffi.init_struct(_ffi.engine_options_init, Longer, "mlart_engine_options")

    def test_defaults_come_from_the_library(self):
        d = _ffi.new_struct("mlart_decode_args")
        self.assertEqual((d.q_dtype, d.out_dtype, d.kv_format, d.memory, d.s_q), (1, 1, 0, 0, 1))
        o = _ffi.new_struct("mlart_kv_pool_options")
        self.assertEqual((o.kv_format, o.d_qk, o.num_layers, o.block_size, o.num_blocks), (0, 576, 1, 64, 0))
        m = _ffi.new_struct("mlart_model_options")
        self.assertEqual((m.gpu_projections, m.activations, m.kept_keys_bytes), (-1, 0, 0))


if __name__ == "__main__":
    unittest.main()
