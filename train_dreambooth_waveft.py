"""DreamBooth WaveFT for SDXL. Runs the same under `python` and `accelerate launch`.

    python train_dreambooth_waveft.py --config configs/tiny.yaml [key.sub=value ...]
    accelerate launch train_dreambooth_waveft.py --config configs/sdxl_waveft_paper.yaml output_dir=runs/dog
"""
import argparse

from waveft.config import load_config
from waveft.entry import set_up_process
from waveft.errors import cli_entry


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, tuple(args.overrides))
    set_up_process()

    from waveft.train.loop import train

    train(cfg)


if __name__ == "__main__":
    main()
