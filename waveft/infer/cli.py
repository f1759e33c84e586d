"""`python -m waveft.generate --adapter RUN/adapter --prompt "a zjw dog on the beach" --seeds 0 1 --out DIR`:
prompts x seeds with a merged adapter, PNGs, manifest.jsonl and grid.png."""
import argparse

from waveft.entry import set_up_process
from waveft.errors import UserError, cli_entry
from waveft.hub import check_model_source
from waveft.infer.generation import (
    MANIFEST_NAME,
    generate_images,
    prompt_seed_jobs,
    read_prompts_file,
    save_grid,
)
from waveft.infer.settings import GenerationSettings
from waveft.io.adapter_folder import AdapterFolder
from waveft.io.files import check_can_write


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate images from SDXL with a merged WaveFT/PEFT adapter.")
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors) or a "
                        "training run's folder (its adapter/); default: the base model alone")
    parser.add_argument("--base", help="base model Hub id or folder (default: the one the adapter was trained on)")
    parser.add_argument("--vae", help="separate VAE Hub id or folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file with one prompt per line")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed "
                        "(default: 0)")
    parser.add_argument("--out", required=True, help="output folder for PNGs, manifest.jsonl and grid.png")
    GenerationSettings.add_arguments(parser)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    check_can_write(args.out, "--out")
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("no prompts: pass --prompt or --prompts-file")
    adapter = AdapterFolder.find(args.adapter).root if args.adapter else None
    base = args.base or (AdapterFolder(adapter).read_run_record().get("base_model") if adapter else None)
    if base is None:
        raise UserError("no base model: pass --base (the adapter folder does not name one)")
    settings = GenerationSettings.from_args(args)
    settings.check()
    check_model_source(base, "--base" if args.base else "the adapter's base model")
    if args.vae:
        check_model_source(args.vae, "--vae")
    set_up_process()
    from waveft.infer.pipeline import load_pipeline  # after the checks: --help and refusals stay quick

    pipe = load_pipeline(base, adapter, args.vae, settings.dtype, args.device, settings.scheduler,
                         settings.quantize)
    rows = generate_images(pipe, prompt_seed_jobs(prompts, args.seeds, base_model=base, adapter=adapter),
                           args.out, settings)
    grid = save_grid(rows, args.out, len(args.seeds))
    print(f"wrote {len(rows)} images and {MANIFEST_NAME} to {args.out}; all of them in {grid}")


if __name__ == "__main__":
    main()
