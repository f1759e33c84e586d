"""The adapter folder: PEFT's two files (adapter_config.json, adapter_model.safetensors), saved and loaded, the
run's record beside them (waveft_run.json) and its model card (README.md: huggingface_hub's ModelCard, with the
final samples in samples/ as its widget). `AdapterFolder` is the one home of these file names."""
import json
import os
import shutil

from waveft.errors import UserError
from waveft.io.files import FolderLayout, atomic_directory, give_usual_permissions, inside, write_text_atomic
from waveft.io.run_folder import PlannedExport, RunFolder, RunInfo


class AdapterFolder(FolderLayout):
    """The paths inside one adapter folder (a run's `adapter/`, a checkpoint's, or any PEFT adapter)."""

    CONFIG = "adapter_config.json"  # PEFT's
    WEIGHTS = "adapter_model.safetensors"  # PEFT's
    RUN_RECORD = "waveft_run.json"  # RunInfo.adapter_metadata(): what travels with the adapter
    MODEL_CARD = "README.md"
    CARD_SAMPLES = "samples"  # the final samples the model card's widget shows
    # adapter.text_encoders: each encoder's adapter in a subfolder named after its diffusers component, itself a
    # PEFT adapter folder (PeftModel.from_pretrained(CLIPTextModel, that subfolder)); the UNet's stays at the root.
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

    config = inside("CONFIG")
    weights = inside("WEIGHTS")
    run_record = inside("RUN_RECORD")
    model_card = inside("MODEL_CARD")
    card_samples = inside("CARD_SAMPLES")

    def is_adapter(self) -> bool:
        return os.path.isfile(self.config)

    def text_encoder(self, component: str) -> "AdapterFolder":
        """The adapter folder of one text encoder (`component` in TEXT_ENCODERS), whether or not it exists."""
        if component not in self.TEXT_ENCODERS:
            raise ValueError(f"{component!r} is not one of {self.TEXT_ENCODERS}")
        return AdapterFolder(os.path.join(self.root, component))

    def text_encoder_adapters(self) -> dict[str, "AdapterFolder"]:
        """{component: its adapter folder} for the text encoders this adapter adapts ({} for a UNet-only one)."""
        found = {name: self.text_encoder(name) for name in self.TEXT_ENCODERS}
        return {name: folder for name, folder in found.items() if folder.is_adapter()}

    @classmethod
    def find(cls, path: str, option: str = "--adapter") -> "AdapterFolder":
        """The adapter folder that `path` names: the folder itself, or a training run's `adapter/`. A path that
        does not exist, or holds neither, is a UserError naming it and `option`."""
        for folder in (cls(path), cls(RunFolder(path).adapter)):
            if folder.is_adapter():
                return folder
        if not os.path.exists(path):
            raise UserError(f"{option} {path}: no such folder")
        raise UserError(f"{option} {path} is neither an adapter folder ({cls.CONFIG}) nor a training run's folder "
                        f"(with {RunFolder.ADAPTER}/{cls.CONFIG})")

    def read_run_record(self) -> dict:
        """waveft_run.json ({} for an adapter this project's trainer did not write); invalid JSON raises
        json.JSONDecodeError."""
        if not os.path.isfile(self.run_record):
            return {}
        with open(self.run_record) as f:
            return json.load(f)

    def check_weights(self) -> None:
        """Refuse a missing or damaged weights file (truncated, or not safetensors: safetensors checks that the
        header covers the file exactly) before any model loads; only the header is read."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(self.weights):
            raise UserError(f"adapter folder {self.root}: {self.WEIGHTS} is missing")
        try:
            with safe_open(self.weights, "pt"):
                pass
        except SafetensorError as exc:
            raise UserError(f"{self.weights}: damaged adapter weights ({exc}); train again or restore the "
                            f"file") from None

    def weights_bytes(self) -> int:
        """The adapter's size on disk: its weights file alone (exports written beside it are not the adapter)."""
        return os.path.getsize(self.weights)


SDXL_LICENSE = "openrail++"  # SDXL base 1.0's license, which an adapter trained on it carries
# PeftModel.save_pretrained writes keys under this prefix; writing the same keys keeps files interchangeable.
PEFT_MODEL_PREFIX = "base_model.model."


