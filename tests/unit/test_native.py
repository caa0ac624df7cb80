"""sparsetrain's native CPU kernel: the same values as the PyTorch ops it replaces, and a
clear fallback where it cannot be built."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import warnings

import pytest
import torch

from sparsetrain import _native
from sparsetrain.compressors.threshold import Threshold
from sparsetrain.feedback import ErrorFeedback

needs_kernel = pytest.mark.skipif(
    _native.library() is None, reason=f"no native kernel here: {_native.unavailable_reason()}"
)


@pytest.fixture(params=[2, 1, 0], ids=["avx2", "sse2", "portable"])
def level(request):
    """Run a test with each version of the selection pass this CPU has (AVX2, SSE2 and the
    portable C on x86-64; only the portable one elsewhere)."""
    names = {0: "portable C", 1: "SSE2", 2: "AVX2"}
    got = _native.vector_level(request.param)
    try:
        if got != names[request.param]:
            pytest.skip(f"this CPU runs {got}, not {names[request.param]}")
        yield request.param
        # the kernel ran the version asked for, not only reported it
        assert _native.last_vector_level() == names[request.param]
    finally:
        _native.vector_level(-1)


def _reference(grad, residual, threshold):
    v = grad + residual if residual is not None else grad.clone()
    selected = torch.nonzero(torch.hardshrink(v, threshold)).squeeze(1)
    return v, selected, not bool(torch.isfinite(grad).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 1023, 1024, 1025, 5000, 100_003])
@pytest.mark.parametrize("with_residual", [True, False])
def test_kernel_equals_the_torch_ops_it_replaces(level, dtype, n, with_residual):
    gen = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=gen, dtype=dtype)
    residual = torch.randn(n, generator=gen, dtype=dtype) if with_residual else None
    threshold = 2.1  # about 3.6% of a sum of two normals, 1.8% of one
    v, expected, _ = _reference(grad, residual, threshold)
    out = torch.full((n,), 7.0, dtype=dtype)
    hits = torch.full((n + 1,), -1, dtype=torch.int64)
    g = grad.clone()
    count, nonfinite = _native.compensate_select(g, residual, out, threshold, 40, hits, 3)
    assert count == 3 + expected.numel() and not nonfinite
    assert torch.equal(out, v)  # bit for bit
    assert torch.equal(hits[3:count], expected + 40)  # ascending, offset by base
    assert bool((hits[:3] == -1).all())  # earlier entries untouched
    assert not bool(g.any())  # cleared
    # the selection alone (no output, no residual), as the threshold compressor calls it
    count = _native.select(grad, threshold, hits)
    assert torch.equal(hits[:count], torch.nonzero(torch.hardshrink(grad, threshold)).squeeze(1))


@needs_kernel
def test_kernel_counts_beyond_its_buffer_and_can_leave_the_gradient(level):
    grad = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    _, expected, _ = _reference(grad, None, 1.0)
    room = torch.full((150,), -7, dtype=torch.int64)
    hits = room[:100]  # a buffer of 100 with guards behind it
    g = grad.clone()
    count, _ = _native.compensate_select(g, None, torch.empty_like(g), 1.0, 0, hits, 0, False)
    assert count == expected.numel() > 100
    assert torch.equal(hits, expected[:100])  # the first ones, in order
    assert bool((room[100:] == -7).all())  # nothing written past the buffer
    assert torch.equal(g, grad)  # clear=False


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_selects_like_hardshrink_at_the_edges(level, dtype):
    inf, nan = float("inf"), float("nan")
    edges = torch.tensor(
        [0.0, -0.0, 0.5, -0.5, 0.5000001, -2.0, inf, -inf, nan, 1e-45], dtype=dtype
    )
    # 150 of them in a shuffled order: in the vector steps (the first 128) and the scalar tail
    grad = edges.repeat(15)[torch.randperm(150, generator=torch.Generator().manual_seed(0))]
    v, expected, bad = _reference(grad, None, 0.5)
    out, hits = torch.empty_like(grad), torch.zeros(200, dtype=torch.int64)
    count, nonfinite = _native.compensate_select(grad.clone(), None, out, 0.5, 0, hits, 0)
    assert torch.equal(hits[:count], expected) and nonfinite and bad
    assert torch.equal(out.isnan(), v.isnan()) and torch.equal(out.nan_to_num(), v.nan_to_num())
    # threshold 0: every nonzero is selected, exact zeros never are
    count, _ = _native.compensate_select(grad.clone(), None, out, 0.0, 0, hits, 0)
    assert torch.equal(hits[:count], torch.nonzero(torch.hardshrink(grad, 0.0)).squeeze(1))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad_at", [100, 2999])  # in a vector step, in a block's scalar tail
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kernel_flags_only_a_nonfinite_gradient(level, dtype, bad_at, bad):
    big = 2e38 if dtype == torch.float32 else 1e308  # finite, beyond float32's range for f64
    grad = torch.full((3000,), big, dtype=dtype)
    residual = torch.full((3000,), big, dtype=dtype)  # the sum overflows, the gradient is finite
    out, hits = torch.empty(3000, dtype=dtype), torch.zeros(3001, dtype=torch.int64)
    _, nonfinite = _native.compensate_select(grad.clone(), residual, out, 1.0, 0, hits, 0)
    assert not nonfinite and bool(out.isinf().all())
    grad[bad_at] = bad
    _, nonfinite = _native.compensate_select(grad, None, out, 1.0, 0, hits, 0)
    assert nonfinite


@needs_kernel
def test_kernel_refuses_what_it_cannot_take():
    g = torch.zeros(10)
    hits = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32 or float64"):
        _native.compensate_select(g.half(), None, g.half(), 1.0, 0, hits, 0)
    with pytest.raises(ValueError, match="contiguous"):
        _native.compensate_select(torch.zeros(20)[::2], None, g, 1.0, 0, hits, 0)
    with pytest.raises(ValueError, match="size"):
        _native.compensate_select(g, torch.zeros(9), g.clone(), 1.0, 0, hits, 0)
    with pytest.raises(ValueError, match="int64"):
        _native.compensate_select(g, None, g.clone(), 1.0, 0, hits.int(), 0)


@needs_kernel
def test_a_bucket_in_one_call_equals_one_call_a_gradient_and_flags_each_alone():
    gen = torch.Generator().manual_seed(5)
    numels = [300, 0, 1, 4000, 17]
    grads = [torch.randn(k, generator=gen) for k in numels]
    grads[3][2500] = float("nan")  # only this gradient is flagged, not the ones after it
    residuals = [torch.randn(k, generator=gen) if k % 2 else None for k in numels]
    copies = [g.clone() for g in grads]
    out, hits = torch.empty(sum(numels)), torch.zeros(5000, dtype=torch.int64)
    count, nonfinite = _native.compensate_select_parts(grads, residuals, out, 1.0, hits)
    ref_out, ref_hits, ref_count, ref_flags, base = (
        torch.empty_like(out),
        torch.zeros_like(hits),
        0,
        [],
        0,
    )
    for g, r, k in zip(copies, residuals, numels):
        ref_count, bad = _native.compensate_select(
            g, r, ref_out[base : base + k], 1.0, base, ref_hits, ref_count
        )
        ref_flags.append(bad)
        base += k
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num()) and count == ref_count
    assert torch.equal(hits, ref_hits) and nonfinite == ref_flags == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert not any(bool(g.any()) for g in grads)  # cleared
    with pytest.raises(ValueError, match="as long as the gradients together"):
        _native.compensate_select_parts(grads, residuals, out[1:], 1.0, hits)
    with pytest.raises(ValueError, match="a residual of 2 elements for a gradient of 300"):
        _native.compensate_select_parts(grads, [torch.zeros(2), *residuals[1:]], out, 1.0, hits)
    with pytest.raises(ValueError, match="contiguous CPU tensors of out's dtype"):
        _native.compensate_select_parts([g.double() for g in grads], residuals, out, 1.0, hits)


@needs_kernel
def test_feedback_compensate_select_equals_compensate_into():
    names, numels = ["a", "b", "c"], [5000, 3, 20_000]
    gen = torch.Generator().manual_seed(4)
    fused, plain = ErrorFeedback(), ErrorFeedback()
    for step in range(3):
        grads = [torch.randn(k, generator=gen) for k in numels]
        copies = [g.clone() for g in grads]
        hits = torch.zeros(30_000, dtype=torch.int64)
        got = fused.compensate_select_into("k", names, numels, grads, 1.5, hits)
        assert got is not None
        out, count, nonfinite = got
        ref = plain.compensate_into("k", names, numels, copies)
        assert torch.equal(out, ref), step
        selected = torch.nonzero(torch.hardshrink(ref, 1.5)).squeeze(1)
        assert torch.equal(hits[:count], selected) and nonfinite == [False] * 3
        assert not any(bool(g.any()) for g in grads)  # cleared
        # the residual: everything but the selected entries (as the engine commits them)
        for fb, o in ((fused, out), (plain, ref)):
            fb.commit_sparse("k", names, numels, o, selected, o[selected].clone())
        assert all(torch.equal(fused.residuals[n], plain.residuals[n]) for n in names)


def test_feedback_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    fb = ErrorFeedback()
    hits = torch.zeros(10, dtype=torch.int64)
    grads = [torch.randn(4), torch.randn(6)]
    assert (
        fb.compensate_select_into("k", ["a", "b"], [4, 6], [g.half() for g in grads], 1.0, hits)
        is None
    )
    assert (
        fb.compensate_select_into("k", ["a", "b"], [4, 6], [grads[0], grads[1].double()], 1.0, hits)
        is None
    )
    assert (
        ErrorFeedback(momentum=0.9).compensate_select_into(
            "k", ["a", "b"], [4, 6], grads, 1.0, hits
        )
        is None
    )
    monkeypatch.setenv("SPARSETRAIN_NATIVE", "0")
    assert fb.compensate_select_into("k", ["a", "b"], [4, 6], grads, 1.0, hits) is None
    assert not fb._buffers  # nothing taken or changed


def test_threshold_compress_takes_the_kernels_count_as_its_marks():
    # The engine's native path passes selected= instead of marks: the same payloads and state at
    # every step, including steps whose count overflows the buffer (a fresh estimate then).
    gen = torch.Generator().manual_seed(6)
    kernel, plain = (
        Threshold(density=0.01, reestimate_every=4),
        Threshold(density=0.01, reestimate_every=4),
    )
    n = 50_000
    for step in range(10):
        g = torch.randn(n, generator=gen) * (30.0 if step == 6 else 1.0)  # step 6 overflows
        threshold = kernel.reused_threshold("k", n)
        hits = None
        if threshold is not None:
            positions, values = kernel.hits_buffer(n)
            selected = torch.nonzero(torch.hardshrink(g, threshold)).squeeze(1)
            take = min(selected.numel(), positions.numel())
            positions[:take] = selected[:take]
            values[:take] = g[selected[:take]]
            # with the values recorded, and without (read from the tensor)
            hits = (positions, values if step % 2 else None, selected.numel())
            if step == 6:
                assert selected.numel() > positions.numel()
        (i1, v1), _ = kernel.compress(g, key="k", marked=threshold, selected=hits)
        (i2, v2), _ = plain.compress(g, key="k")
        assert torch.equal(i1, i2) and torch.equal(v1, v2), step
        assert kernel.state_dict() == plain.state_dict(), step


def test_without_a_compiler_the_kernel_is_unavailable_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_reason", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="native CPU kernel is unavailable.*no-such-cc"):
        assert _native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.library() is None  # warned once
    assert "no-such-cc" in _native.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        _native.compensate_select(
            torch.zeros(2), None, torch.zeros(2), 1.0, 0, torch.zeros(2, dtype=torch.int64), 0
        )
    assert list((tmp_path / "cache").glob("*")) == []  # no half-written library left


@needs_kernel
def test_the_built_library_is_cached_under_the_source_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    _native._build()
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("fused-") and built[0].endswith(".so")
    mtime = (tmp_path / built[0]).stat().st_mtime_ns
    _native._build()  # loads the cached file, compiles nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == built
    assert (tmp_path / built[0]).stat().st_mtime_ns == mtime


@needs_kernel
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3])
def test_threshold_selects_the_same_with_and_without_the_kernel(monkeypatch, density):
    g = torch.randn(300_001, generator=torch.Generator().manual_seed(7))
    c = Threshold(density=density)
    buffer = c.hits_buffer(g.numel())[0].numel()
    for threshold in (0.0, 1.0, 2.5, 4.0):  # 0.0 and 1.0: more hits than the buffer holds
        got = c._select(g, threshold, expected=round(density * g.numel()))
        monkeypatch.setenv("SPARSETRAIN_NATIVE", "0")
        want = c._select(g, threshold, expected=round(density * g.numel()))
        monkeypatch.delenv("SPARSETRAIN_NATIVE")
        assert torch.equal(got, want), threshold
        if threshold == 0.0:
            assert got.numel() > buffer  # the fallback for a count beyond the buffer


@needs_kernel
@pytest.mark.parametrize("density", [0.0001, 0.01])
def test_threshold_takes_the_portable_kernel_only_above_one_hit_in_500(monkeypatch, density):
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(8))
    c = Threshold(density=density)
    expected = round(density * g.numel())
    threshold = float(g.abs().kthvalue(g.numel() - expected).values)
    want = torch.nonzero(torch.hardshrink(g, threshold)).squeeze(1)
    calls = []
    select = _native.select
    monkeypatch.setattr(_native, "select", lambda *a: calls.append(1) or select(*a))
    try:
        for level in (-1, 0):
            _native.vector_level(level)
            calls.clear()
            assert torch.equal(c._select(g, threshold, expected=expected), want)
            vectorised = _native.vector_level() != "portable C"
            assert bool(calls) == (vectorised or density == 0.01), (level, density)
    finally:
        _native.vector_level(-1)


@needs_kernel
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_difference_keeps_the_entries_not_selected(index_dtype, dtype):
    gen = torch.Generator().manual_seed(8)
    sent = torch.sort(torch.randperm(100_000, generator=gen)[:5000]).values.to(index_dtype)
    values = torch.randn(5000, generator=gen, dtype=dtype)
    # the selection: some of the sent entries and some entries of other ranks
    other = torch.randperm(100_000, generator=gen)[:3000].to(index_dtype)
    selected = torch.unique(torch.cat([sent[::3], other]))
    keep = ~torch.isin(sent, selected)
    got = _native.difference(sent, values, selected)
    assert got is not None
    assert torch.equal(got[0], sent[keep]) and torch.equal(got[1], values[keep])
    i, v = _native.difference(sent, values, selected[:0])  # nothing selected: all dropped
    assert torch.equal(i, sent) and torch.equal(v, values)
    i, v = _native.difference(sent, values, sent)  # all selected: none dropped
    assert i.numel() == v.numel() == 0


@needs_kernel
def test_difference_declines_what_it_cannot_do():
    idx = torch.tensor([1, 5, 3])  # not ascending
    assert _native.difference(idx, torch.ones(3), torch.tensor([5])) is None
    assert _native.difference(torch.tensor([1, 3]), torch.ones(2), torch.tensor([3, 3])) is None
    assert _native.difference(torch.tensor([1, 3]), torch.ones(2).half(), torch.tensor([3])) is None
    assert (
        _native.difference(
            torch.tensor([1, 3]), torch.ones(2), torch.tensor([3], dtype=torch.int32)
        )
        is None
    )


@needs_kernel
def test_vector_level_names_the_version_and_goes_back_to_the_best():
    best = _native.vector_level()
    assert best in ("AVX2", "SSE2", "portable C")
    try:
        assert _native.vector_level(0) == "portable C"
        assert _native.vector_level() == "portable C"  # a query leaves it
        assert _native.vector_level(99) == best  # more than the CPU has: the best
    finally:
        assert _native.vector_level(-1) == best
    with pytest.raises(TypeError, match="level must be an int"):
        _native.vector_level("avx2")


@needs_kernel
@pytest.mark.parametrize("threshold", [-1.0, float("nan"), 0.0])
def test_a_negative_or_nan_threshold_selects_what_hardshrink_keeps(level, threshold):
    grad = torch.tensor([0.0, -0.0, 0.5, -2.0, float("nan"), float("inf")] * 20)
    want = torch.nonzero(torch.hardshrink(grad, threshold)).squeeze(1)  # the nonzero ones
    hits = torch.zeros(200, dtype=torch.int64)
    count = _native.select(grad, threshold, hits)
    assert torch.equal(hits[:count], want)


def test_the_kernel_builds_wherever_a_c_compiler_is():
    """A source that does not compile must fail here, not turn the kernel's tests into skips."""
    cc = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler here ({cc[0]})")
    if not _native.enabled():
        pytest.skip("SPARSETRAIN_NATIVE turns the kernel off")
    assert _native.library() is not None, _native.unavailable_reason()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_portable_build_other_processors_get_selects_the_same(monkeypatch, tmp_path, dtype):
    cc = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    path = tmp_path / "portable.so"
    cmd = [*cc, *_native._FLAGS, "-DST_PORTABLE_ONLY", "-o", str(path), str(_native._SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    monkeypatch.setattr(_native, "_lib", _native.load(path))
    assert _native.vector_level() == "portable C"
    assert _native.vector_level(2) == "portable C"  # nothing better to ask for
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(5003, generator=gen, dtype=dtype)
    grad[[7, 1500, 5001]] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    residual = torch.randn(5003, generator=gen, dtype=dtype)
    v, expected, bad = _reference(grad, residual, 1.5)
    out, hits = torch.empty_like(grad), torch.zeros(5004, dtype=torch.int64)
    count, nonfinite = _native.compensate_select(grad.clone(), residual, out, 1.5, 0, hits, 0)
    assert torch.equal(hits[:count], expected) and nonfinite and bad
    assert torch.equal(out.nan_to_num(), v.nan_to_num())
    assert _native.last_vector_level() == "portable C"
    count = _native.select(grad, 1.5, hits)
    assert torch.equal(hits[:count], torch.nonzero(torch.hardshrink(grad, 1.5)).squeeze(1))


@needs_kernel
def test_a_cached_build_others_could_have_written_is_refused(monkeypatch, tmp_path):
    # The names are predictable and the cluster's delay switch runs as root: a file in the
    # cache that another user could have planted or changed is not run.
    from sparsetrain._ccache import compile_cached

    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "hello.c"
    source.write_text("int main(void) { return 0; }\n")
    built = compile_cached(source, ["-O0"])
    assert compile_cached(source, ["-O0"]) == built  # cached, and safe
    built.chmod(0o777)
    with pytest.raises(RuntimeError, match="can be written by another user; refusing"):
        compile_cached(source, ["-O0"])
    built.chmod(0o755)
    (tmp_path / "cache").chmod(0o777)  # a shared folder without the sticky bit
    with pytest.raises(RuntimeError, match="can be written by another user; refusing"):
        compile_cached(source, ["-O0"])


@needs_kernel
def test_a_build_under_umask_002_or_into_a_relative_folder_is_used_by_later_processes(
    monkeypatch, tmp_path
):
    """Under umask 002 (a login default) the folder came out group-writable: the building
    process used the kernel and every later one refused it. A bare relative folder
    (SPARSETRAIN_CACHE_DIR=.) gave a name without a slash, which dlopen looked up in the
    system's library folders: built every time, never loaded."""
    from sparsetrain._ccache import compile_cached

    source = tmp_path / "hello.c"
    source.write_text("int main(void) { return 0; }\n")
    old = os.umask(0o002)
    try:
        monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path / "shared" / "cache"))
        built = compile_cached(source, ["-O0"])
    finally:
        os.umask(old)
    assert not built.parent.stat().st_mode & 0o022 and not built.stat().st_mode & 0o022
    assert compile_cached(source, ["-O0"]) == built  # a later process takes it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", ".")
    here = compile_cached(source, ["-O0"])
    assert here.is_absolute() and here.parent == tmp_path
    lib = _native.load(compile_cached(_native._SOURCE, _native._FLAGS, ".so"))
    assert lib.st_abi_version() == _native._ABI


