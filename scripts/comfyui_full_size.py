"""WaveFT's own file in ComfyUI at SDXL's real size: a stage of the full-size rehearsal (CPU, random weights).

    python scripts/comfyui_full_size.py --model .cache/sdxl-full --adapter RUN/adapter --native FILE.safetensors
        [--steps 1] [--resolution 256] [--work DIR]

1. The example workflow `integrations/comfyui/example_workflow_api.json` (checkpoint, Load LoRA with the WaveFT
   file, prompts, KSampler, VAE decode, save) runs through ComfyUI's own executor (`execution.validate_prompt`,
   `execution.PromptExecutor`, headless) with the WaveFT node loaded by ComfyUI's custom-node loader. Changed
   for this model: the random SDXL exists only as a diffusers folder, so "Load Checkpoint" becomes ComfyUI's
   "DiffusersLoader" (same outputs: MODEL, CLIP, VAE), and the size and steps are `--resolution`, `--steps`.
   ComfyUI runs with `--cpu --fp16-unet` (weights held in fp16, computed in fp32). An image must come out.
2. The executed graph's Load LoRA output (from the executor's cache): the model must be ComfyUI's SDXL, and it
   must carry one WaveFT patch on each of SDXL's 560 attention projections, with no file key left unloaded.
   Each patched weight, `comfy.lora.calculate_weight` on the fp32 base weight, is compared with stock PEFT's
   merge of that layer (`WaveFTLinear.merge()` on the same fp32 weight; locations drawn once per layer size,
   PEFT's values): the worst error over the 560 layers, relative to each layer's largest delta entry, must be
   under 1e-5.

Prints a table (file sizes, times, worst error, peak RSS); exits 1 on any failure.
"""
import argparse
import json
import logging
import os
import resource
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
WORKFLOW = os.path.join(REPO, "integrations", "comfyui", "example_workflow_api.json")
SDXL_LAYERS = 560
TOLERANCE = 1e-5


class HeadlessServer:
    """What `PromptExecutor` asks of ComfyUI's web server, with no client to tell."""

    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass


class KeysNotLoaded(list):
    """A logging filter that collects ComfyUI's "lora key not loaded" / "NOT LOADED" warnings (and lets them pass)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        if message.startswith(("lora key not loaded", "NOT LOADED")):
            self.append(message)
        return True


def workflow_for(model: str, native: str, steps: int, resolution: int) -> dict:
    """The example workflow with the random model's loader, the native file, and a small size."""
    with open(WORKFLOW) as f:
        prompt = json.load(f)
    (checkpoint,) = [k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple"]
    prompt[checkpoint] = {"class_type": "DiffusersLoader", "inputs": {"model_path": os.path.basename(model)}}
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoraLoader":
            inputs["lora_name"] = os.path.basename(native)
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=resolution, height=resolution)
        elif node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt


def run_workflow(prompt: dict):
    """Execute `prompt` headless; returns the executor (its caches hold every node's outputs)."""
    import asyncio

    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise SystemExit(f"error: ComfyUI refused the workflow: {error} {node_errors}")
    executor = execution.PromptExecutor(HeadlessServer())
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        messages = [m for m in executor.status_messages if m[0] == "execution_error"]
        raise SystemExit(f"error: the workflow failed: {messages}")
    return executor


