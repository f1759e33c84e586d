"""The exported LoRA and full-difference files load in InvokeAI and Forge, by their own loader code
(scripts/check_client_loaders.py). InvokeAI's source comes from its PyPI release (`bash
scripts/fetch_client_sources.sh`, which CI runs: .cache/clients/); Forge, not released there, from a checkout at
.cache/clients/ or ../shared/vendor/. A client whose source or import packages are absent is skipped, saying why."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.check_client_loaders import FORGE_PACKAGES, INVOKEAI_PACKAGES, missing_packages
from tests.comfyui_env import vendored_source

REPO = Path(__file__).resolve().parents[1]
CLIENT_CACHE = REPO / ".cache" / "clients"  # scripts/fetch_client_sources.sh
PACKAGES = CLIENT_CACHE / "packages"
CLIENTS = {"--invokeai": ("InvokeAI", "invokeai/backend/patches/layer_patcher.py", INVOKEAI_PACKAGES),
           "--forge": ("stable-diffusion-webui-forge", "repositories/huggingface_guess/huggingface_guess/detection.py",
                       FORGE_PACKAGES)}


def source_dir(name: str, marker: str) -> Path | None:
    """.cache/clients/<name>, or shared/vendor/<name> beside the checkout or a folder above it (a worktree)."""
    if (CLIENT_CACHE / name / marker).is_file():
        return CLIENT_CACHE / name
    return vendored_source(name, marker)


def client_arguments() -> list[str]:
    arguments, absent = [], []
    for option, (name, marker, packages) in CLIENTS.items():
        folder = source_dir(name, marker)
        missing = missing_packages(packages, str(PACKAGES))
        if folder is None:
            absent.append(f"{name}'s source is not at .cache/clients/{name} or ../shared/vendor/{name} "
                          f"(bash scripts/fetch_client_sources.sh gets InvokeAI's)")
        elif missing:
            absent.append(f"{name}'s imports need {', '.join(missing)} (bash scripts/fetch_client_sources.sh)")
        else:
            arguments += [option, str(folder)]
    if not arguments:
        pytest.skip("; ".join(absent))
    if absent:
        print("not checked:", "; ".join(absent))
    return arguments


@pytest.mark.slow
def test_exported_files_load_in_invokeai_and_forge_by_their_own_code(tmp_path):
    arguments = client_arguments()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(PACKAGES)]))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_client_loaders.py"), *arguments,
                             "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny") or line.startswith("| sdxl")]
    assert len(rows) == 5 * (len(arguments) // 2) and all(line.endswith("| ok |") for line in rows), result.stdout
    assert "every file loads in every client checked" in result.stdout