@pytest.mark.parametrize("value", ["0", "off", "OFF", "False", " No "])
def test_the_kernel_is_turned_off_by_any_case_of_its_words(monkeypatch, value):
    monkeypatch.setenv("SPARSETRAIN_NATIVE", value)
    assert not _native.enabled() and _native.library() is None


def test_a_value_that_is_neither_on_nor_off_warns_once_and_means_on(monkeypatch):
    # "maybe" (or a typo of "off") had been taken as on without a word.
    monkeypatch.setattr(_native, "_WARNED", set())
    monkeypatch.setenv("SPARSETRAIN_NATIVE", "maybe")
    with pytest.warns(RuntimeWarning, match=r"SPARSETRAIN_NATIVE='maybe' is neither on .* "
                      r"nor off \(0, false, no, off\): taken as on"):  # fmt: skip
        assert _native.enabled()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.enabled()  # once
        monkeypatch.setenv("SPARSETRAIN_NATIVE", "Yes")
        assert _native.enabled()


def test_an_unavailable_kernel_is_not_built_again_when_its_warning_is_an_error(
    monkeypatch, tmp_path
):
    # Under -W error::RuntimeWarning the warning raised before the build was marked as
    # tried, so every call compiled again (each up to the compiler's 2-minute timeout).
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_reason", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path / "cache"))
    builds = []
    build = _native._build
    monkeypatch.setattr(_native, "_build", lambda: builds.append(1) or build())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            _native.library()
        assert _native.library() is None and _native.library() is None
    assert builds == [1]
