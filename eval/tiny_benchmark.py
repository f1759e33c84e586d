"""A tiny offline benchmark in the DreamBooth benchmark's exact layout, for the offline quick start.

`python -m eval.tiny_benchmark DIR` writes DIR/dataset/<subject>/*.png (generated toy subjects, no image files
in the repo) and DIR/dataset/prompts_and_classes.txt, which `eval.protocol` reads like the real file.
"""
import argparse
import os

from eval.protocol import PROMPTS_FILE, Benchmark, Subject
from waveft.fixtures.synthetic_subject import write_synthetic_subject
from waveft.io.files import atomic_directory

TINY_SUBJECTS = {"toy_ball": "ball", "toy_dog": "dog"}  # one object, one live subject: both prompt lists
TINY_OBJECT_PROMPTS = ("a {0} {1} in the jungle", "a {0} {1} on the beach", "a red {0} {1}")
TINY_LIVE_PROMPTS = ("a {0} {1} in the snow", "a {0} {1} wearing a santa hat", "a {0} {1} on a cobblestone street")


def prompts_file_text(subjects: dict[str, str], object_templates, live_templates) -> str:
    """The layout of google/dreambooth's dataset/prompts_and_classes.txt, blank lines included."""

    def prompt_list(templates):
        lines = [f"'{t}'.format(unique_token, class_token)," for t in templates]
        lines[-1] = lines[-1].rstrip(",")  # the published lists end without a trailing comma
        return ["prompt_list = ["] + lines + ["]"]

    lines = ["Classes", "", "subject_name,class"] + [f"{s},{c}" for s, c in subjects.items()]
    lines += ["", "Prompts", "", "Object Prompts", ""] + prompt_list(object_templates)
    lines += ["", "Live Subject Prompts", ""] + prompt_list(live_templates)
    return "\n".join(lines) + "\n"


def tiny_benchmark() -> Benchmark:
    """What the written benchmark's prompts_and_classes.txt says, without writing it (a sweep's dry run)."""
    return Benchmark(tuple(Subject(name, noun) for name, noun in TINY_SUBJECTS.items()),
                     tuple(TINY_OBJECT_PROMPTS), tuple(TINY_LIVE_PROMPTS))


def write_tiny_benchmark(root: str) -> None:
    with atomic_directory(os.path.join(root, "dataset")) as dataset:
        for seed, subject in enumerate(TINY_SUBJECTS):
            write_synthetic_subject(os.path.join(dataset, subject), seed=seed)
        with open(os.path.join(dataset, PROMPTS_FILE), "w") as f:
            f.write(prompts_file_text(TINY_SUBJECTS, TINY_OBJECT_PROMPTS, TINY_LIVE_PROMPTS))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny DreamBooth-layout benchmark with generated subjects.")
    parser.add_argument("dir", help="benchmark folder; DIR/dataset (the subjects and prompts.txt) is replaced")
    args = parser.parse_args(argv)
    write_tiny_benchmark(args.dir)
    print(f"wrote tiny benchmark to {os.path.join(args.dir, 'dataset')}")


if __name__ == "__main__":
    main()
