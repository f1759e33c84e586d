"""The exported LoRA and full-difference files load in InvokeAI and Forge, by their own loader code
(scripts/check_client_loaders.py), where their sources sit at ../shared/vendor/ beside the checkout (README,
"Checking InvokeAI and Forge"); skipped, saying why, where they or the packages their imports need are absent."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.check_client_loaders import FORGE_PACKAGES, INVOKEAI_PACKAGES, missing_packages

REPO = Path(__file__).resolve().parents[1]
CLIENTS = {"--invokeai": ("InvokeAI", "invokeai/backend/patches/layer_patcher.py", INVOKEAI_PACKAGES),
           "--forge": ("stable-diffusion-webui-forge", "repositories/huggingface_guess/huggingface_guess/detection.py",
                       FORGE_PACKAGES)}


def vendor_dir(name: str, marker: str) -> Path | None:
    """`shared/vendor/<name>` beside the checkout or beside a folder above it (as for a worktree)."""
    for parent in REPO.parents:
        if (parent / "shared" / "vendor" / name / marker).is_file():
            return parent / "shared" / "vendor" / name
    return None


def client_arguments() -> list[str]:
    arguments, absent = [], []
    for option, (name, marker, packages) in CLIENTS.items():
        folder = vendor_dir(name, marker)
        missing = missing_packages(packages)
        if folder is None:
            absent.append(f"{name}'s source is not at ../shared/vendor/{name} (with {marker})")
        elif missing:
            absent.append(f"{name}'s imports need {', '.join(missing)} (a separate venv: README)")
        else:
            arguments += [option, str(folder)]
    if not arguments:
        pytest.skip("; ".join(absent))
    return arguments


@pytest.mark.slow
def test_exported_files_load_in_invokeai_and_forge_by_their_own_code(tmp_path):
    arguments = client_arguments()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_client_loaders.py"), *arguments,
                             "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny") or line.startswith("| sdxl")]
    assert len(rows) == 5 * (len(arguments) // 2) and all(line.endswith("| ok |") for line in rows), result.stdout
    assert "every file loads in every client checked" in result.stdout
