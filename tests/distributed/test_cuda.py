"""CUDA placement: compressors, GradientSync and the DDP hook on CUDA tensors, a state saved on
CPU resumed on CUDA, and the sparse collectives on CUDA tensors over gloo (two ranks sharing one
GPU) and over NCCL (two GPUs). Skipped without a CUDA device (a GPU machine or GPU CI job runs
it).

The placement tests run one rank (a gloo world of 1 through the harness's FileStore), so the
collectives are trivial and what is tested is where the work and the state live: outputs,
residuals and compressor state on the gradients' device, futures completed on the right stream,
residuals saved on CPU moved to the GPU at their first use. Gradients are computed on CPU and
copied to both models, so the CUDA run gets the very bits the CPU run gets and the two are
compared closely.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsetrain
from sparsetrain.comm.registry import get_collective
from sparsetrain.compressors import available_compressors, get_compressor
from sparsetrain.pruning import get_pruner

from .harness import oks, run_world
from .test_sparse_collectives import ALL, OK_K, OK_NUMEL, training_like

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)

CUDA = torch.device("cuda", 0)

# name -> (options, how the CUDA result compares with the CPU one on the same input)
#   "close": the same computation (selection and scaling identical; reductions may round
#            differently in the last bits);
#   "random": draws on the tensor's device (CUDA's generator is not CPU's): shape, device,
#            finiteness only.
# Random-k draws its indices on a CPU generator, so CUDA selects the same entries as CPU.
COMPRESSORS = {
    "none": ({}, "close"),
    "fp16": ({}, "close"),
    "bf16": ({}, "close"),
    "topk": ({"density": 0.1}, "close"),
    "threshold": ({"density": 0.1}, "close"),
    "randomk": ({"density": 0.25}, "close"),
    "signsgd": ({}, "close"),
    "powersgd": ({"rank": 2}, "close"),  # its initial matrices come from a CPU generator
    "qsgd": ({}, "random"),
    "terngrad": ({}, "random"),
}


def test_every_compressor_is_covered():  # also without CUDA: a new compressor joins the list
    assert set(COMPRESSORS) == set(available_compressors())


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """``got`` (computed on CUDA, copied back) is ``want`` (computed on CPU) up to rounding."""
    assert got.dtype == want.dtype and got.shape == want.shape, name
    rtol = 1e-3 if name == "powersgd" else 1e-5
    atol = rtol * float(want.abs().max()) + 1e-7
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol, msg=name)


def _roundtrip(c, t: torch.Tensor, key: str = "k") -> torch.Tensor:
    payload, ctx = c.compress(t, key=key)
    for _ in range(c.rounds - 1):  # one process: the "sum" of the payloads is its own
        payload, ctx = c.next_round(payload, ctx)
    return c.decompress(payload, ctx)


@needs_cuda
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressors_run_on_cuda_tensors_as_on_cpu(name):
    opts, how = COMPRESSORS[name]
    a, b = get_compressor(name, **opts), get_compressor(name, **opts)
    for step in range(3):  # later steps too: thresholds, warm starts, per-key step counters
        t = torch.randn(40, 30, generator=torch.Generator().manual_seed(step))
        on_cuda, on_cpu = _roundtrip(a, t.to(CUDA)), _roundtrip(b, t)
        assert on_cuda.device.type == "cuda" and torch.isfinite(on_cuda).all()
        if how == "close":
            _close(on_cuda, on_cpu, name)
            if name in ("topk", "threshold", "randomk"):  # the same entries were sent
                assert torch.equal(on_cuda.cpu() != 0, on_cpu != 0), name
        else:
            assert on_cuda.shape == on_cpu.shape and on_cuda.dtype == on_cpu.dtype


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))


def _grads_on_cpu(net: nn.Module, step: int) -> list[torch.Tensor]:
    """The gradients of a CPU copy of ``net`` on step ``step``'s batch."""
    ref = _net()
    ref.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    nn.functional.cross_entropy(ref(x), y).backward()
    return [p.grad for p in ref.parameters()]


