"""Shared fixtures: the built-in tiny SDXL and a synthetic subject, built once per test session (plain helpers:
tests/helpers.py)."""
import pytest


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from waveft.tiny import build_tiny_sdxl

    path = str(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    build_tiny_sdxl(path)
    return path


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> str:
    from waveft.data import write_synthetic_subject

    path = str(tmp_path_factory.mktemp("data") / "toy_ball")
    write_synthetic_subject(path)
    return path
