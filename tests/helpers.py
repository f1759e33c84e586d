"""Helpers the tests share (no tests here): the repository root, the tiny SDXL UNet and a fixed forward pass,
and synthetic DreamBooth-style inputs for the eval tests: a prompts file with the published file's exact
structure, a benchmark folder of random real images, and a generated-images folder with a manifest."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from eval import tiny_benchmark

REPO = str(Path(__file__).resolve().parents[1])

OBJECT_TEMPLATES = ["a {0} {1} in the jungle", "a {0} {1} on the beach", "a red {0} {1}"]
LIVE_TEMPLATES = ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat", "a cube shaped {0} {1}"]
SUBJECTS = {"backpack": "backpack", "dog": "dog", "cat2": "cat", "bear_plushie": "stuffed animal"}


def prompts_file_text(subjects: dict[str, str] = SUBJECTS, object_templates=OBJECT_TEMPLATES,
                      live_templates=LIVE_TEMPLATES) -> str:
    return tiny_benchmark.prompts_file_text(subjects, object_templates, live_templates)


def random_image(rng: np.random.Generator, height: int = 48, width: int = 56) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_benchmark(root: Path, real_images: int = 3, seed: int = 0) -> Path:
    """root/dataset/<subject>/NN.jpg and root/dataset/prompts_and_classes.txt."""
    rng = np.random.default_rng(seed)
    (root / "dataset").mkdir(parents=True)
    (root / "dataset" / "prompts_and_classes.txt").write_text(prompts_file_text())
    for subject in SUBJECTS:
        (root / "dataset" / subject).mkdir()
        for i in range(real_images):
            random_image(rng).save(root / "dataset" / subject / f"{i:02d}.jpg")
    return root


def write_generated(folder: Path, subjects=("backpack", "dog"), prompts: int = 2, seeds=(42, 43),
                    run_info: dict | None = None, seed: int = 1) -> list[dict]:
    """Random PNGs with a manifest.jsonl in the layout eval.generate_benchmark writes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in subjects:
        class_noun = SUBJECTS[subject]
        for prompt_index in range(prompts):
            for image_seed in seeds:
                row = {"file": f"{subject}/p{prompt_index:03d}_s{image_seed}.png", "subject": subject,
                       "prompt": f"a zjw {class_noun} scene {prompt_index}", "prompt_index": prompt_index,
                       "seed": image_seed, "identifier": "zjw", "class_noun": class_noun}
                (folder / subject).mkdir(exist_ok=True)
                random_image(rng, 64, 64).save(folder / row["file"])
                rows.append(row)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if run_info is not None:
        (folder / "run_info.json").write_text(json.dumps(run_info))
    return rows


def run_info(method: str = "waveft", budget: float | None = 1.0, subject: str = "dog") -> dict:
    """A run_info.json as the trainer writes it (every required key of RunInfo)."""
    return {"method": method, "adapter_type": method, "seed": 0, "implementation": "structured", "budget": budget,
            "trainable_parameters": 1451520 if budget is None else int(1451520 * budget), "adapted_layers": 64,
            "subject": subject, "class_noun": SUBJECTS[subject], "identifier": "zjw",
            "instance_prompt": f"a zjw {SUBJECTS[subject]}", "base_model": "tiny-sdxl", "vae": None, "steps": 2,
            "final_loss": 0.1, "train_seconds": 1.0}


def tiny_unet():
    """The tiny SDXL UNet with fixed random weights, frozen (no pipeline folder needed)."""
    import torch
    from diffusers import UNet2DConditionModel

    from waveft.fixtures.tiny import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).requires_grad_(False)


def unet_output(unet, batch: int = 2):
    """The UNet's prediction for fixed random latents, timesteps and SDXL conditioning of the tiny model's sizes."""
    import torch

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    hidden = torch.randn(batch, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return unet(sample, timesteps, hidden, added_cond_kwargs=added).sample


# ---- trainer runs on the tiny SDXL ------------------------------------------------------------------------


def tiny_cfg(tiny_sdxl_dir, subject_dir, output_dir, *overrides):
    """configs/tiny.yaml at 32 px on the given model and subject, no trackers or samples, plus `overrides`."""
    from waveft.config import load_config

    return load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        (
            f"output_dir={output_dir}",
            f"model.pretrained={tiny_sdxl_dir}",
            f"data.instance_dir={subject_dir}",
            "data.resolution=32",
            "train.report_to=none",
            "validation.final=false",
            "validation.every_steps=0",
            *overrides,
        ),
    )


def run_tiny_training(tiny_sdxl_dir, subject_dir, output_dir, *overrides, env=None,
                      timeout=None) -> subprocess.CompletedProcess:
    """The training CLI with configs/tiny.yaml on the given model, subject and output folder, plus `overrides`."""
    return subprocess.run(
        [sys.executable, "train_dreambooth_waveft.py", "--config", "configs/tiny.yaml", f"output_dir={output_dir}",
         f"model.pretrained={tiny_sdxl_dir}", f"data.instance_dir={subject_dir}", *overrides],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def load_text_encoder(tiny_sdxl_dir, component: str):
    """One of the tiny model's text encoders (`component`: text_encoder, text_encoder_2), as saved."""
    from waveft.models import text_encoder_class

    return text_encoder_class(component).from_pretrained(tiny_sdxl_dir, subfolder=component)


def fresh_unet(tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def peft_weights(adapter_folder) -> dict:
    """The tensors of an adapter folder's PEFT weights file (the UNet's, or a text encoder's subfolder)."""
    from safetensors.torch import load_file

    from waveft.io.adapter_folder import AdapterFolder

    return load_file(AdapterFolder(str(adapter_folder)).weights)


def adapter_weights(folder):
    """The final adapter's weights of the training run in `folder`."""
    return peft_weights(os.path.join(folder, "adapter"))


def interrupted_copy(full, split, checkpoint_step: int) -> None:
    """`split`: the run folder `full` as it was right after its checkpoint at `checkpoint_step` was written, a
    copy without the final adapters, run_info.json or any later checkpoint (what resuming it must redo)."""
    import shutil

    from waveft.io.run_folder import RunFolder
    from waveft.train.checkpointing import list_checkpoints

    shutil.copytree(full, split)
    run = RunFolder(str(split))
    for step, path in list_checkpoints(run.root):
        if step > checkpoint_step:
            shutil.rmtree(path)
    for final in (run.adapter, run.adapter_raw):
        shutil.rmtree(final, ignore_errors=True)
    Path(run.run_info).unlink(missing_ok=True)


def assert_resumed_not_redone(run_info, checkpoint_step: int, accumulation: int) -> None:
    """The resumed invocation started at its checkpoint and trained only the micro-batches after it. Comparing
    adapters cannot see this: randomness is keyed by step, so a run silently restarted from step 0 ends equal."""
    assert run_info.first_step == checkpoint_step
    assert run_info.micro_batches_trained == (run_info.steps - checkpoint_step) * accumulation
