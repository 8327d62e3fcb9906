"""The typed config: YAML + key=value overrides, with errors that name the key."""
import pytest

from imgcls.config import ConfigError, load_config, to_dict


def test_yaml_then_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 0.3\ntrain:\n  epochs: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("include: base.yaml\ntrain:\n  accum_steps: 2\n")
    cfg = load_config(child, ["optim.lr=1e-3", "data.mean=[0.5]", "model.name=resnet18", "track.wandb=disabled"])
    assert cfg.optim.lr == 0.001 and cfg.train.epochs == 7 and cfg.train.accum_steps == 2
    assert cfg.data.mean == [0.5] and cfg.model.name == "resnet18"
    assert to_dict(cfg)["optim"]["lr"] == 0.001


def test_the_shipped_recipe_loads():
    cfg = load_config("configs/fashion_mnist.yaml")
    assert cfg.data.url and cfg.train.epochs > 0


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("nothing.lr=0.1", "unknown config key 'nothing.lr'"),
    ("train.epochs=ten", "train.epochs: expected int"),
    ("train.epochs", "is not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'train.epocs'"):
        load_config(path)


def test_a_key_added_since_the_checkpoint_is_no_change_at_its_default():
    """A checkpoint written before the `ewc` section existed resumes; setting a new key does not."""
    from imgcls.config import Config, config_changes

    old, new = to_dict(Config()), to_dict(Config())
    del old["ewc"]
    assert config_changes(old, new) == ([], [])
    new["ewc"]["previous"] = "runs/a/checkpoints/best.pt"
    assert config_changes(old, new)[0] == ["ewc.previous: '(absent)' -> 'runs/a/checkpoints/best.pt'"]


def test_every_config_field_has_a_docstring():
    import dataclasses
    import typing

    from imgcls.config import Config, field_docs

    def sections(cls):
        yield cls
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from sections(hint)

    for cls in sections(Config):
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert cls.__doc__ and not missing, f"{cls.__name__}: no docstring under {sorted(missing)}"


def test_docs_config_md_is_current():
    from imgcls.config import reference_markdown
    from tests.conftest import REPO

    assert (REPO / "docs" / "config.md").read_text() == reference_markdown(), \
        "docs/config.md is stale: run `python scripts/config_docs.py`"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'?"),
    ("trian.epochs=3", "did you mean 'train.epochs'?"),
    ("data.augmnt.flip=false", "did you mean 'data.augment.flip'?"),
])
def test_a_near_miss_gets_a_did_you_mean(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("?", r"\?")):
        load_config(None, [override])


def test_the_defaults_are_neutral():
    """A run that names no config gets nothing of the Fashion-MNIST recipe: no dataset, no
    normalisation constants (they come from the manifest), no whitening, EMA or test-time views."""
    cfg = load_config(None)
    assert cfg.data.url == "" and cfg.data.mean == [] and cfg.data.std == []
    assert cfg.model.whiten_images == 0 and cfg.train.ema_decay == 0
    assert not cfg.train.eval_flip and not cfg.train.eval_shift


def test_the_photos_recipe_loads_and_shares_nothing_with_fashion_mnist():
    photos, fashion = load_config("configs/photos.yaml"), load_config("configs/fashion_mnist.yaml")
    assert photos.data.image_size == 224 and photos.model.pretrained == "imagenet"
    assert photos.data.mean != fashion.data.mean and photos.model.whiten_images == 0


def test_every_enumerated_key_is_checked_at_load_and_its_doc_names_the_choices():
    import typing

    from imgcls.config import Config, field_docs, from_dict

    checked = []
    for section in ("run", "data", "data.augment", "model", "optim", "schedule", "train", "prune", "track"):
        cls = type(eval(f"cfg.{section}", {"cfg": Config()}))
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is typing.Literal:
                key = f"{section}.{name}"
                with pytest.raises(ConfigError, match=f"^{key}=nonsense: expected one of "):
                    load_config(None, [f"{key}=nonsense"])
                checked.append(key)
                for choice in typing.get_args(hint):
                    assert f"{choice}".lower() in field_docs(cls)[name].lower(), (key, choice)
    assert {"run.device", "data.augment.crop", "model.small_stem", "optim.name", "schedule.name", "train.precision",
            "track.wandb"} <= set(checked)
    with pytest.raises(ConfigError, match="model.small_stem=1: expected one of auto, true, false"):
        from_dict({"model": {"small_stem": 1}})  # True == 1, but 1 is no choice


def test_the_optimizer_and_precision_docs_say_what_the_code_does():
    import torch

    from imgcls.config import OptimConfig, TrainConfig, field_docs
    from imgcls.optim import make_optimizer
    from imgcls.precision import resolve_precision

    cfg = load_config(None, ["optim.name=adamw", "optim.momentum=0.5"])
    optimizer = make_optimizer(cfg, torch.nn.Linear(2, 2), lr=0.1)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # momentum does not reach AdamW...
    assert "AdamW ignores it" in field_docs(OptimConfig)["momentum"]  # ...and the doc says so
    assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    doc = field_docs(TrainConfig)["precision"]
    assert "fp16 on CUDA" not in doc and "bf16 on CPUs and on GPUs that support it" in doc
