"""Gradients all-reduced after the backward (training/gradient_sync.py) and the process group
that torchrun's single process joins (training/distributed.py)."""

import gc
import socket
import weakref

import pytest
import torch
import torch.distributed as dist

from diffunet.training import distributed
from diffunet.training.distributed import DistInfo
from diffunet.training.gradient_sync import GradientAllReduce, dense_strides, gradient_buckets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives its one process."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield
    distributed.cleanup()


def test_buckets_hold_the_trainable_parameters_of_one_dtype_in_order():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 100, 5)]
    params.insert(2, torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    params.append(torch.nn.Parameter(torch.zeros(3), requires_grad=False))
    buckets = gradient_buckets(params)
    assert [[p.numel() for p in b] for b in buckets] == [[10, 20, 30, 100, 5], [4]]


@pytest.mark.parametrize(
    ("tensor", "strides"),
    [
        (torch.empty(4, 3, 3, 3).to(memory_format=torch.channels_last), (27, 1, 9, 3)),
        (torch.empty(3, 1, 4).transpose(0, 2), (1, 4, 4)),  # any dense permutation
        (torch.empty(2, 3)[:, :2], (2, 1)),  # a slice leaves holes: contiguous instead
        (torch.empty(()), ()),
    ],
)
def test_gradient_views_take_the_parameters_strides_where_they_are_dense(tensor, strides):
    assert dense_strides(tensor) == strides


def test_gradients_become_views_of_one_buffer_and_the_backwards_are_released(torchrun_env):
    info = distributed.setup("cpu")
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    sync = GradientAllReduce(conv.parameters(), info)
    released = weakref.ref(conv.weight.grad)
    sync()
    gc.collect()
    assert released() is None  # nothing, the process group included, holds the backward's
    (buffer,) = [b.buffer for b in sync.buffers]
    for p in conv.parameters():
        assert p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert p.grad.stride() == p.stride()
    conv.zero_grad(set_to_none=True)
    conv(x).sum().backward()
    expected = conv.weight.grad.clone()
    sync()  # the second step reuses the buffer
    assert torch.equal(conv.weight.grad, expected)
    assert conv.weight.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_a_process_alone_in_its_group_keeps_its_gradients(torchrun_env):
    info = distributed.setup("cpu")
    assert info.grouped and info.enabled and info.world_size == 1 and dist.is_initialized()
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    unused = torch.nn.Parameter(torch.ones(5))
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    before = [conv.weight.grad.clone(), conv.bias.grad.clone()]
    GradientAllReduce([*conv.parameters(), unused], info)()
    assert torch.equal(conv.weight.grad, before[0]) and torch.equal(conv.bias.grad, before[1])
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(unused.grad, torch.zeros(5))  # no gradient: zeros, as on every rank


def test_world_size_one_joins_a_group_only_where_a_launcher_named_one(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    info = distributed.setup("cpu")
    assert not info.grouped and not info.enabled and not dist.is_initialized()
    assert DistInfo(world_size=2).enabled and not DistInfo().enabled


def _average_on_rank(rank: int, store_path: str, results) -> None:
    """One of two gloo ranks: gradients rank-dependent, then averaged."""
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, world_size=2, grouped=True)
        weight = torch.nn.Parameter(torch.zeros(2, 3))
        scale = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        weight.grad = torch.arange(6.0).view(2, 3) * (rank + 1)  # rank 1: twice rank 0's
        scale.grad = torch.tensor(10.0 * rank, dtype=torch.float64)
        GradientAllReduce([weight, scale], info)()
        results[rank] = (weight.grad.tolist(), scale.grad.item())
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_the_mean_of_their_gradients(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_average_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
    mean = (torch.arange(6.0).view(2, 3) * 1.5).tolist()  # (1 + 2) / 2 times the base
    assert results[0] == results[1] == (mean, 5.0)