def save_adapter(unet, path: str, adapter_name: str = "default", run_info: RunInfo | None = None,
                 text_encoders: dict | None = None) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` exactly as `PeftModel.save_pretrained` would;
    with `text_encoders` ({component in AdapterFolder.TEXT_ENCODERS: its adapted encoder}), each encoder's the
    same way in its subfolder; with `run_info`, the run's record (waveft_run.json) and the model card beside
    them. All of it appears at once (one atomic directory)."""
    with atomic_directory(path) as staging:
        folder = AdapterFolder(staging)
        _write_peft_files(unet, folder, adapter_name)
        for component, encoder in (text_encoders or {}).items():
            _write_peft_files(encoder, folder.text_encoder(component), adapter_name)
        if run_info is not None:
            with open(folder.run_record, "w") as f:
                json.dump(run_info.adapter_metadata(), f, indent=2, allow_nan=False)
            model_card(run_info).save(folder.model_card)


def _write_peft_files(model, folder: AdapterFolder, adapter_name: str) -> None:
    """PeftModel.save_pretrained's two files for `model`'s adapter (a diffusers or transformers model adapted
    through `add_adapter`: no PeftModel around it), into `folder`, created if missing."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {PEFT_MODEL_PREFIX + key: value.detach().contiguous().cpu() for key, value in state.items()}
    os.makedirs(folder.root, exist_ok=True)
    model.peft_config[adapter_name].save_pretrained(folder.root)
    save_file(state, folder.weights, metadata={"format": "pt"})
    give_usual_permissions(folder.weights)


def add_card_samples(path: str, samples: list[tuple[str, str]], run: RunInfo) -> None:
    """Copy the final samples, (image file, its prompt) pairs, into the adapter folder's `samples/` and rewrite
    the model card with them as its widget, so that the Hub shows them. Cost: one file copy each."""
    folder = AdapterFolder(path)
    shutil.rmtree(folder.card_samples, ignore_errors=True)  # an earlier run's samples
    os.makedirs(folder.card_samples)
    widget = []
    for image, prompt in samples:
        shutil.copyfile(image, os.path.join(folder.card_samples, os.path.basename(image)))
        widget.append({"text": prompt, "output": {"url": f"{AdapterFolder.CARD_SAMPLES}/{os.path.basename(image)}"}})
    write_text_atomic(folder.model_card, str(model_card(run, widget)))


def model_card(run: RunInfo, widget: list[dict] | None = None):
    """The Hub's model card (huggingface_hub.ModelCard): metadata the Hub reads (base model, instance prompt,
    tags, license, sample widget: [{"text": prompt, "output": {"url": file in this folder}}]), then what the
    adapter is, its budget, and which file loads in which tool."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=run.base_model,
        library_name="peft",
        license=SDXL_LICENSE,
        pipeline_tag="text-to-image",
        tags=["text-to-image", "stable-diffusion-xl", "diffusers", "dreambooth", "peft", run.adapter_type,
              "waveft-sdxl"],
        instance_prompt=run.instance_prompt,
        widget=widget or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{model_card_body(run)}")


def _budget_line(run: RunInfo) -> str:
    if run.budget is None:
        return "the method's settings as given (no budget)"
    return (f"budget {run.budget:g} in LoRA-rank-1 units ({run.budget_target_parameters:,} parameters asked, "
            f"{run.budget_parameters:,} reached with {run.budget_settings})")


def _text_encoders_line(run: RunInfo) -> str:
    if not run.text_encoders:
        return ""
    parts = [f"`{name}` ({info['trainable_parameters']:,} trainable parameters on {info['adapted_layers']} layers)"
             for name, info in run.text_encoders.items()]
    return f"- the text encoders adapted too, with the same method and budget unit: {', '.join(parts)}\n"


def _text_encoder_rows(run: RunInfo) -> str:
    return "".join(f"| `{name}/` | the {name} adapter in PEFT's format | PEFT (`PeftModel.from_pretrained`) |\n"
                   for name in run.text_encoders or {})


def _text_encoder_loads(run: RunInfo) -> str:
    return "".join(f'pipe.{name} = PeftModel.from_pretrained(pipe.{name}, "path/to/this/folder/{name}")'
                   f".merge_and_unload()\n" for name in run.text_encoders or {})


def model_card_body(run: RunInfo) -> str:
    return f"""
# {run.method} DreamBooth adapter for SDXL: {run.subject}

- method: `{run.adapter_type}` ({run.trainable_parameters:,} trainable parameters on {run.adapted_layers} layers of the UNet); {_budget_line(run)}
{_text_encoders_line(run)}- trained for {run.steps} steps on the subject `{run.subject}`; instance prompt `{run.instance_prompt}`
- base model: `{run.base_model}`

| file | what | loads in |
|---|---|---|
| `{AdapterFolder.CONFIG}`, `{AdapterFolder.WEIGHTS}` | the adapter in PEFT's format | PEFT (`PeftModel.from_pretrained`), `waveft.generate` |
{_text_encoder_rows(run)}| `{AdapterFolder.RUN_RECORD}` | the run's details (method, budget, steps, cost) | any JSON reader |

```python
import torch
from diffusers import StableDiffusionXLPipeline
from peft import PeftModel

