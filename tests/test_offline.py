"""Offline, a Hub id that the local cache lacks is refused at once in one line naming it and HF_HUB_OFFLINE,
whether the user said so (HF_HUB_OFFLINE=1) or the Hub's host does not resolve (a `.invalid` endpoint, which never
does: RFC 6761)."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

MISSING_ID = "no-such-owner/no-such-model"
COMMANDS = {  # the command, and the setting it names
    "train": (["train_dreambooth_waveft.py", "--config", "configs/tiny.yaml", f"model.pretrained={MISSING_ID}",
               "model.build_tiny_if_missing=false", "output_dir={tmp}/run"], "model.pretrained"),
    "generate": (["-m", "waveft.generate", "--base", MISSING_ID, "--prompt", "p", "--out", "{tmp}/images"], "--base"),
    "export": (["-m", "waveft.export", "--adapter", "{tmp}", "--format", "lora", "--out", "{tmp}/x.safetensors",
                "--base", MISSING_ID], "--base"),
    "score": (["-m", "eval.score", "--images", "{tmp}", "--real", "{tmp}", "--out", "{tmp}/scores", "--dino",
               MISSING_ID], "--dino"),
}
OFFLINE = {"said": {"HF_HUB_OFFLINE": "1"}, "no network": {"HF_ENDPOINT": "https://huggingface.invalid"}}


@pytest.mark.parametrize("offline", sorted(OFFLINE))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_hub_id_missing_offline_is_one_line_naming_it(command, offline, tmp_path):
    args, setting = COMMANDS[command]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(OFFLINE[offline], PYTHONPATH=REPO, HF_HOME=str(tmp_path / "hf"))  # an empty cache
    result = subprocess.run([sys.executable, *(a.format(tmp=tmp_path) for a in args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {setting} '{MISSING_ID}'") and "HF_HUB_OFFLINE" in line, line
    assert ("huggingface.invalid cannot be resolved" in line) == (offline == "no network"), line
    assert "Retrying" not in result.stderr


@pytest.mark.parametrize("pretrained", [MISSING_ID, "{tmp}/models/tiny-sdxI"])  # a Hub id; a mistyped folder
def test_the_tiny_config_builds_its_model_only_into_its_own_folder(pretrained, tmp_path):
    """configs/tiny.yaml builds the random-weight model if missing: a Hub id or a typo must be refused, not
    become a random model (nothing is created)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, HF_HOME=str(tmp_path / "hf"))
    target = pretrained.format(tmp=tmp_path)
    result = subprocess.run(  # from an empty folder: a Hub id must not become a folder there
        [sys.executable, os.path.join(REPO, "train_dreambooth_waveft.py"), "--config",
         os.path.join(REPO, "configs", "tiny.yaml"), f"model.pretrained={target}", f"output_dir={tmp_path}/run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.pretrained") and target in line, line
    assert not os.path.exists(tmp_path / target) and not os.path.exists(tmp_path / "run")
