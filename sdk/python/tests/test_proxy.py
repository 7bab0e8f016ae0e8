"""The object `with load_model(...) as model` binds."""

from __future__ import annotations

import gc
import weakref

import pytest

from modelpool import ModelUnloadedError, unwrap
from modelpool.proxy import ModelProxy


class Net:
    def __init__(self):
        self.scale = 2
        self.items = [1, 2, 3]

    def __call__(self, x):
        return x * self.scale

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    def process(self, x):
        return x + 1


def test_forwards_attributes_calls_items_and_isinstance():
    net = Net()
    proxy = ModelProxy("net", net)
    assert proxy.process(1) == 2 and proxy(3) == 6 and proxy[1] == 2 and len(proxy) == 3
    assert list(proxy) == [1, 2, 3]
    assert isinstance(proxy, Net)
    proxy.scale = 5
    assert net.scale == 5
    assert unwrap(proxy) is net
    assert "net" in repr(proxy)


def test_detached_proxy_lets_go_and_says_why():
    """Regression: the seed's example leaves `model` bound after the block; it must not keep the weights."""
    net = Net()
    ref = weakref.ref(net)
    proxy = ModelProxy("upscale", net)
    proxy._modelpool_detach("model 'upscale' was unloaded")
    del net
    gc.collect()
    assert ref() is None
    with pytest.raises(ModelUnloadedError, match="model 'upscale' was unloaded"):
        proxy.process(1)
    with pytest.raises(ModelUnloadedError):
        proxy(1)
    with pytest.raises(ModelUnloadedError):
        unwrap(proxy)
    assert "unloaded" in repr(proxy)


def test_operators_forward():
    proxy = ModelProxy("n", 10)
    assert proxy + 1 == 11 and 1 + proxy == 11 and proxy * 2 == 20 and -proxy == -10 and proxy > 5
