"""The torchvision-free FID Inception: state-dict keys/shapes equal those of pt_inception-2015-12-05-6726825d.pth,
loading from a path, a URL (cache) and refusing anything else."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from batch.metrics.inception import FIDInceptionV3, load_inception, random_inception, resolve_weights


def _conv(name, cin, cout, k):
    """BasicConv2d keys as torchvision's inception.py defines them (conv bias=False, BatchNorm2d)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return {f"{name}.conv.weight": (cout, cin, kh, kw), f"{name}.bn.weight": (cout,), f"{name}.bn.bias": (cout,),
            f"{name}.bn.running_mean": (cout,), f"{name}.bn.running_var": (cout,),
            f"{name}.bn.num_batches_tracked": ()}


def reference_shapes() -> dict:
    """Derived by hand from torchvision's Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's
    FIDInceptionA/C/E_1/E_2 swapped in (same submodules as InceptionA/C/E): the layout of the weights file."""
    s = {}
    for name, cin, cout, k in [("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3),
                               ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)]:
        s |= _conv(name, cin, cout, k)
    for block, cin, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:  # InceptionA
        for sub, a, b, k in [("branch1x1", cin, 64, 1), ("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5),
                             ("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3),
                             ("branch3x3dbl_3", 96, 96, 3), ("branch_pool", cin, pool, 1)]:
            s |= _conv(f"{block}.{sub}", a, b, k)
    for sub, a, b, k in [("branch3x3", 288, 384, 3), ("branch3x3dbl_1", 288, 64, 1), ("branch3x3dbl_2", 64, 96, 3),
                         ("branch3x3dbl_3", 96, 96, 3)]:  # Mixed_6a: InceptionB
        s |= _conv(f"Mixed_6a.{sub}", a, b, k)
    for block, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:  # InceptionC
        for sub, a, b, k in [("branch1x1", 768, 192, 1), ("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, (1, 7)),
                             ("branch7x7_3", c7, 192, (7, 1)), ("branch7x7dbl_1", 768, c7, 1),
                             ("branch7x7dbl_2", c7, c7, (7, 1)), ("branch7x7dbl_3", c7, c7, (1, 7)),
                             ("branch7x7dbl_4", c7, c7, (7, 1)), ("branch7x7dbl_5", c7, 192, (1, 7)),
                             ("branch_pool", 768, 192, 1)]:
            s |= _conv(f"{block}.{sub}", a, b, k)
    for sub, a, b, k in [("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3), ("branch7x7x3_1", 768, 192, 1),
                         ("branch7x7x3_2", 192, 192, (1, 7)), ("branch7x7x3_3", 192, 192, (7, 1)),
                         ("branch7x7x3_4", 192, 192, 3)]:  # Mixed_7a: InceptionD
        s |= _conv(f"Mixed_7a.{sub}", a, b, k)
    for block, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:  # InceptionE
        for sub, a, b, k in [("branch1x1", cin, 320, 1), ("branch3x3_1", cin, 384, 1),
                             ("branch3x3_2a", 384, 384, (1, 3)), ("branch3x3_2b", 384, 384, (3, 1)),
                             ("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3),
                             ("branch3x3dbl_3a", 384, 384, (1, 3)), ("branch3x3dbl_3b", 384, 384, (3, 1)),
                             ("branch_pool", cin, 192, 1)]:
            s |= _conv(f"{block}.{sub}", a, b, k)
    s["fc.weight"], s["fc.bias"] = (1008, 2048), (1008,)
    return s


def test_state_dict_keys_and_shapes_match_the_weights_file_layout():
    got = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    want = reference_shapes()
    assert sorted(got) == sorted(want)
    assert got == want
    # 94 BasicConv2d layers; about 23.9M parameters as in the TF graph (with the 1008-way fc)
    assert sum(1 for k in got if k.endswith(".conv.weight")) == 94
    assert 23.5e6 < sum(int(np.prod(v)) for k, v in want.items() if "num_batches" not in k) < 24.5e6


def test_forward_gives_2048_features_at_299():
    net = random_inception(1)
    with torch.no_grad():
        f = net(torch.rand(2, 3, 299, 299) * 2 - 1)
    assert f.shape == (2, 2048) and bool((f >= 0).all())  # post-ReLU average pool
    assert float(f.std()) > 1e-3


def test_load_from_path_roundtrip_and_without_batch_counters(tmp_path):
    net = random_inception(2)
    sd = net.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    loaded = load_inception(str(tmp_path / "w.pth"))
    x = torch.rand(1, 3, 96, 96) * 2 - 1  # fully convolutional: a small input keeps the test fast
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # older files lack BatchNorm's num_batches_tracked: still accepted
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    with torch.no_grad():
        assert torch.equal(load_inception(str(tmp_path / "old.pth"))(x), net(x))


def test_wrong_state_dicts_are_refused(tmp_path):
    sd = random_inception(3).state_dict()
    bad_shape = dict(sd, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        load_inception(str(tmp_path / "shape.pth"))
    missing = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing"):
        load_inception(str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError):
        load_inception(str(tmp_path / "nope.pth"))


class Exploit:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickled_objects_are_not_unpickled(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_inception(str(tmp_path / "evil.pth"))


def test_url_uses_the_local_cache(tmp_path):
    url = "https://example.invalid/fid_weights/pt_inception-2015-12-05-6726825d.pth"
    cached = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="cannot download"):
        resolve_weights(url, cache=tmp_path)  # not cached, no network
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception(4).state_dict(), cached)
    assert resolve_weights(url, cache=tmp_path) == cached
    assert isinstance(load_inception(url, cache=tmp_path), FIDInceptionV3)