pipe = StableDiffusionXLPipeline.from_pretrained("{run.base_model}", torch_dtype=torch.bfloat16)
pipe.unet = PeftModel.from_pretrained(pipe.unet, "path/to/this/folder").merge_and_unload()
{_text_encoder_loads(run)}image = pipe("{run.instance_prompt} on the beach").images[0]
```
""" + model_card_section(run)  # noqa: E501 (the card's lines are markdown)


def model_card_section(run: RunInfo) -> str:
    """The model card's part on the exported files: which loads in which tool, and the lines each tool needs."""
    planned: list[PlannedExport] = run.exports or []
    if not planned:
        return ""
    rows = []
    for item in planned:
        if item.format == "lora":
            size = f"rank {item.rank}" if item.rank is not None else f"per-layer ranks keeping {item.energy:g} energy"
            rows.append(f"| `{item.file}` | kohya LoRA, {size}, {item.dtype} (an SVD approximation: its "
                        f"per-layer error is in the file's metadata) | ComfyUI, Forge / A1111, InvokeAI, diffusers |")
        elif item.format == "waveft":
            rows.append(f"| `{item.file}` | WaveFT's own file: the trained spectrum and its locations (lossless, "
                        f"the adapter's size) | ComfyUI with the WaveFT node |")
        else:
            rows.append(f"| `{item.file}` | full weight difference, {item.dtype} (lossless) | "
                        f"ComfyUI, Forge / A1111, InvokeAI (not diffusers) |")
    by_format = {item.format: item for item in planned}
    example = by_format.get("lora") or by_format.get("full-diff")  # files A1111 and InvokeAI read
    lines = []
    if example:
        lines.append("""- ComfyUI: put the file in `models/loras/`; a "Load LoRA" node between "Load Checkpoint" and the
  sampler, with this file and strength 1.0.""")
    if "waveft" in by_format:
        lines.append(f"""- ComfyUI, WaveFT's own file: link or copy the project's `integrations/comfyui/` folder into
  `ComfyUI/custom_nodes/` (it needs nothing beyond ComfyUI) and restart; put `{by_format["waveft"].file}` in
  `models/loras/` and load it with the stock "Load LoRA" node (or "Load WaveFT"), strength 1.0.""")
    if example:
        name = example.file.removesuffix(".safetensors")
        lines.append(f"""- Forge / A1111: put the file in `models/Lora/`; add `<lora:{name}:1>` to the prompt.
- InvokeAI: Model Manager -> add the file (an SDXL LoRA); enable it in the LoRA panel at weight 1.""")
    if "lora" in by_format:
        lines.append(f"""- diffusers:

```python
pipe = StableDiffusionXLPipeline.from_pretrained("{run.base_model}", torch_dtype=torch.float16)
pipe.load_lora_weights("path/to/this/folder/{by_format["lora"].file}")
```""")
    return f"""
## Use it in ComfyUI / Forge / A1111 / InvokeAI / diffusers

| file | what | loads in |
|---|---|---|
{chr(10).join(rows)}

{chr(10).join(lines)}
"""


def load_adapter_weights(unet, path: str, adapter_name: str = "default") -> None:
    """Load saved adapter weights into an adapter already attached to `unet`; any key mismatch is an error."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    AdapterFolder(path).check_weights()
    state = load_file(AdapterFolder(path).weights)
    state = {key.removeprefix(PEFT_MODEL_PREFIX): value for key, value in state.items()}
    # What PEFT saves for this adapter (AdaLoRA, for one, never saves its `ranknum` buffers).
    expected = set(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"adapter at {path} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
