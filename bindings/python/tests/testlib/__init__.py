"""Test support for the mlart Python binding, independent of the binding.

Importing it puts this checkout's ``bindings/python`` first on sys.path,
so the tests exercise the package next to them (not an installed copy),
and checks the environment the tests need.
"""

import os
import sys
import unittest

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO_ROOT = os.path.dirname(os.path.dirname(PACKAGE_ROOT))
if sys.path[:1] != [PACKAGE_ROOT]:
    sys.path.insert(0, PACKAGE_ROOT)

GEN_HINT = (
    "generate one with `./target/release/mlart gen-model --preset {preset} --layers {layers} "
    "--seed 1 DIR` at the repository root and set {env}=DIR (cargo test --test bindings "
    "python_binding does this for you)"
)


def checkpoint_dir(env, preset, layers):
    """The checkpoint directory named by `env`, or an AssertionError saying
    how to make one (the tests fail rather than skip without it)."""
    d = os.environ.get(env)
    hint = GEN_HINT.format(preset=preset, layers=layers, env=env)
    if not d:
        raise AssertionError("%s is not set: %s" % (env, hint))
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise AssertionError("%s=%s holds no config.json: %s" % (env, d, hint))
    return d


def model_dir():
    """The tiny checkpoint (gen-model --preset tiny --layers 2)."""
    return checkpoint_dir("MLART_TEST_MODEL_DIR", "tiny", 2)


def model_v32_dir():
    """The tiny DeepSeek-V3.2 checkpoint (gen-model --preset tiny-v3.2 --layers 1)."""
    return checkpoint_dir("MLART_TEST_MODEL_V32_DIR", "tiny-v3.2", 1)


class EngineTestCase(unittest.TestCase):
    """Tests that share one CPU engine (``self.engine``), made for the class
    and closed after it."""

    @classmethod
    def setUpClass(cls):
        import mlart  # after sys.path has this checkout's package first

        cls.engine = mlart.Engine("cpu")

    @classmethod
    def tearDownClass(cls):
        cls.engine.close()
