"""Shared fixtures: the built-in tiny SDXL and a synthetic subject, built once per test session, and ComfyUI's
real code imported (plain helpers: tests/helpers.py)."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def process_set_up():
    """What every entry point of the project does first (registers WaRA with PEFT)."""
    from waveft.entry import set_up_process

    set_up_process()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from waveft.fixtures.tiny import build_tiny_sdxl

    path = str(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    build_tiny_sdxl(path)
    return path


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> str:
    from waveft.fixtures.synthetic_subject import write_synthetic_subject

    path = str(tmp_path_factory.mktemp("data") / "toy_ball")
    write_synthetic_subject(path)
    return path


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `comfy` package imported on CPU with this project's node loaded (tests/comfyui_env.py); skips,
    saying why, where its source is absent."""
    from tests.comfyui_env import ABSENT, comfyui_dir, load_waveft_node

    if comfyui_dir() is None:
        pytest.skip(ABSENT)
    load_waveft_node()  # imports ComfyUI first
    return __import__("comfy")
