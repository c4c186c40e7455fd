"""Bad input fails early with a message naming the file or key."""

import pytest

from sdeseg.config import ConfigError
from sdeseg.data.manifest import DatasetError, read_manifest, write_manifest
from sdeseg.launch import run_in_process, run_on_ray
from tests.conftest import tiny_config


def test_missing_dataset_directory_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nope.*does not exist"):
        read_manifest(str(tmp_path / "nope"))


def test_directory_without_manifest_is_named(tmp_path):
    with pytest.raises(DatasetError, match="manifest.parquet does not exist"):
        read_manifest(str(tmp_path))


def test_empty_manifest_is_named(tmp_path):
    write_manifest(str(tmp_path), [])
    with pytest.raises(DatasetError, match="manifest.parquet is empty"):
        read_manifest(str(tmp_path))


def test_training_on_a_missing_dataset_fails_before_any_worker(tmp_path):
    cfg = tiny_config("demo_sde", str(tmp_path / "missing"), "runtime.in_process=false")
    with pytest.raises(DatasetError, match="missing"):
        run_on_ray(cfg, tmp_path / "run")  # preflight raises before Ray is even started
    assert not (tmp_path / "run").exists()


def test_gpu_config_on_a_machine_without_gpus(synthetic_root, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tiny_config("demo_sde", synthetic_root, "runtime.use_gpu=true")
    with pytest.raises(ConfigError, match="runtime.use_gpu"):
        run_in_process(cfg, tmp_path / "run")


def test_missing_sde_export_is_named(synthetic_root, tmp_path):
    cfg = tiny_config("demo_semiseg", synthetic_root, f"semiseg.sde_checkpoint={tmp_path / 'none.pt'}",
                      "data.num_labeled=4")
    with pytest.raises(ConfigError, match="semiseg.sde_checkpoint.*none.pt"):
        run_in_process(cfg, tmp_path / "run")
