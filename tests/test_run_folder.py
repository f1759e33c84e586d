"""The run folder's names and the typed run_info.json record."""
import json

from waveft.io.run_folder import RunFolder, RunInfo


def test_run_info_round_trips_and_leaves_out_keys_a_run_does_not_have(tmp_path):
    info = RunInfo(method="waveft", adapter_type="waveft", seed=1, implementation="structured", budget=None,
                   trainable_parameters=10, adapted_layers=2, subject="dog", class_noun="dog", identifier="zjw",
                   instance_prompt="a zjw dog", base_model="m", vae=None, steps=3, final_loss=0.5, train_seconds=1.0,
                   peak_memory_bytes=2**20, adapter_bytes=100, train_losses=[[1, 0.7], [2, 0.6], [3, 0.5]],
                   samples="x/grid.png")
    run = RunFolder(tmp_path)
    info.write(run.run_info)
    saved = json.loads((tmp_path / "run_info.json").read_text())
    assert saved["vae"] is None and saved["budget"] is None  # always present, as before
    assert "budget_settings" not in saved and "validation_losses" not in saved and "samples" not in saved
    read = RunInfo.read(run.run_info)
    assert read == RunInfo(**{**info.__dict__, "samples": None})
    assert "train_losses" not in info.adapter_metadata()
    assert run.checkpoint(20) == str(tmp_path / "checkpoint-20")
    assert RunFolder.CHECKPOINT_PATTERN.match("checkpoint-20") and run.validation_step(5).endswith("step-000005")
