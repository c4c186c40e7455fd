import pytest
import yaml

from sdeseg.config import CONFIG_DIR, Config, ConfigError, load_config, save_config


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = load_config("demo_sde", ["data.size=128x256", "optim.lr=1e-3", "runtime.num_workers=1",
                                   "model.decoder_channels=[8,16,32,64,128]"])
    assert cfg.data.size == (128, 256)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.runtime.num_workers == 1
    assert cfg.model.decoder_channels == (8, 16, 32, 64, 128)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.sise=1", "data.sise"),
        ("nope.x=1", "unknown key nope"),
        ("optim.lr=abc", "optim.lr"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("data.size=96", "data.size"),
        ("runtime.zero_stage=5", "runtime.zero_stage"),
        ("model.encoder=resnet7", "model.encoder"),
        ("train.steps=0", "train.steps"),
        ("runtime.precision=fp16", "runtime.precision"),
        ("depth_loss.min_depth=200", "depth_loss.min_depth"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("demo_sde", [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stage": "sde", "data": {"root": "x", "batchsize": 3}}))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "bad.yaml" in str(e.value) and "data.batchsize" in str(e.value)


def test_base_chain_and_roundtrip(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {CONFIG_DIR / 'demo_sde.yaml'}\ntrain:\n  steps: 7\n")
    cfg = load_config(child)
    assert cfg.train.steps == 7 and cfg.runtime.zero_stage == 2
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match="demo_sde"):
        load_config("does_not_exist.yaml")


def _leaf_keys(obj, prefix=""):
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, key + ".")
        else:
            yield key


@pytest.mark.parametrize("key", sorted(_leaf_keys(Config())))
def test_an_unparsable_value_names_its_key(key):
    """Every field either takes the string "abc" (string fields) or rejects it with a
    ConfigError naming the field: never a raw ValueError/TypeError from deep inside."""
    try:
        load_config(None, [f"{key}=abc"])
    except ConfigError as e:
        assert key in str(e)
