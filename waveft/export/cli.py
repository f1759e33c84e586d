"""`python -m waveft.export`: parse the command line into an `ExportRequest` and run it."""
import argparse
import dataclasses

from waveft.entry import return_freed_blocks_to_the_system, set_up_process
from waveft.errors import cli_entry
from waveft.export.request import DEFAULT_LORA_RANK, EXPORT_DTYPES, FORMATS, ExportRequest, check_request
from waveft.hub import check_model_source
from waveft.io.cli_settings import refuse_non_finite


def parse_args(argv=None) -> ExportRequest:
    parser = argparse.ArgumentParser(
        prog="python -m waveft.export",
        description="Export an adapter as WaveFT's own file (for the ComfyUI node in integrations/comfyui), or "
        "as a kohya-named full weight difference or LoRA for ComfyUI, Forge / A1111, InvokeAI and diffusers.",
    )
    parser.add_argument("--adapter", required=True, help="the adapter folder (RUN/adapter)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="full-diff: the exact weight difference; "
                        "lora: its low-rank (SVD) approximation")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help=f"lora: the same rank for every layer (default {DEFAULT_LORA_RANK})")
    size.add_argument("--energy", type=float, help="lora: per-layer rank keeping this fraction of the squared "
                      "singular values, in (0, 1]; 1.0 is exact")
    parser.add_argument("--dtype", default="fp16", choices=EXPORT_DTYPES,
                        help="full-diff, lora (the waveft file keeps the spectrum as trained, fp32)")
    parser.add_argument("--base", help="base model (Hub id or folder) for the layer shapes; default: the "
                        "adapter's recorded base model; only its UNet (and text encoders') configs are read")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    refuse_non_finite(args.energy, "--energy")
    return ExportRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExportRequest)})


@cli_entry
def main(argv=None) -> None:
    request = parse_args(argv)
    check_request(request)
    if request.base:  # else the adapter's recorded base, checked when read
        check_model_source(request.base, "--base")
    set_up_process()
    return_freed_blocks_to_the_system()
    from waveft.export.writer import export_adapter  # after parsing: --help stays quick

    export_adapter(request)


if __name__ == "__main__":
    main()
