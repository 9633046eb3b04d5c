import os
import random

import numpy as np
import pytest
import torch

from distgan.checkpoint import (
    CheckpointError,
    capture_rng,
    check_compatible,
    load_state,
    restore_rng,
    save_state,
)

from support import plain_state


def test_round_trip_is_exact_and_leaves_no_temporary_file(tmp_path):
    state = plain_state()
    save_state(state, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    loaded = load_state(tmp_path)
    assert torch.equal(loaded["generator"]["w"], state["generator"]["w"]) and loaded["step"] == 3


def test_a_format_1_checkpoint_is_read_with_its_data_position_renamed_and_a_newer_one_refused(tmp_path):
    old = plain_state(7, format=1)
    old["batch_in_epoch"] = old.pop("g_steps_into_epoch")
    torch.save(old, tmp_path / "state.pt")
    loaded = load_state(tmp_path)
    assert loaded["format"] == 2 and loaded["g_steps_into_epoch"] == 7 and "batch_in_epoch" not in loaded
    torch.save(plain_state(7, format=3), tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="format 3 not supported"):
        load_state(tmp_path)


def test_saving_non_finite_weights_is_refused(tmp_path):
    bad = plain_state(generator={"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match="non-finite.*generator.w"):
        save_state(bad, tmp_path)
    assert not (tmp_path / "state.pt").exists()


def test_a_pickled_object_is_refused_without_being_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**plain_state(), "payload": Exploit()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="refused: holds objects other than plain tensors") as refused:
        load_state(tmp_path)
    assert not marker.exists()
    # torch's own paragraph advises weights_only=False, the one thing a user must not do with this file
    assert "weights_only" not in str(refused.value) and "system" in str(refused.value)


def test_truncated_file_is_an_error_naming_it(tmp_path):
    save_state(plain_state(), tmp_path)
    path = tmp_path / "state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(path)) as torn:
        load_state(tmp_path)
    assert "truncated or corrupt" in str(torn.value) and "\n" not in str(torn.value)


def test_nan_in_a_saved_file_is_an_error(tmp_path):
    torch.save(plain_state(discriminator={"w": torch.tensor([float("inf")])}), tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="non-finite.*discriminator"):
        load_state(tmp_path)


def test_incompatible_model_config_is_refused():
    with pytest.raises(CheckpointError, match="z_dim"):
        check_compatible(plain_state(), {"z_dim": 64, "image_size": 28}, "ckpt")


def test_rng_capture_and_restore_reproduce_every_stream():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = capture_rng(gen)
    first = (torch.rand(3), torch.randn(2, generator=gen), np.random.rand(2), random.random())
    restore_rng(saved, gen)
    second = (torch.rand(3), torch.randn(2, generator=gen), np.random.rand(2), random.random())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert np.array_equal(first[2], second[2]) and first[3] == second[3]


def test_locations_keep_a_uris_query_and_errors_name_what_the_user_gave(tmp_path):
    from distgan.checkpoint import fetch_state
    from distgan.storage import is_uri, join

    assert join("s3://b/runs?endpoint_override=h:9&scheme=http", "r", "state.pt") == \
        "s3://b/runs/r/state.pt?endpoint_override=h:9&scheme=http"
    assert join(tmp_path, "r") == f"{tmp_path}/r" and is_uri("gs://b/x") and not is_uri(tmp_path)
    save_state(plain_state(5), tmp_path / "c")
    assert fetch_state(tmp_path / "c")["step"] == 5
    assert fetch_state(f"file://{tmp_path}/c")["step"] == 5  # a URI: downloaded through pyarrow
    (tmp_path / "c" / "state.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=f"^file://{tmp_path}/c/state.pt: unreadable"):
        fetch_state(f"file://{tmp_path}/c")
    with pytest.raises(CheckpointError, match=f"^file://{tmp_path}/d/state.pt: missing"):
        fetch_state(f"file://{tmp_path}/d")


def test_rng_state_of_another_device_kind_is_not_restored():
    gen = torch.Generator().manual_seed(5)
    saved = capture_rng(gen)
    saved["device_type"] = "cuda"  # as a CUDA worker wrote it
    before = torch.get_rng_state()
    assert restore_rng(saved, gen) is False
    assert torch.equal(torch.get_rng_state(), before)


def test_a_trainers_state_goes_through_save_and_load_in_the_current_format(tmp_path):
    from distgan.checkpoint import FORMAT_VERSION
    from distgan.config import TrainConfig
    from distgan.trainer import Trainer

    cfg = TrainConfig(max_steps=1, eval_every=0, storage_path=str(tmp_path), name="x", wandb_mode="disabled").validate()
    trainer = Trainer(cfg)
    trainer.fit()
    save_state(trainer.state_dict(), tmp_path / "c")
    state = load_state(tmp_path / "c")
    assert state["format"] == FORMAT_VERSION and state["step"] == 1
    resumed = Trainer(cfg)
    resumed.load_state_dict(state, "c")
    assert resumed.step == 1 and resumed.steps_into_epoch == state["g_steps_into_epoch"] == 1
