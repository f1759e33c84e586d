"""train.report_to=wandb on the tiny SDXL, read back from the offline run's own transaction log (.wandb) with wandb's
reader: the training loss at every step, the validation loss, the run's config and a logged image."""
import json

import pytest

from tests.helpers import tiny_cfg
from waveft.errors import UserError


def read_offline_run(logs):
    """The history rows, config and files of the one offline run under `logs`, read with wandb's own DataStore."""
    [run_file] = logs.glob("wandb/offline-run-*/run-*.wandb")
    return read_run_file(run_file)


def read_run_file(run_file):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(str(run_file))
    history, config, run = [], {}, None
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run = record.run
    return history, config, run, run_file.parent


@pytest.mark.slow
def test_wandb_offline_run_holds_losses_config_and_images(tiny_sdxl_dir, subject_dir, tmp_path, monkeypatch):
    from waveft.train.loop import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=2", "train.checkpointing_steps=0",
                            "train.report_to=wandb", "validation.loss.every_steps=1", "validation.every_steps=2",
                            "validation.seeds=[0]", "validation.steps=2", "train.wandb.group=sweep-a",
                            "train.wandb.tags=[waveft, budget-1]"))
    history, config, run, run_dir = read_offline_run(out / "logs")

    losses = [(row["_step"], row["loss"]) for row in history if "loss" in row]
    assert losses == [tuple(pair) for pair in result.run_info.train_losses]  # every step, the very values
    validation = [(row["_step"], row["validation_loss"]) for row in history if "validation_loss" in row]
    assert validation == [tuple(pair) for pair in result.run_info.validation_losses] and len(validation) == 2
    assert config["adapter.type"] == "waveft" and config["train.max_steps"] == 2
    assert config["data.instance_dir"] == str(subject_dir)
    [image] = [row for row in history if "validation/_type" in row]  # media are logged as nested keys
    assert image["_step"] == 2 and image["validation/_type"] == "images/separated" and image["validation/count"] == 1
    [file] = image["validation/filenames"]
    assert (run_dir / "files" / file).is_file()
    assert run.run_group == "sweep-a" and list(run.tags) == ["waveft", "budget-1"]


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_its_wandb_run(tiny_sdxl_dir, subject_dir, tmp_path, monkeypatch):
    """Interrupted after step 2 and resumed to step 3: two offline logs of one wandb run (same id), which
    `wandb sync` joins; the second starts where the checkpoint left off. A run started afresh gets a new id."""
    from waveft.train.loop import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    settings = ("train.checkpointing_steps=2", "train.report_to=wandb")
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=2", *settings))
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=3", "train.resume=latest", *settings))
    first, second = [read_run_file(f) for f in sorted((out / "logs").glob("wandb/offline-run-*/run-*.wandb"))]
    assert first[2].run_id == second[2].run_id
    assert [row["_step"] for row in first[0] if "loss" in row] == [1, 2]
    assert [row["_step"] for row in second[0] if "loss" in row] == [3]

    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=1", "overwrite_output_dir=true", *settings))
    newest = max((out / "logs").glob("wandb/offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
    assert read_run_file(newest)[2].run_id != first[2].run_id


def test_report_to_wandb_without_the_package_is_refused_before_any_model_loads(monkeypatch):
    import importlib.util

    from waveft.config import load_config

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(UserError, match="train.report_to=wandb needs the wandb package"):
        load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", "train.report_to=wandb"))
