"""The adapter's PEFT-format files and resumable training checkpoints, each written atomically."""
import json
import os
import shutil

import torch

from waveft.io.adapter_folder import AdapterFolder, load_adapter_weights, save_adapter
from waveft.io.files import atomic_directory
from waveft.io.run_folder import RunFolder

STEP_HOOK_STATE = "step_hook.pt"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = RunFolder.CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, RunFolder.TRAINING_STATE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def save_checkpoint(output_dir: str, step: int, unet, optimizer, lr_scheduler, scaler, state: dict,
                    total_limit, ema=None, step_hook=None, text_encoders: dict | None = None) -> str:
    """Adapter (the UNet's, and `text_encoders`' {component: adapted encoder} in its subfolders) + optimizer + LR
    schedule (+ fp16 loss scaler, + EMA, + the method's step hook's state: AdaLoRA's rank schedule) + loop state,
    written atomically, then prune past `total_limit`."""
    path = RunFolder(output_dir).checkpoint(step)
    with atomic_directory(path) as staging:
        save_adapter(unet, os.path.join(staging, RunFolder.ADAPTER), text_encoders=text_encoders)
        torch.save(optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
        torch.save(lr_scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
        if scaler is not None:
            torch.save(scaler.state_dict(), os.path.join(staging, "scaler.pt"))
        if ema is not None:
            torch.save(ema.state_dict(), os.path.join(staging, "ema.pt"))
        if step_hook is not None:
            torch.save(step_hook.state_dict(), os.path.join(staging, STEP_HOOK_STATE))
        with open(os.path.join(staging, RunFolder.TRAINING_STATE), "w") as f:
            json.dump(state, f, indent=2, allow_nan=False)
    if total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return path


def load_checkpoint(path: str, unet, optimizer, lr_scheduler, scaler, ema=None, step_hook=None,
                    text_encoders: dict | None = None) -> dict:
    """Restore what `save_checkpoint` wrote into the live objects (`text_encoders`: {component: adapted encoder},
    as saved); return the loop state it saved."""
    # map_location: every process would otherwise load the saving process's GPU tensors onto that GPU.
    def load(name):
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)

    adapter = AdapterFolder(os.path.join(path, RunFolder.ADAPTER))
    load_adapter_weights(unet, adapter.root)
    for component, encoder in (text_encoders or {}).items():
        load_adapter_weights(encoder, adapter.text_encoder(component).root)
    optimizer.load_state_dict(load("optimizer.pt"))
    lr_scheduler.load_state_dict(load("scheduler.pt"))
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        scaler.load_state_dict(load("scaler.pt"))
    if ema is not None:
        ema.load_state_dict(load("ema.pt"))
    if step_hook is not None:
        step_hook.load_state_dict(load(STEP_HOOK_STATE), next(unet.parameters()).device)
    with open(os.path.join(path, RunFolder.TRAINING_STATE)) as f:
        return json.load(f)
