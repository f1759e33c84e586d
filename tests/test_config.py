"""Config validation: every bad key or value is refused by name, before any model is loaded."""
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO
from waveft.config import load_config
from waveft.errors import UserError

MINIMAL = {"output_dir": "out", "data": {"instance_dir": "imgs"}}


def write(tmp_path, tree) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_defaults_are_the_papers_settings(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.adapter.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (cfg.train.max_steps, cfg.train.gradient_accumulation_steps, cfg.train.learning_rate) == (500, 4, 1e-4)
    assert cfg.model.vae_dtype == "fp32"


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ("train.max_steps=7", "adapter.peft.n_frequency=10",
                                                  "validation.seeds=[1, 2]", "output_dir=elsewhere"))
    assert cfg.train.max_steps == 7 and cfg.output_dir == "elsewhere"
    assert cfg.adapter.peft == {"n_frequency": 10} and cfg.validation.seeds == [1, 2]


def test_a_bare_no_is_the_choice_no_not_false(tmp_path):
    """YAML 1.1 reads a bare no as false; where a setting's choices spell it "no" (accelerate's mixed_precision),
    that is what the user wrote, on the command line and in a file."""
    assert load_config(write(tmp_path, MINIMAL), ("train.mixed_precision=no",)).train.mixed_precision == "no"
    path = tmp_path / "bare.yaml"
    path.write_text("output_dir: out\ndata: {instance_dir: imgs}\ntrain: {mixed_precision: no}\n")
    assert load_config(str(path)).train.mixed_precision == "no"


@pytest.mark.parametrize(
    "tree, overrides, message",
    [
        (MINIMAL, ("train.max_stepz=3",), "unknown key 'train.max_stepz'"),
        (MINIMAL, ("train.max_steps=abc",), "key 'train.max_steps' must be int"),
        (MINIMAL, ("train.max_steps=0",), "key 'train.max_steps' must be > 0"),
        (MINIMAL, ("train.mixed_precision=fp8",), "key 'train.mixed_precision' must be one of"),
        (MINIMAL, ("data.crop=true",), "key 'data.crop' must be one of"),
        (MINIMAL, ("adapter.peft.n_frequencyy=3",), "unknown key 'adapter.peft.n_frequencyy'"),
        (MINIMAL, ("adapter.peft.n_frequency=many",), "key 'adapter.peft.n_frequency' must be int"),
        (MINIMAL, ("adapter.peft.wavelet_family=haar2",), "unknown wavelet 'haar2'"),
        (MINIMAL, ("adapter.type=nope",), "unknown method 'nope'"),
        (MINIMAL, ("train",), "must look like key.sub=value"),
        ({"data": {"instance_dir": "x"}}, (), "key 'output_dir' is required"),
        ({**MINIMAL, "model": "sdxl"}, (), "key 'model' must be a mapping"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, tree, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(write(tmp_path, tree), overrides)


@pytest.mark.parametrize("wavelet", ["db12", "coif5"])  # coif5: in PEFT's table, with the wrong number of taps
def test_long_wavelet_is_refused_only_for_stock_peft(tmp_path, wavelet):
    path = write(tmp_path, MINIMAL)
    assert load_config(path, (f"adapter.peft.wavelet_family={wavelet}",)).adapter.peft["wavelet_family"] == wavelet
    with pytest.raises(UserError, match="cannot run it"):
        load_config(path, (f"adapter.peft.wavelet_family={wavelet}", "adapter.implementation=peft"))


@pytest.mark.slow
def test_cli_reports_bad_config_in_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, MINIMAL)
    for args, message in (([path, "train.max_steps=-1"], "key 'train.max_steps' must be > 0, got -1"),
                          ([str(tmp_path / "missing.yaml")], f"config file not found: {tmp_path / 'missing.yaml'}")):
        result = subprocess.run([sys.executable, "train_dreambooth_waveft.py", "--config", *args], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 2
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert message in lines[0]  # this refusal, not a later one (the model, the data folder)
    assert not os.path.exists(os.path.join(REPO, "out"))


@pytest.mark.parametrize("name", sorted(
    os.path.relpath(os.path.join(d, f), REPO)
    for d in (os.path.join(REPO, "configs"), os.path.join(REPO, "configs", "paper")) if os.path.isdir(d)
    for f in os.listdir(d) if f.endswith(".yaml")
))
def test_shipped_run_configs_are_valid(name):
    cfg = load_config(os.path.join(REPO, name))
    assert cfg.output_dir and cfg.data.instance_dir
    assert not cfg.adapter.text_encoders.enabled  # the paper adapts the UNet only


def test_a_config_extends_another_merging_sections_and_replacing_values(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "paper.yaml").write_text(yaml.safe_dump(
        {**MINIMAL, "train": {"max_steps": 9, "learning_rate": 3e-4}, "validation": {"seeds": [1, 2, 3]},
         "adapter": {"budget": 1.0, "peft": {"scaling": 5.0}}}))
    child = tmp_path / "run.yaml"
    child.write_text(yaml.safe_dump({"extends": "base/paper.yaml", "train": {"max_steps": 4},
                                     "validation": {"seeds": [7]},
                                     "adapter": {"budget": None, "peft": {"n_frequency": 8}}}))
    cfg = load_config(str(child), ("train.batch_size=2",))
    assert (cfg.train.max_steps, cfg.train.learning_rate, cfg.train.batch_size) == (4, 3e-4, 2)
    assert cfg.validation.seeds == [7]  # lists replace
    assert cfg.adapter.budget is None and cfg.adapter.peft == {"scaling": 5.0, "n_frequency": 8}
    assert cfg.output_dir == "out"


@pytest.mark.parametrize(
    "child, message",
    [
        ({"extends": "missing.yaml"}, "key 'extends' names a config file that does not exist: .*missing.yaml"),
        ({"extends": 3}, "key 'extends' must be the path of a config file, got 3"),
        ({"extends": "run.yaml"}, "key 'extends' makes a cycle"),
        ({"extends": "base.yaml", "train": {"max_stepz": 1}}, "unknown key 'train.max_stepz'"),
    ],
)
def test_bad_extends_is_refused_naming_the_file(tmp_path, child, message):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, child))


@pytest.mark.parametrize("name, base, differences", [
    ("sdxl_waveft_paper.yaml", "paper/waveft.yaml", ("adapter.budget=null", "adapter.peft.n_frequency=2592")),
    ("sdxl_lora_r1.yaml", "paper/lora.yaml", ("adapter.budget=null", "adapter.peft.r=1")),
])
def test_the_papers_settings_have_one_source(name, base, differences):
    """The single-run configs are the sweeps' paper configs, with the size named instead of budgeted."""
    cfg = load_config(os.path.join(REPO, "configs", name))
    source = load_config(os.path.join(REPO, "configs", base), (*differences, f"output_dir={cfg.output_dir}"))
    assert cfg == source
    assert cfg.train.max_steps == 500 and cfg.model.text_hidden_states == "paper"
