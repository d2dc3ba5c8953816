import time

import pytest
import torch
import torchvision

from cliphand3d.data.transforms import model_input
from cliphand3d.errors import PretrainedWeightsError
from cliphand3d.models import pretrained
from cliphand3d.models.backbone import ResNetBackbone


@pytest.mark.parametrize("name, channels", [("resnet18", [64, 64, 128, 256, 512]),
                                            ("resnet50", [64, 256, 512, 1024, 2048])])
def test_pyramid_strides_and_channels(name, channels):
    net = ResNetBackbone(name=name).eval()
    assert net.channels == channels
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 64))
    assert len(feats) == 5
    for f, c, s in zip(feats, channels, (4, 4, 8, 16, 32)):
        assert f.shape == (1, c, 64 // s, 64 // s)


def test_three_stages_end_at_layer3_and_load_a_full_torchvision_file(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)  # layer4.* and fc.* are not part of a 3-stage encoder
    net = ResNetBackbone(name="resnet18", pretrained=str(path), stages=3).eval()
    assert not any(k.startswith("layer4.") for k in net.state_dict())
    assert net.channels == [64, 64, 128, 256, 256] and net.strides == [4, 4, 8, 16, 16]
    x = torch.randn(2, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(ref.children())[:-3]).eval()  # up to layer3
    with torch.no_grad():
        feats = net(x)
        assert feats[4] is feats[3] and feats[4].shape == (2, 256, 4, 4)
        assert torch.allclose(feats[4], trunk(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"model\.backbone_stages=2.*choose one of \[4, 3\]"):
        ResNetBackbone(name="resnet18", stages=2)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="resnet18.*resnet34.*resnet50"):
        ResNetBackbone(name="resnet101")


def test_local_file_loads_exact_weights_and_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    # Non-default BN statistics so a silently skipped buffer would show.
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)  # includes fc.*, which the encoder must ignore

    net = ResNetBackbone(name="resnet18", pretrained=str(path)).eval()
    ref_sd = ref.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    trunk = torch.nn.Sequential(*list(ref.children())[:-2]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x)[4], trunk(x), atol=1e-6)


def test_local_file_of_wrong_architecture_names_file(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="r18.pth.*resnet34"):
        ResNetBackbone(name="resnet34", pretrained=path)


def test_missing_local_file():
    with pytest.raises(PretrainedWeightsError, match="no such file.*pretrained=null"):
        ResNetBackbone(name="resnet18", pretrained="/nonexistent/weights.pth")


def test_unknown_tag_lists_tags():
    with pytest.raises(PretrainedWeightsError, match="IMAGENET1K_V1"):
        ResNetBackbone(name="resnet18", pretrained="IMAGENET_NOPE")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_uncached_tag_offline_env_fails_fast_without_probing(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "reachable", lambda *a, **k: pytest.fail("network probed offline"))
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as info:
        ResNetBackbone(name="resnet18", pretrained="IMAGENET1K_V1")
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert "model.pretrained=null" in msg and "hub cache" in msg
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_uncached_tag_unreachable_network_fails_fast(empty_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TORCH_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "reachable", lambda *a, **k: False)
    with pytest.raises(PretrainedWeightsError, match="model.pretrained=null"):
        ResNetBackbone(name="resnet18", pretrained="DEFAULT")


def test_cached_tag_loads_from_hub_cache(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), empty_hub / "checkpoints" / url.rsplit("/", 1)[-1])
    net = ResNetBackbone(name="resnet18", pretrained="DEFAULT")  # DEFAULT is IMAGENET1K_V1 here
    assert torch.equal(net.conv1.weight, ref.conv1.weight)
    assert torch.equal(net.layer4[1].bn2.weight, ref.layer4[1].bn2.weight)


def test_imagenet_input_norm_feeds_the_weights_what_torchvision_trained_them_on(tmp_path, caplog):
    """Crops arrive as (x/255 - 0.5)/0.5 (model_input); input_norm=imagenet must make the first convolution see
    torchvision's (x/255 - mean)/std, so a plain torchvision ResNet on that input gives the same features."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    with caplog.at_level("WARNING"):
        net = ResNetBackbone(name="resnet18", pretrained=str(path), input_norm="imagenet").eval()
    assert "input_norm" not in caplog.text
    u8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tv = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(u8.float() / 255)
    trunk = torch.nn.Sequential(*list(ref.children())[:-2]).eval()
    with torch.no_grad():
        assert torch.allclose(net(model_input(u8))[4], trunk(tv), atol=1e-5)
        # symmetric (the constructor default, every run before the option) is the input as it arrives
        sym = ResNetBackbone(name="resnet18", pretrained=str(path)).eval()
        assert torch.equal(sym(model_input(u8))[4], trunk(model_input(u8)))
        assert not torch.allclose(sym(model_input(u8))[4], net(model_input(u8))[4], atol=1e-3)
    # nothing new in the state dict: torchvision files and older runs' weights load as before
    assert net.state_dict().keys() == sym.state_dict().keys()
    with caplog.at_level("WARNING"):
        ResNetBackbone(name="resnet18", pretrained=str(path))
    assert "model.input_norm=imagenet" in caplog.text
    with pytest.raises(ValueError, match=r"model\.input_norm='imnet'.*imagenet"):
        ResNetBackbone(name="resnet18", input_norm="imnet")
