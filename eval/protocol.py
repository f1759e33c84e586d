"""The DreamBooth benchmark as published (google/dreambooth): subjects, class nouns and prompt lists.

Layout of a benchmark folder (the repository's root, or its `dataset/` folder itself):

    dataset/<subject>/*.jpg              real images of each subject
    dataset/prompts_and_classes.txt      "Classes" (a `subject_name,class` table), then "Object Prompts"
                                         and "Live Subject Prompts", each a Python list of
                                         `'a {0} {1} ...'.format(unique_token, class_token),` lines

Live subjects (dogs and cats) get the live prompt list; the file itself does not say which subjects
are live, the DreamBooth paper does: the subjects whose class is "dog" or "cat".
"""
import re
from dataclasses import dataclass
from pathlib import Path

from waveft.errors import UserError

PROMPTS_FILE = "prompts_and_classes.txt"
DEFAULT_IDENTIFIER = "zjw"  # the WaveFT paper's rare token
LIVE_CLASSES = frozenset({"dog", "cat"})
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

_PROMPT_LINE = re.compile(r"""^'(?P<template>[^']*)'\.format\(unique_token, class_token\),?$""")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str

    @property
    def live(self) -> bool:
        return self.class_noun in LIVE_CLASSES


@dataclass(frozen=True)
class Benchmark:
    """What `prompts_and_classes.txt` says. Prompt templates keep `{0}` (identifier) and `{1}` (class noun)."""

    subjects: tuple[Subject, ...]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def subject(self, name: str) -> Subject:
        for subject in self.subjects:
            if subject.name == name:
                return subject
        raise UserError(f"subject {name!r} is not in the benchmark (known: {', '.join(s.name for s in self.subjects)})")

    def prompt_templates(self, subject: Subject) -> tuple[str, ...]:
        return self.live_prompts if subject.live else self.object_prompts

    def prompts(self, subject: Subject, identifier: str = DEFAULT_IDENTIFIER) -> list[str]:
        return [fill_prompt(t, identifier, subject.class_noun) for t in self.prompt_templates(subject)]


def fill_prompt(template: str, identifier: str, class_noun: str) -> str:
    return template.format(identifier, class_noun)


def remove_identifier(prompt: str, identifier: str) -> str:
    """'a zjw dog in the snow' -> 'a dog in the snow' (whole words only)."""
    words = [w for w in prompt.split() if w != identifier]
    return " ".join(words)


def dataset_folder(benchmark_dir: str | Path) -> Path:
    """Accept the repository root (holding `dataset/`) or the `dataset/` folder itself."""
    root = Path(benchmark_dir)
    for candidate in (root / "dataset", root):
        if (candidate / PROMPTS_FILE).is_file():
            return candidate
    raise UserError(f"no {PROMPTS_FILE} in {root} or {root / 'dataset'}: not a DreamBooth benchmark folder "
                    "(download it with: python scripts/download_dreambooth.py DEST)")


def load_benchmark(benchmark_dir: str | Path) -> Benchmark:
    return parse_prompts_and_classes(dataset_folder(benchmark_dir) / PROMPTS_FILE)


def real_image_paths(benchmark_dir: str | Path, subject: str) -> list[Path]:
    folder = dataset_folder(benchmark_dir) / subject
    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not paths:
        raise UserError(f"no real images for subject {subject!r} in {folder}")
    return paths


class _Lines:
    """Non-blank lines with their 1-based line numbers, so that errors can name the line."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        self._lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        self._next = 0

    def peek(self) -> str | None:
        return self._lines[self._next][1] if self._next < len(self._lines) else None

    def take(self, expected: str) -> tuple[int, str]:
        if self._next >= len(self._lines):
            raise UserError(f"{self.path}: unexpected end of file, expected {expected}")
        number, line = self._lines[self._next]
        self._next += 1
        return number, line

    def expect(self, exact: str) -> None:
        number, line = self.take(repr(exact))
        if line != exact:
            self.fail(number, f"expected {exact!r}, found {line!r}")

    def fail(self, number: int, message: str):
        raise UserError(f"{self.path}:{number}: {message}")


def _parse_classes(lines: _Lines) -> tuple[Subject, ...]:
    lines.expect("Classes")
    lines.expect("subject_name,class")
    subjects = []
    while lines.peek() not in (None, "Prompts"):
        number, line = lines.take("a 'subject_name,class' row")
        name, sep, class_noun = line.partition(",")
        if not sep or not name.strip() or not class_noun.strip() or "," in class_noun:
            lines.fail(number, f"expected a 'subject_name,class' row, found {line!r}")
        if any(s.name == name.strip() for s in subjects):
            lines.fail(number, f"subject {name.strip()!r} listed twice")
        subjects.append(Subject(name.strip(), class_noun.strip()))
    if not subjects:
        raise UserError(f"{lines.path}: the Classes table is empty")
    return tuple(subjects)


def _parse_prompt_list(lines: _Lines, title: str) -> tuple[str, ...]:
    lines.expect(title)
    lines.expect("prompt_list = [")
    prompts = []
    while True:
        number, line = lines.take("a prompt line or ']'")
        if line == "]":
            break
        match = _PROMPT_LINE.match(line)
        if not match or "{0}" not in match["template"] or "{1}" not in match["template"]:
            lines.fail(number, "expected a line like 'a {0} {1} in the snow'.format(unique_token, class_token), "
                               f"found {line!r}")
        prompts.append(match["template"])
    if not prompts:
        raise UserError(f"{lines.path}: the {title} list is empty")
    return tuple(prompts)


def parse_prompts_and_classes(path: str | Path) -> Benchmark:
    lines = _Lines(Path(path))
    subjects = _parse_classes(lines)
    lines.expect("Prompts")
    object_prompts = _parse_prompt_list(lines, "Object Prompts")
    live_prompts = _parse_prompt_list(lines, "Live Subject Prompts")
    if lines.peek() is not None:
        number, line = lines.take("end of file")
        lines.fail(number, f"unexpected text after the live prompt list: {line!r}")
    return Benchmark(subjects, object_prompts, live_prompts)
