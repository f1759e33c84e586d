"""The DreamBooth prompts file parser, on a copy of the published file's structure and on the real benchmark."""
from pathlib import Path

import pytest

from eval.protocol import fill_prompt, load_benchmark, parse_prompts_and_classes, real_image_paths, remove_identifier
from tests.helpers import LIVE_TEMPLATES, OBJECT_TEMPLATES, SUBJECTS, prompts_file_text, write_benchmark
from waveft.errors import UserError

SHARED_BENCHMARK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dreambooth"


def write_prompts(tmp_path, text) -> Path:
    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(text)
    return path


def test_parses_subjects_classes_and_both_prompt_lists(tmp_path):
    benchmark = parse_prompts_and_classes(write_prompts(tmp_path, prompts_file_text()))
    assert {s.name: s.class_noun for s in benchmark.subjects} == SUBJECTS
    assert [s.name for s in benchmark.subjects if s.live] == ["dog", "cat2"]
    assert benchmark.object_prompts == tuple(OBJECT_TEMPLATES)
    assert benchmark.live_prompts == tuple(LIVE_TEMPLATES)
    plushie = benchmark.subject("bear_plushie")
    assert benchmark.prompts(plushie, "zjw")[0] == "a zjw stuffed animal in the jungle"
    assert benchmark.prompts(benchmark.subject("cat2"), "sks")[1] == "a sks cat wearing a red hat"


def test_windows_line_endings_and_extra_blank_lines_are_fine(tmp_path):
    text = prompts_file_text().replace("\n", "\r\n").replace("Prompts\r\n", "Prompts\r\n\r\n\r\n")
    assert len(parse_prompts_and_classes(write_prompts(tmp_path, text)).subjects) == len(SUBJECTS)


@pytest.mark.parametrize("broken, line, message", [
    (lambda t: t.replace("subject_name,class", "name;class"), 3, "expected 'subject_name,class'"),
    (lambda t: t.replace("dog,dog", "dog dog"), 5, "'subject_name,class' row"),
    (lambda t: t.replace("'a red {0} {1}'.format(unique_token, class_token)", "a red {0} {1}"), 16, "found 'a red"),
    (lambda t: t.replace("'a {0} {1} on the beach'", "'a {0} on the beach'"), 15, "expected a line like"),
    (lambda t: t.replace("Live Subject Prompts", "Live Prompts"), 19, "expected 'Live Subject Prompts'"),
])
def test_unexpected_format_names_file_and_line(tmp_path, broken, line, message):
    path = write_prompts(tmp_path, broken(prompts_file_text()))
    with pytest.raises(UserError, match=message) as error:
        parse_prompts_and_classes(path)
    assert f"{path}:{line}:" in str(error.value)


def test_truncated_file_is_an_error(tmp_path):
    path = write_prompts(tmp_path, prompts_file_text().split("Live Subject Prompts")[0])
    with pytest.raises(UserError, match=f"{path}: unexpected end of file"):
        parse_prompts_and_classes(path)


def test_identifier_removal_keeps_the_rest_of_the_prompt():
    prompt = fill_prompt("a {0} {1} wearing a red hat", "zjw", "dog")
    assert remove_identifier(prompt, "zjw") == "a dog wearing a red hat"
    assert remove_identifier("a zjwx dog", "zjw") == "a zjwx dog"


def test_benchmark_folder_and_real_images(tmp_path):
    root = write_benchmark(tmp_path / "bench")
    assert len(load_benchmark(root).subjects) == len(load_benchmark(root / "dataset").subjects) == len(SUBJECTS)
    assert [p.name for p in real_image_paths(root, "dog")] == ["00.jpg", "01.jpg", "02.jpg"]
    (root / "dataset" / "empty").mkdir()
    with pytest.raises(UserError, match="no real images for subject 'empty'"):
        real_image_paths(root, "empty")
    with pytest.raises(UserError, match="not a DreamBooth benchmark folder"):
        load_benchmark(tmp_path)


@pytest.mark.skipif(not SHARED_BENCHMARK.is_dir(), reason="the DreamBooth benchmark is not beside the checkout")
def test_published_benchmark():
    benchmark = load_benchmark(SHARED_BENCHMARK)
    live = [s for s in benchmark.subjects if s.live]
    assert len(benchmark.subjects) == 30 and len(live) == 9
    assert {s.class_noun for s in live} == {"dog", "cat"}
    assert len(benchmark.object_prompts) == len(benchmark.live_prompts) == 25
    assert all(len(benchmark.prompts(s)) == 25 for s in benchmark.subjects)
    assert sum(len(real_image_paths(SHARED_BENCHMARK, s.name)) for s in benchmark.subjects) == 158
