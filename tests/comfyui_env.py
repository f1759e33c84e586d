"""ComfyUI's real code for tests and checks: the pinned source at `shared/vendor/ComfyUI` beside the checkout
(`../shared`, or beside a folder above it, as for a worktree), started on CPU as its README there says.

`comfyui_dir()` finds it (None where absent: callers skip, saying so). `import_comfyui()` puts it on
`sys.path`, stands in for torchvision where it is not installed (ComfyUI imports it at module level only for
models SDXL never uses; the stand-in raises if one is used), parses ComfyUI's own `--cpu` argument and imports
`comfy.sd`, `comfy.lora`, `comfy.utils`. `load_waveft_node()` loads `integrations/comfyui/` the way ComfyUI loads
a folder in `custom_nodes/` (`nodes.load_custom_node`).
"""
import asyncio
import importlib.util
import sys
from pathlib import Path

from waveft.fixtures.stand_ins import command_line, install_stand_ins

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "integrations" / "comfyui"
VENDOR_PATH = Path("shared") / "vendor" / "ComfyUI"
ABSENT = f"ComfyUI's source is not at ../{VENDOR_PATH} beside the checkout (nor beside a folder above it)"


def vendored_source(name: str, marker: str) -> Path | None:
    """`shared/vendor/<name>` beside the checkout or beside a folder above it (as for a worktree), where it holds
    the file `marker`; else None."""
    for parent in REPO.parents:
        if (parent / "shared" / "vendor" / name / marker).is_file():
            return parent / "shared" / "vendor" / name
    return None


def comfyui_dir() -> Path | None:
    return vendored_source(VENDOR_PATH.name, "comfy/lora.py")


def import_comfyui(extra_args=()):
    """Import ComfyUI's `comfy` modules on CPU; returns the `comfy` package. Idempotent."""
    path = comfyui_dir()
    if path is None:
        raise FileNotFoundError(ABSENT)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if importlib.util.find_spec("torchvision") is None:
        install_stand_ins(["torchvision"])
    if "comfy.cli_args" not in sys.modules:
        import comfy.options

        comfy.options.enable_args_parsing()
        with command_line("--cpu", *extra_args):
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, at import)
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
