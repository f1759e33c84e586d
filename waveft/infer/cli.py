"""`python -m waveft.generate --adapter RUN/adapter --prompt "a zjw dog on the beach" --seeds 0 1 --out DIR`:
prompts x seeds with a merged adapter, PNGs, manifest.jsonl and grid.png."""
import argparse
import os

from waveft.entry import set_up_process
from waveft.errors import UserError, cli_entry
from waveft.infer.generation import (
    GRID_NAME,
    MANIFEST_NAME,
    generate_images,
    prompt_seed_jobs,
    read_prompts_file,
    save_grid,
)
from waveft.infer.pipeline import load_pipeline
from waveft.infer.settings import GenerationSettings
from waveft.io.adapter_folder import AdapterFolder
from waveft.io.files import check_can_write


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate images from SDXL with a merged WaveFT/PEFT adapter.")
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", help="base model Hub id or folder (default: the one the adapter was trained on)")
    parser.add_argument("--vae", help="separate VAE Hub id or folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file with one prompt per line")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", required=True, help="output folder for PNGs, manifest.jsonl and grid.png")
    GenerationSettings.add_arguments(parser)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    check_can_write(args.out, "--out")
    set_up_process()
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("no prompts: pass --prompt or --prompts-file")
    base = args.base or (AdapterFolder(args.adapter).read_run_record().get("base_model") if args.adapter else None)
    if base is None:
        raise UserError("no base model: pass --base (the adapter folder does not name one)")
    settings = GenerationSettings.from_args(args)
    settings.check()
    pipe = load_pipeline(base, args.adapter, args.vae, settings.dtype, args.device, settings.scheduler,
                         settings.quantize)
    rows = generate_images(pipe, prompt_seed_jobs(prompts, args.seeds, base_model=base, adapter=args.adapter),
                           args.out, settings)
    save_grid([os.path.join(args.out, r.file) for r in rows], os.path.join(args.out, GRID_NAME), len(args.seeds))
    print(f"wrote {len(rows)} images, {MANIFEST_NAME} and {GRID_NAME} to {args.out}")


if __name__ == "__main__":
    main()
