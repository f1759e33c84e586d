"""DreamBooth WaveFT for SDXL. Runs the same under `python` and `accelerate launch`.

    python train_dreambooth_waveft.py --config configs/tiny.yaml [key.sub=value ...]
    python train_dreambooth_waveft.py --config configs/sdxl_waveft_paper.yaml --estimate-memory   (no weights loaded)
    accelerate launch train_dreambooth_waveft.py --config configs/sdxl_waveft_paper.yaml output_dir=runs/dog
"""
import argparse

from waveft.config import load_config
from waveft.entry import set_up_process
from waveft.errors import cli_entry
from waveft.hub import check_model_sources


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the config")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the expected peak accelerator memory of a training step (from the model's "
                             "config files only, no weights) and exit")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, tuple(args.overrides))
    set_up_process()
    if args.estimate_memory:  # config files only: offline, SDXL base's shipped configs stand in for the Hub's
        from waveft.train.memory_estimate import estimate_step_memory

        print(estimate_step_memory(cfg).table())
        return
    check_model_sources(cfg.model)  # before the model libraries load: a bad name is refused in a second

    from waveft.train.loop import train

    train(cfg)


if __name__ == "__main__":
    main()
