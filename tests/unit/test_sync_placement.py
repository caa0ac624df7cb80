"""Where the exchange runs: outside the caller's autocast region, and on one device a bucket."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetrain


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)


# autocast's low-precision type on each device: bfloat16 on the CPU, float16 on CUDA (where
# PowerSGD's products of a loss-scaled gradient overflowed)
AUTOCAST = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _synced_grads(compressor: str, autocast: bool, device: str, **options) -> list[torch.Tensor]:
    model = _model(device)
    sync = sparsetrain.GradientSync(model, compressor, **options)
    g = torch.Generator().manual_seed(1)
    for _, p in sync.params:
        p.grad = (torch.randn(p.shape, generator=g) * 1000).to(device)
    if autocast:
        with torch.autocast(device, dtype=AUTOCAST[device]):
            assert sync.synchronize()
    else:
        assert sync.synchronize()
    return [p.grad.clone() for _, p in sync.params]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
@pytest.mark.parametrize(
    ("compressor", "options"),
    [("powersgd", {"rank": 2}), ("topk", {"density": 0.1}), ("qsgd", {})],
)
def test_an_autocast_region_around_synchronize_does_not_change_the_exchange(
    one_thread, compressor, options, device
):
    """PowerSGD's products ran in bfloat16 when synchronize() was called inside the training
    step's autocast region (and float16 on CUDA, where a loss-scaled gradient overflows)."""
    plain = _synced_grads(compressor, False, device, **options)
    inside = _synced_grads(compressor, True, device, **options)
    assert all(a.dtype == torch.float32 for a in inside)
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)


def test_a_model_on_two_devices_gets_buckets_of_one_device_each():
    """A bucket is exchanged as one tensor: a model spread over devices (here one layer on the
    meta device stands in for a second GPU) failed at every step with "parts must share one
    dtype and device"."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"), nn.Linear(4, 2))
    sync = sparsetrain.GradientSync(model, "topk", density=0.5, bucket_cap_mb=25)
    devices = [{p.device for _, p in bucket} for bucket in sync.buckets]
    assert devices == [{torch.device("cpu")}, {torch.device("meta")}, {torch.device("cpu")}]


class _BrokenExecutor:
    """An executor that fails before running anything (as a sticky CUDA error makes setting the
    device or stream fail)."""

    def submit(self, fn, device=None) -> torch.futures.Future:
        fut = torch.futures.Future()
        fut.set_exception(RuntimeError("CUDA error: an illegal memory access was encountered"))
        return fut


def test_buckets_held_after_a_load_get_the_error_when_the_exchange_never_ran(one_thread):
    """After a load, the hook holds DDP's first buckets until the last one and exchanges the
    saved groups; where the executor failed before running that exchange, only the last
    bucket's future got the error and DDP waited for the others for ever."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = sparsetrain.register_ddp_hook(DDP(_model()), "topk", density=0.5)
        state._executor = _BrokenExecutor()
        state._target = [["a"], ["b"]]
        shapes = [torch.Size([3])]
        first = state._regroup(torch.zeros(3), ["a"], shapes, last=False)
        last = state._regroup(torch.zeros(3), ["b"], shapes, last=True)
        for fut in (first, last):
            assert fut.done()
            with pytest.raises(RuntimeError, match="illegal memory access"):
                fut.wait()
    finally:
        dist.destroy_process_group()
