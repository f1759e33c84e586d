"""PEFT's own WaveFT test cases, run against the structured layer.

    python scripts/peft_conformance.py [-x] [extra pytest arguments]

Takes `tests/` from the source distribution of the installed (pinned) PEFT version, fetched once from PyPI
with `pip download --no-binary :all: --no-deps peft==<version>` into `.cache/peft-conformance/`, and runs
`tests/test_custom_models.py -k WaveFT` in this process with every WaveFT layer PEFT creates (through
`get_peft_model`, `inject_adapter_in_model`, `PeftModel.from_pretrained`, `add_weighted_adapter`, ...) made a
`StructuredWaveFTLinear` instead of PEFT's `WaveFTLinear`. Fails if any case fails or if no structured layer
was created (a suite that silently tested stock PEFT). Needs `datasets` (PEFT's testing_utils imports it).
"""
import os
import shutil
import subprocess
import sys
import tarfile
import time

import peft
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "peft-conformance")
TEST_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")


def peft_tests_dir(version: str = peft.__version__) -> str:
    """`tests/` of PEFT's sdist for `version` as an importable package under CACHE (downloaded once)."""
    tests = os.path.join(CACHE, version, "peft_tests")
    if os.path.isfile(os.path.join(tests, "__init__.py")):
        return tests
    sdist = os.path.join(CACHE, f"peft-{version}.tar.gz")
    if not os.path.isfile(sdist):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             f"peft=={version}", "-d", CACHE],
            check=True,
        )  # fmt: skip
    partial = tests + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)  # (and its parent)
    with tarfile.open(sdist) as archive:
        for name in TEST_FILES:
            member = archive.getmember(f"peft-{version}/tests/{name}")
            with archive.extractfile(member) as src, open(os.path.join(partial, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
    # The tests import each other relatively (`from .testing_common import ...`); the sdist omits the marker.
    open(os.path.join(partial, "__init__.py"), "w").close()
    os.replace(partial, tests)
    return tests


class StructuredLayerPlugin:
    """Makes PEFT's WaveFT tuner create `StructuredWaveFTLinear` layers and counts them."""

    def __init__(self):
        self.created = 0

    def pytest_configure(self, config):
        from peft.tuners.waveft import model as waveft_model

        from waveft.adapters.structured_waveft.layer import StructuredWaveFTLinear

        create = waveft_model.WaveFTModel._create_new_module
        plugin = self

        def create_structured(waveft_config, adapter_name, target, **kwargs):
            module = create(waveft_config, adapter_name, target, **kwargs)
            module.__class__ = StructuredWaveFTLinear  # as enable_structured_waveft switches a layer
            plugin.created += 1
            return module

        waveft_model.WaveFTModel._create_new_module = staticmethod(create_structured)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(f"structured WaveFT layers created by PEFT's tuner: {self.created}")

    def pytest_sessionfinish(self, session, exitstatus):
        if exitstatus == 0 and self.created == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # nothing exercised the structured layer


def main(argv=None) -> int:
    tests = peft_tests_dir()
    start = time.perf_counter()
    plugin = StructuredLayerPlugin()
    args = [
        os.path.join(tests, "test_custom_models.py"), "-k", "WaveFT", "-q", "-p", "no:cacheprovider",
        "--rootdir", os.path.dirname(tests), "-c", os.devnull,  # not PEFT's pytest settings (coverage)
        "--disable-warnings", *(sys.argv[1:] if argv is None else argv),
    ]  # fmt: skip
    status = pytest.main(args, plugins=[plugin])
    print(f"PEFT {peft.__version__} WaveFT cases with the structured layer: {time.perf_counter() - start:.0f} s")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