def compare_with_peft_merge(patcher, model: str, adapter: str):
    """Worst |ComfyUI's patched weight - PEFT's merged weight| / max |delta| over the layers, and the seconds
    ComfyUI's patching took. One layer's fp32 weights alive at a time."""
    import comfy.lora
    import torch
    from peft import PeftModel
    from peft.tuners.waveft.layer import WaveFTLayer
    from safetensors import safe_open

    from waveft.adapters.waveft_locations import shared_waveft_locations
    from waveft.export.source import kohya_name, read_unet_config, unet_skeleton

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with shared_waveft_locations():
        peft_model = PeftModel.from_pretrained(unet_skeleton(read_unet_config(model)), adapter)
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, WaveFTLayer)}
    worst, patch_seconds, compared = 0.0, 0.0, 0
    unet_file = next(os.path.join(model, "unet", f) for f in sorted(os.listdir(os.path.join(model, "unet")))
                     if f.endswith(".safetensors"))
    with safe_open(unet_file, framework="pt") as weights, torch.no_grad():
        for name, layer in layers.items():
            comfy_key = key_map[kohya_name(name)]
            patches = patcher.patches[comfy_key]
            assert len(patches) == 1 and type(patches[0][1]).__name__ == "WaveFTAdapter", (comfy_key, patches)
            base = weights.get_tensor(f"{name}.weight").float()
            start = time.perf_counter()
            patched = comfy.lora.calculate_weight(patches, base.clone(), comfy_key)
            patch_seconds += time.perf_counter() - start
            stand_in = layer.base_layer.weight
            layer.base_layer.weight = torch.nn.Parameter(base.clone(), requires_grad=False)
            layer.merge()
            merged = layer.base_layer.weight
            layer.base_layer.weight, layer.merged_adapters = stand_in, []
            largest = (merged - base).abs().max()
            if not largest > 0:
                raise SystemExit(f"error: layer {name}: PEFT's difference is zero (an untrained adapter?)")
            worst = max(worst, float((patched - merged).abs().max() / largest))
            compared += 1
    return worst, patch_seconds, compared, len(patcher.patches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the full-size SDXL diffusers folder")
    parser.add_argument("--adapter", required=True, help="the PEFT adapter folder the native file came from")
    parser.add_argument("--native", required=True, help="the native WaveFT file")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--work", default=os.path.join(REPO, ".cache", "rehearsal", "comfyui"))
    args = parser.parse_args(argv)

    from tests.comfyui_env import import_comfyui, load_waveft_node
    from waveft.io.adapter_folder import AdapterFolder

    import_comfyui(extra_args=("--fp16-unet",))
    import folder_paths

    folder_paths.add_model_folder_path("diffusers", os.path.dirname(os.path.abspath(args.model)))
    folder_paths.add_model_folder_path("loras", os.path.dirname(os.path.abspath(args.native)))
    folder_paths.set_output_directory(os.path.join(args.work, "output"))
    load_waveft_node()
    unloaded = KeysNotLoaded()
    logging.getLogger().addFilter(unloaded)

    prompt = workflow_for(args.model, args.native, args.steps, args.resolution)
    start = time.perf_counter()
    executor = run_workflow(prompt)
    workflow_seconds = time.perf_counter() - start
    (lora_node,) = [k for k, v in prompt.items() if v["class_type"] == "LoraLoader"]
    patcher = executor.caches.outputs.get(lora_node)[0][0]
    images = executor.history_result["outputs"]
    saved = [i["filename"] for out in images.values() for i in out.get("images", [])]

    import comfy.model_base
    import comfy.sd
    import comfy.utils

    is_sdxl = isinstance(patcher.model, comfy.model_base.SDXL)
    start = time.perf_counter()  # the Load LoRA node's own work again, timed: read the file, claim its keys
    loaded = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(args.native, safe_load=True),
                                           1.0, 0)[0]
    load_seconds = time.perf_counter() - start
    del loaded
    worst, patch_seconds, compared, patched_keys = compare_with_peft_merge(patcher, args.model, args.adapter)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    native_bytes = os.path.getsize(args.native)
    peft_bytes = AdapterFolder(args.adapter).weights_bytes()

    print(f"\n## WaveFT's own file in ComfyUI (full-size random SDXL, CPU, {args.resolution} px, {args.steps} step)\n")
    print("| | value |\n|---|---|")
    print(f"| native file / PEFT file | {native_bytes / 2**20:.2f} MiB / {peft_bytes / 2**20:.2f} MiB |")
    print(f"| model detected as SDXL by ComfyUI | {is_sdxl} ({type(patcher.model).__name__}) |")
    print(f"| layers patched (WaveFT) / compared with PEFT's merge | {patched_keys} / {compared} |")
    print(f"| worst error vs PEFT merge (of the layer's largest delta entry, fp32) | {worst:.2e} |")
    print(f"| file keys left unloaded | {len(unloaded)} |")
    print(f"| Load LoRA: read + load_lora_for_models | {load_seconds:.1f} s |")
    print(f"| building and adding all 560 differences (calculate_weight) | {patch_seconds:.1f} s |")
    print(f"| workflow through PromptExecutor (load, encode, sample, decode, save) | {workflow_seconds:.0f} s |")
    print(f"| image saved | {', '.join(saved) or 'none'} |")
    print(f"| peak RSS | {peak_gb:.1f} GB |")
    failures = []
    if not is_sdxl:
        failures.append(f"ComfyUI detected {type(patcher.model).__name__}, not SDXL")
    if (patched_keys, compared) != (SDXL_LAYERS, SDXL_LAYERS):
        failures.append(f"{patched_keys} weights patched, {compared} compared; SDXL has {SDXL_LAYERS}")
    if not worst < TOLERANCE:
        failures.append(f"worst error {worst:.2e} >= {TOLERANCE}")
    if unloaded:
        failures.append(f"{len(unloaded)} keys not loaded, e.g. {unloaded[0]}")
    if not saved:
        failures.append("the workflow saved no image")
    for failure in failures:
        print(f"error: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
