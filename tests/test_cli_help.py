"""Every command answers --help without loading a model library, and explains every option it has."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

HEAVY_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")
COMMANDS = [  # (how it is run: a module or a script, its name)
    ("script", "train_dreambooth_waveft.py"),
    ("module", "waveft.generate"),
    ("module", "waveft.export"),
    ("module", "waveft.tiny"),
    ("module", "eval.generate_benchmark"),
    ("module", "eval.score"),
    ("module", "eval.report"),
    ("script", "scripts/sweep.py"),
    ("module", "eval.tiny_encoders"),
    ("module", "eval.tiny_benchmark"),
]

# Runs the command's --help in a fresh interpreter, keeping every parser that parsed, and prints what the test
# checks: the options without help text and the heavy libraries imported by then.
PROBE = """
import argparse, json, runpy, sys
kind, name, heavy = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
parsers = []
parse_known_args = argparse.ArgumentParser.parse_known_args
def recording(self, *args, **kwargs):
    parsers.append(self)
    return parse_known_args(self, *args, **kwargs)
argparse.ArgumentParser.parse_known_args = recording
sys.argv = [name, "--help"]
try:
    runpy.run_path(name, run_name="__main__") if kind == "script" else runpy.run_module(name, run_name="__main__")
except SystemExit:
    pass
undocumented = [action.option_strings[0] if action.option_strings else action.dest
                for parser in parsers for action in parser._actions
                if not isinstance(action, argparse._HelpAction) and not action.help]
print(json.dumps({"parsers": len(parsers), "undocumented": undocumented,
                  "heavy": [lib for lib in heavy if lib in sys.modules]}))
"""


@pytest.mark.parametrize("kind,name", COMMANDS, ids=[name for _, name in COMMANDS])
def test_help_loads_no_model_library_and_explains_every_option(kind, name):
    result = subprocess.run([sys.executable, "-c", PROBE, kind, name, ",".join(HEAVY_LIBRARIES)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["parsers"] >= 1, f"{name} --help parsed nothing"
    assert found["undocumented"] == [], f"{name}: options without help text"
    assert found["heavy"] == [], f"{name} --help imported {found['heavy']}"
