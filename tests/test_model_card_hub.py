"""The adapter's model card as the Hub reads it (huggingface_hub's own parsing), and `hub.push`: the upload's
arguments at the end of a run, and a failed upload (offline) as one error line that leaves the run intact."""
import json
import os

import pytest

from tests.helpers import run_tiny_training, tiny_cfg
from waveft.errors import UserError


def run_info():
    from waveft.io.run_folder import PlannedExport, RunInfo

    return RunInfo(method="waveft", adapter_type="waveft", seed=42, implementation="structured", budget=1.0,
                   trainable_parameters=4096, adapted_layers=64, subject="toy_ball", class_noun="ball",
                   identifier="zjw", instance_prompt="a zjw ball",
                   base_model="stabilityai/stable-diffusion-xl-base-1.0",
                   vae=None, steps=500, final_loss=0.1, train_seconds=1.0, budget_settings={"n_frequency": 64},
                   budget_target_parameters=4096, budget_parameters=4096,
                   exports=[PlannedExport("lora", "toy_ball_waveft_lora_r32.safetensors", "fp16", rank=32)])


def test_model_card_metadata_round_trips_through_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard, metadata_load

    from waveft.io.adapter_folder import model_card

    widget = [{"text": "a zjw ball on the beach", "output": {"url": "samples/p001_s0.png"}}]
    model_card(run_info(), widget).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert card.data.instance_prompt == "a zjw ball" and card.data.license == "openrail++"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-to-image"
    assert {"stable-diffusion-xl", "dreambooth", "waveft"} <= set(card.data.tags)
    assert card.data.widget == widget
    assert metadata_load(tmp_path / "README.md") == card.data.to_dict()
    assert "budget 1 in LoRA-rank-1 units" in card.text and "`toy_ball_waveft_lora_r32.safetensors`" in card.text
    assert "PeftModel.from_pretrained" in card.text and "<lora:toy_ball_waveft_lora_r32:1>" in card.text


def test_hub_push_needs_a_repo_id():
    from waveft.config import load_config

    with pytest.raises(UserError, match="'hub.push' needs 'hub.repo_id'"):
        load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", "hub.push=true"))


@pytest.mark.slow
def test_a_run_uploads_its_adapter_folder_with_its_samples_as_the_card_widget(
        tiny_sdxl_dir, subject_dir, tmp_path, monkeypatch):
    from huggingface_hub import CommitInfo, HfApi, ModelCard

    from waveft.train.loop import train

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(self, **kw):  # what the Hub would receive: the folder as it is at the upload
        calls.append(("upload", kw["repo_id"], sorted(os.listdir(kw["folder_path"]))))
        return CommitInfo("https://huggingface.co/me/ball/commit/abc", "", "", "abc0123456789")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=1", "train.checkpointing_steps=0",
                   "validation.final=true", "validation.steps=2", "validation.seeds=[0]",
                   "hub.push=true", "hub.repo_id=me/ball"))
    assert calls == [("create", "me/ball", {"private": True, "exist_ok": True}),
                     ("upload", "me/ball", ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                            "samples", "waveft_run.json"])]
    card = ModelCard.load(out / "adapter" / "README.md")
    urls = [entry["output"]["url"] for entry in card.data.widget]
    assert len(urls) == 2 and all((out / "adapter" / url).is_file() for url in urls)  # 2 prompts x 1 seed
    assert [entry["text"] for entry in card.data.widget] == ["a zjw ball", "a a zjw ball on the beach"]


@pytest.mark.slow
def test_an_upload_that_fails_is_one_error_line_and_the_run_stays(tiny_sdxl_dir, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = run_tiny_training(
        tiny_sdxl_dir, subject_dir, out, "data.resolution=32", "train.max_steps=1", "train.report_to=none",
        "validation.final=false", "validation.every_steps=0", "hub.push=true", "hub.repo_id=me/ball",
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hub.push: uploading") and "offline mode is enabled" in last
    assert "Traceback" not in result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "README.md").is_file()
    assert json.loads((out / "run_info.json").read_text())["steps"] == 1