def _set_grads(net: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(net.parameters(), grads):
        p.grad = g.to(p.device).clone()


def _residual_devices(engine) -> set[str]:
    return {r.device.type for r in engine.feedback.residuals.values()}


def _grads(net: nn.Module) -> tuple[list[torch.Tensor], set[str]]:
    """Copies of ``net``'s gradients on CPU (for the test process), and their devices."""
    return [p.grad.detach().cpu() for p in net.parameters()], {
        p.grad.device.type for p in net.parameters()
    }


def _gradient_sync(rank: int, world: int, device: torch.device) -> dict:
    out = {}
    for name, (opts, how) in COMPRESSORS.items():
        torch.manual_seed(0)
        cpu_net = _net()
        gpu_net = _net().to(device)
        gpu_net.load_state_dict(cpu_net.state_dict())
        cpu_sync = sparsetrain.GradientSync(cpu_net, name, bucket_cap_mb=0.001, **opts)
        gpu_sync = sparsetrain.GradientSync(gpu_net, name, bucket_cap_mb=0.001, **opts)
        assert len(gpu_sync.buckets) > 1, "several buckets"
        for step in range(3):
            grads = _grads_on_cpu(cpu_net, step)
            _set_grads(cpu_net, grads)
            _set_grads(gpu_net, grads)
            assert cpu_sync.synchronize() and gpu_sync.synchronize()
        out[name] = {
            "how": how,
            "gpu": _grads(gpu_net),
            "cpu": _grads(cpu_net),
            "residuals": _residual_devices(gpu_sync.engine),
            "error_feedback": gpu_sync.engine.feedback.enabled,
            "steps": gpu_sync.stats()["steps"],
        }
    return out


@needs_cuda
def test_gradient_sync_on_cuda_with_one_rank(tmp_path):
    (out,) = oks(run_world(_gradient_sync, 1, tmp_path, CUDA))
    for name, r in out.items():
        assert r["steps"] == 3, name
        assert r["gpu"][1] == {"cuda"} and r["cpu"][1] == {"cpu"}, name
        for gpu, cpu in zip(r["gpu"][0], r["cpu"][0]):
            assert torch.isfinite(gpu).all(), name
            if r["how"] == "close":
                _close(gpu, cpu, name)
        # Error feedback keeps its residuals where the gradients are.
        assert r["residuals"] == ({"cuda"} if r["error_feedback"] else set()), name


def _resume_on_cuda(rank: int, world: int, device: torch.device) -> dict:
    """Two steps on CPU, saved; the state loaded (map_location="cpu") into a CUDA run and the
    CPU run, each stepping once more on the same gradient. GradientSync and the DDP hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for how in ("gradient_sync", "ddp"):
        torch.manual_seed(0)
        net = _net()
        if how == "ddp":
            model = DDP(net, bucket_cap_mb=0.001)
            sync = sparsetrain.register_ddp_hook(model, "threshold", density=0.1)
        else:
            sync = sparsetrain.GradientSync(net, "threshold", density=0.1, bucket_cap_mb=0.001)
        for step in range(2):
            if how == "ddp":
                g = torch.Generator().manual_seed(step)
                x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
                net.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
            else:
                _set_grads(net, _grads_on_cpu(net, step))
                assert sync.synchronize()
        buf = io.BytesIO()
        torch.save({"model": net.state_dict(), "sync": sync.state_dict()}, buf)

        runs = {}
        for where in ("cpu", "cuda"):
            buf.seek(0)
            saved = torch.load(buf, map_location="cpu", weights_only=False)
            fresh = _net().to(device if where == "cuda" else "cpu")
            fresh.load_state_dict(saved["model"])
            if how == "ddp":
                ids = [device.index] if fresh[0].weight.is_cuda else None
                model = DDP(fresh, device_ids=ids, bucket_cap_mb=0.001)
                state = sparsetrain.register_ddp_hook(model, "threshold", density=0.1)
                state.load_state_dict(saved["sync"])
                g = torch.Generator().manual_seed(2)
                x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
                nn.functional.cross_entropy(model(x.to(fresh[0].weight.device)),
                                            y.to(fresh[0].weight.device)).backward()  # fmt: skip
                engine = state.engine
            else:
                state = sparsetrain.GradientSync(
                    fresh, "threshold", density=0.1, bucket_cap_mb=0.001
                )
                state.load_state_dict(saved["sync"])
                _set_grads(fresh, _grads_on_cpu(fresh, 2))
                assert state.synchronize()
                engine = state.engine
            runs[where] = {
                "grads": _grads(fresh),
                "residuals": _residual_devices(engine),
                "steps": engine.stats()["steps"],
            }
        out[how] = runs
    return out


@needs_cuda
def test_a_state_saved_on_cpu_resumes_on_cuda(tmp_path):
    (out,) = oks(run_world(_resume_on_cuda, 1, tmp_path, CUDA))
    for how, runs in out.items():
        gpu, cpu = runs["cuda"], runs["cpu"]
        assert gpu["steps"] == cpu["steps"] == 3, how
        assert gpu["residuals"] == {"cuda"} and cpu["residuals"] == {"cpu"}, how
        assert gpu["grads"][1] == {"cuda"}, how
        for g, c in zip(gpu["grads"][0], cpu["grads"][0]):
            assert torch.isfinite(g).all(), how
            if how == "gradient_sync":  # the same gradient bits in: the same selection out
                _close(g, c, "threshold")
        if how == "ddp":  # backward ran on each device: close, and about as sparse
            flat_g = torch.cat([g.reshape(-1) for g in gpu["grads"][0]])
            flat_c = torch.cat([c.reshape(-1) for c in cpu["grads"][0]])
            assert float((flat_g - flat_c).norm()) <= 0.05 * float(flat_c.norm()), how
            assert abs(int((flat_g != 0).sum()) - int((flat_c != 0).sum())) <= 5, how


def _collectives_on_cuda(rank: int, world: int, backend: str) -> list[str]:
    """Every sparse collective on CUDA tensors (over ``backend``) and on the same inputs on CPU
    (over gloo), for three steps of training-like inputs; return what differed."""
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    problems = []
    for name in ALL:
        on_cpu, on_gpu = get_collective(name), get_collective(name)
        for step in range(3):
            idx, val = training_like(step, rank, OK_NUMEL, OK_K)
            want = on_cpu(idx, val, OK_NUMEL, group=cpu_group, key="w")
            got = on_gpu(idx.to(device), val.to(device), OK_NUMEL, key="w")
            where = f"{name} step {step}"
            if (got.bytes_sent, got.bytes_recv) != (want.bytes_sent, want.bytes_recv):
                problems.append(f"{where}: traffic {got.bytes_sent} != {want.bytes_sent}")
            for field in ("dense", "indices", "values"):
                g, w = getattr(got, field), getattr(want, field)
                if (g is None) != (w is None):
                    problems.append(f"{where}: {field} missing on one side")
                elif g is not None and g.device.type != "cuda":
                    problems.append(f"{where}: {field} on {g.device}")
                elif g is not None and field == "indices" and not torch.equal(g.cpu(), w):
                    problems.append(f"{where}: different selection")
                elif g is not None and not torch.allclose(g.cpu(), w, rtol=1e-12, atol=1e-12):
                    problems.append(f"{where}: {field} differ")
    return problems


@needs_cuda
def test_sparse_collectives_on_cuda_tensors_over_gloo(tmp_path):
    # gloo's send and receive take host memory only: the collectives stage CUDA tensors.
    for problems in oks(run_world(_collectives_on_cuda, 2, tmp_path, "gloo")):
        assert problems == []


@needs_two_gpus
def test_sparse_collectives_over_nccl(tmp_path):
    results = run_world(_collectives_on_cuda, 2, tmp_path, "nccl", backend="nccl")
    for problems in oks(results):
        assert problems == []


@needs_cuda
@pytest.mark.parametrize(
    "name, options",
    [("magnitude", {"sparsity": 0.5}), ("rigl", {"sparsity": 0.5, "delta_t": 1, "end": 10})],
)
def test_a_pruner_prepared_on_cpu_follows_its_model_to_cuda(name, options):
    # model.to(device) after prepare() moves the weights (the same Parameters) but not the
    # masks: they follow at the next use (a gradient hook, step(), apply(), stats()).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = get_pruner(name, **options).prepare(model, opt)
    if name == "magnitude":
        pruner.prune(0.5)
    model.to(CUDA)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8, device=CUDA)).square().mean().backward()
        for n, m in pruner.masks.items():
            assert m.device.type == "cuda", n
            assert not model.get_parameter(n).grad[~m].any(), n  # gradients masked
        opt.step()
        pruner.step(step)
    for n, m in pruner.masks.items():
        assert m.device.type == "cuda", n
        assert not model.get_parameter(n)[~m].any(), n
    assert pruner.stats()["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(m.device.type == "cpu" for m in pruner.state_dict()["masks"].values())
