import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from imgcls.config import ModelConfig
from imgcls.models import (
    apply_unfreeze_schedule,
    build_model,
    efficientnet_lite0_weights,
    freeze_backbone,
    head_name,
    head_parameters,
    load_pretrained,
)
from tests.conftest import EXACT_RUN, launch

NAMES = ["simple_cnn", "resnet18", "resnet34", "mobilenet_v3_small", "efficientnet_lite0",
         "shufflenet_v2_x0_5"]


def build(name="simple_cnn", num_classes=10, in_channels=1, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, **kw), num_classes, in_channels)


def feature_map_hw(model, size):
    """Spatial size entering the global pooling: the network's total downsampling."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape[-2:])))
             for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 1, size, size))
    for h in hooks:
        h.remove()
    return shapes[-1]  # squeeze-and-excitation pools come earlier


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(name, in_channels):
    model = build(name, num_classes=7, in_channels=in_channels).eval()
    for size in (28, 32):
        with torch.no_grad():
            out = model(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="resnet18"):
        build("resnet81")


def test_training_our_models_does_not_import_torchvision():
    # torchvision's import takes ~1.5 s of every rank's start-up (it imports torch._dynamo)
    code = ("import sys; from imgcls.trainer import train; from imgcls.config import ModelConfig; "
            "from imgcls.models import build_model; "
            "build_model(ModelConfig(name='fast_cnn'), 10, 1); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'torchvision'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name,small,large", [
    ("resnet18", (4, 4), (1, 1)),            # stride 8 vs 32 on 32 px
    ("mobilenet_v3_small", (2, 2), (1, 1)),
    ("efficientnet_lite0", (2, 2), (1, 1)),
    ("simple_cnn", (8, 8), (8, 8)),          # not a stem option for our own CNN
])
def test_small_stem_changes_downsampling(name, small, large):
    assert feature_map_hw(build(name, small_stem=True), 32) == small
    assert feature_map_hw(build(name, small_stem=False), 32) == large


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name,blocks", [("simple_cnn", 3), ("resnet18", 8), ("resnet34", 16)])
def test_se_adds_modules(name, blocks):
    plain, se = build(name), build(name, se=True)
    assert count(plain, SqueezeExcitation) == 0
    assert count(se, SqueezeExcitation) == blocks
    assert sum(p.numel() for p in se.parameters()) > sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        assert se.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("option,match", [({"se": True}, "se=True"),
                                          ({"norm": "group"}, "norm='group'"),
                                          ({"pretrained": "imagenet"}, "efficientnet_lite0")])
def test_unsupported_options_fail(option, match):
    with pytest.raises(ValueError, match=match):
        build("mobilenet_v3_small", **option)


@pytest.mark.parametrize("name", ["simple_cnn", "resnet18"])
@pytest.mark.parametrize("norm", ["none", "group"])
def test_batchnorm_free_models(name, norm):
    model = build(name, norm=norm).train()
    assert count(model, nn.modules.batchnorm._BatchNorm) == 0
    assert (count(model, nn.GroupNorm) > 0) == (norm == "group")
    # without BatchNorm a sample's output does not depend on the rest of its batch,
    # even in train mode: what makes the distributed gradient maths exact
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(model(x)[1:2], model(x[1:2]), atol=1e-5)


def test_channels_last_gives_same_output():
    x = torch.randn(2, 1, 28, 28)
    plain, cl = build().eval(), build(channels_last=True).eval()
    assert cl.stage1[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), plain(x))


# ---------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize("wrap", ["plain", "checkpoint", "ddp"])
def test_pretrained_round_trip(tmp_path, wrap):
    source = build("resnet18", se=True)
    state = source.state_dict()
    if wrap == "checkpoint":
        state = {"model": state, "epoch": 3}
    elif wrap == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pth")
    torch.manual_seed(1)  # a different init: everything must come from the file
    loaded = build_model(ModelConfig(name="resnet18", se=True, small_stem=True,  # as the source's (auto, no weights)
                                     pretrained=str(tmp_path / "w.pth")), 10, 1)
    expected = source.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_mismatched_head_is_skipped_and_reported(tmp_path, caplog):
    source = build("simple_cnn", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    target = build("simple_cnn", num_classes=5)
    fc_before = target.fc.weight.clone()
    with caplog.at_level(logging.WARNING, logger="imgcls.models"):
        report = load_pretrained(target, str(tmp_path / "w.pth"))
    assert [s.split()[0] for s in report.skipped] == ["fc.weight", "fc.bias"]
    assert "fc.weight (10, 128) -> (5, 128)" in caplog.text
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(target.fc.weight, fc_before)
    assert torch.equal(target.stage3[1].weight, source.stage3[1].weight)


def test_missing_keys_are_reported(tmp_path, caplog):
    torch.save(build("resnet18").state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.WARNING, logger="imgcls.models"):
        report = load_pretrained(build("resnet18", se=True), str(tmp_path / "w.pth"))
    assert report.missing and all(".se." in k for k in report.missing)
    assert "layer1.0.se.fc1.weight" in caplog.text


def test_file_without_matching_keys_fails_naming_it(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="unrelated.pth"):
        build("simple_cnn", pretrained=str(path))


def test_rgb_stem_folds_into_grey(tmp_path):
    """A grey image gives the 1-channel model what (x, x, x) gives the RGB source."""
    rgb = build("resnet18", in_channels=3, small_stem=False).eval()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    grey = build("resnet18", in_channels=1, small_stem=False,
                 pretrained=str(tmp_path / "rgb.pth")).eval()
    assert torch.equal(grey.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_imagenet_fine_tunes():
    imagenet = torch.load(efficientnet_lite0_weights(), weights_only=True)
    torch.manual_seed(0)
    # 32 px inputs: the small stem over the pretrained weights, asked for (auto keeps their own)
    model = build_model(ModelConfig(name="efficientnet_lite0", pretrained="imagenet", small_stem=True,
                                    freeze_backbone=True, unfreeze_schedule=[[1, "all"]]),
                        num_classes=10, in_channels=1)
    assert torch.equal(model._conv_stem.weight,
                       imagenet["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model._blocks[5]._depthwise_conv.weight,
                       imagenet["_blocks.5._depthwise_conv.weight"])
    assert model._fc.weight.shape == (10, 1280)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"_fc.weight", "_fc.bias"}

    # ten classes of 32 px images, each a bright square at its own place, plus noise
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 10
    images = 0.3 * torch.randn(64, 1, 32, 32, generator=g)
    for i, y in enumerate(labels.tolist()):
        r, c = divmod(y, 5)
        images[i, 0, 4 + 12 * r:12 + 12 * r, 2 + 6 * c:6 + 6 * c] += 2.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stem_before = model._conv_stem.weight.clone()

    def epoch(epoch):
        apply_unfreeze_schedule(model, [[1, "all"]], epoch)
        losses = []
        for step in range(12):
            batch = torch.arange(16 * step, 16 * step + 16) % 64
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    model.train()
    head_only = epoch(0)
    assert torch.equal(model._conv_stem.weight, stem_before)   # frozen means unchanged
    fine_tuned = epoch(1)
    assert not torch.equal(model._conv_stem.weight, stem_before)
    assert sum(fine_tuned[-4:]) / 4 < 0.5 * sum(head_only[:4]) / 4


# ---------------------------------------------------------------- freezing


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,head", [("simple_cnn", "fc"), ("resnet18", "fc"),
                                       ("mobilenet_v3_small", "classifier.3"),
                                       ("efficientnet_lite0", "_fc")])
def test_head_is_the_classifier(name, head):
    model = build(name, num_classes=7)
    assert head_name(model) == head
    assert [p.shape[0] for p in head_parameters(model)] == [7, 7]


def test_resnet_head_with_dropout():
    model = build("resnet18", dropout=0.5)
    assert head_name(model) == "fc.1"
    assert isinstance(model.fc[0], nn.Dropout)


def test_unfreeze_schedule():
    schedule = [[2, "layer4"], [4, "all"]]
    model = build("resnet18", freeze_backbone=True, unfreeze_schedule=schedule)
    everything = {n for n, _ in model.named_parameters()}
    head = {"fc.weight", "fc.bias"}
    layer4 = {n for n in everything if n.startswith("layer4.")}
    assert trainable(model) == head

    assert apply_unfreeze_schedule(model, schedule, 0) == []
    assert apply_unfreeze_schedule(model, schedule, 1) == []
    assert trainable(model) == head
    assert set(apply_unfreeze_schedule(model, schedule, 2)) == layer4
    assert trainable(model) == head | layer4
    assert apply_unfreeze_schedule(model, schedule, 3) == []   # idempotent
    assert set(apply_unfreeze_schedule(model, schedule, 4)) == everything - head - layer4
    assert trainable(model) == everything

    # resuming at epoch 3 on a freshly built (frozen) model reaches the same state
    resumed = build("resnet18", freeze_backbone=True)
    apply_unfreeze_schedule(resumed, schedule, 3)
    assert trainable(resumed) == head | layer4


def test_frozen_parameters_get_no_gradient():
    model = build("simple_cnn")
    freeze_backbone(model)
    F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.arange(4)).backward()
    assert all((p.grad is not None) == (n.startswith("fc.")) for n, p in model.named_parameters())


def test_unknown_unfreeze_prefix_fails_at_once():
    model = build("resnet18", freeze_backbone=True)
    with pytest.raises(ValueError, match="layer5.*layer4"):
        apply_unfreeze_schedule(model, [[10, "layer5"]], 0)


@pytest.mark.parametrize("in_channels,width", [(1, 32), (1, 8), (3, 16)])
def test_whitening_init_decorrelates_the_first_convs_patch_features(in_channels, width):
    torch.manual_seed(0)
    # strongly correlated neighbouring pixels, as in real images
    images = F.avg_pool2d(torch.randn(200, in_channels, 30, 30), 3, stride=1) * 3 + 0.5
    model = build("fast_cnn", in_channels=in_channels, width=width, whiten_images=200)
    untouched = model.blocks[0][0].weight.detach().clone()
    model.init_whitening(images, eps=1e-8)
    conv = model.blocks[0][0]
    k = min(9 * in_channels, width // 2)
    with torch.no_grad():
        features = conv(images).transpose(0, 1).reshape(width, -1).double()
    cov = torch.cov(features[:k])
    assert torch.allclose(cov, torch.eye(k, dtype=cov.dtype), atol=0.02), "whitened features are not white"
    assert torch.equal(conv.weight[k:2 * k], -conv.weight[:k])  # both signs survive the ReLU
    assert torch.equal(conv.weight[2 * k:], untouched[2 * k:])  # the rest keep their random init


def test_whitening_init_does_not_overwrite_pretrained_weights():
    with pytest.raises(ValueError, match="whiten_images"):
        build("fast_cnn", whiten_images=100, pretrained="some/weights.pt")


def test_fast_cnn_options_do_not_stop_switching_to_another_model():
    # the default recipe sets them; `model.name=resnet18` on its command line must still work
    model = build("simple_cnn", whiten_images=100, block_multipliers=[1, 4, 8])
    assert not hasattr(model, "init_whitening")


def test_fast_cnn_block_widths():
    assert [block[0].out_channels for block in build("fast_cnn", width=8).blocks] == [8, 16, 32]
    model = build("fast_cnn", width=16, block_multipliers=[1, 4, 8])
    assert [block[0].out_channels for block in model.blocks] == [16, 64, 128]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="block_multipliers"):
        build("fast_cnn", block_multipliers=[1, 0])


def test_balanced_class_weights_make_every_class_weigh_the_same():
    from imgcls.losses import balanced_class_weights, classification_loss

    weights = balanced_class_weights([90, 10, 0])
    assert weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 0.0])
    # a batch of 9 samples of class 0 and 1 of class 1: both classes contribute equally
    logits, labels = torch.randn(10, 3), torch.tensor([0] * 9 + [1])
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    weighted = classification_loss(logits, labels, class_weights=balanced_class_weights([9, 1, 0]))
    assert weighted.item() == pytest.approx(((per_sample[:9] * 10 / 18).sum() + per_sample[9] * 10 / 2).item() / 10)


@pytest.mark.parametrize("size, small", [(28, True), (64, True), (224, False)])
def test_small_stem_auto_follows_the_input_size(size, small):
    from imgcls.config import ModelConfig

    model = build_model(ModelConfig(name="resnet18", small_stem="auto"), 10, 3, input_size=size)
    assert (model.conv1.stride == (1, 1)) == small and isinstance(model.maxpool, nn.Identity) == small


def test_timm_models_by_name_with_weights_from_a_local_file(tmp_path):
    import timm

    from imgcls.config import ModelConfig

    source = timm.create_model("resnet10t", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    from safetensors.torch import save_file
    save_file(source.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    for weights in ("resnet10t.pth", "resnet10t.safetensors"):
        model = build_model(ModelConfig(name="timm/resnet10t", pretrained=str(tmp_path / weights)), 7, 3)
        assert model.get_classifier().out_features == 7
        assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)  # the stem came from the file
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown timm model 'resnet10'; did you mean timm/resnet10t"):
        build_model(ModelConfig(name="timm/resnet10"), 7, 3)


def test_small_stem_auto_keeps_the_pretrained_stem_at_any_size(tmp_path, bands_dataset):
    """An ImageNet ResNet-18 fine-tuned on 32 px images keeps its pretrained first conv under
    auto; the small stem over pretrained weights is only taken when asked for."""
    from imgcls.config import ModelConfig

    torch.manual_seed(0)  # the "pretrained" weights are random: some draws gave a non-finite first step
    source = build("resnet18", in_channels=3, small_stem=False)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    tuned = build_model(ModelConfig(name="resnet18", pretrained=str(weights)), 10, 3, input_size=32)
    assert tuned.conv1.stride == (2, 2) and torch.equal(tuned.conv1.weight, source.conv1.weight)
    assert not isinstance(tuned.maxpool, nn.Identity)
    asked = build_model(ModelConfig(name="resnet18", pretrained=str(weights), small_stem=True), 10, 3, input_size=32)
    assert asked.conv1.kernel_size == (3, 3) and isinstance(asked.maxpool, nn.Identity)

    # the start-up line says which stem and why
    out = launch([f"data.url={bands_dataset}", f"run.dir={tmp_path / 'run'}", *EXACT_RUN, "model.name=resnet18",
                  f"model.pretrained={weights}", "train.max_steps=1"], nproc=None, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backend none; resnet18 with own stem (auto: kept for the pretrained weights); precision" in out.stderr
