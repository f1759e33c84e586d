"""ComfyUI's real code for tests and checks: the pinned source at `shared/vendor/ComfyUI` beside the checkout
(`../shared`, or beside a folder above it, as for a worktree), started on CPU as its README there says.

`comfyui_dir()` finds it (None where absent: callers skip, saying so). `import_comfyui()` puts it on
`sys.path`, stands in for torchvision where it is not installed (ComfyUI imports it at module level only for
models SDXL never uses; the stand-in raises if one is used), parses ComfyUI's own `--cpu` argument and imports
`comfy.sd`, `comfy.lora`, `comfy.utils`. `load_waveft_node()` loads `integrations/comfyui/` the way ComfyUI loads
a folder in `custom_nodes/` (`nodes.load_custom_node`).
"""
import asyncio
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "integrations" / "comfyui"
VENDOR_PATH = Path("shared") / "vendor" / "ComfyUI"
ABSENT = f"ComfyUI's source is not at ../{VENDOR_PATH} beside the checkout (nor beside a folder above it)"


def comfyui_dir() -> Path | None:
    for parent in REPO.parents:
        if (parent / VENDOR_PATH / "comfy" / "lora.py").is_file():
            return parent / VENDOR_PATH
    return None


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`torchvision` and its submodules as modules whose every attribute raises when used."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def unavailable(attribute):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            return _Unavailable(f"{spec.name}.{attribute}")

        module.__getattr__ = unavailable
        return module

    def exec_module(self, module):
        pass


class _Unavailable:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        return _Unavailable(f"{self._name}.{attribute}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is not installed here (a stand-in for ComfyUI's imports)")


def import_comfyui(extra_args=()):
    """Import ComfyUI's `comfy` modules on CPU; returns the `comfy` package. Idempotent."""
    path = comfyui_dir()
    if path is None:
        raise FileNotFoundError(ABSENT)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if importlib.util.find_spec("torchvision") is None:
        # diffusers and transformers note at import which packages exist (and parse their versions): they must
        # see that torchvision is absent before the stand-in makes it findable.
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        sys.meta_path.append(_TorchvisionStandIn())
    if "comfy.cli_args" not in sys.modules:
        import comfy.options

        comfy.options.enable_args_parsing()
        argv, sys.argv = sys.argv, [sys.argv[0], "--cpu", *extra_args]
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, at import)
        finally:
            sys.argv = argv
    import comfy.lora
    import comfy.sd
    import comfy.utils  # noqa: F401

    return sys.modules["comfy"]


def load_waveft_node():
    """Load `integrations/comfyui/` through ComfyUI's own custom-node loader; returns the node module."""
    import_comfyui()
    import nodes

    module_path = str(NODE_DIR)
    if not asyncio.run(nodes.load_custom_node(module_path)):
        raise RuntimeError(f"ComfyUI could not load the custom node {module_path} (see its log)")
    return sys.modules[module_path.replace(".", "_x_")]
