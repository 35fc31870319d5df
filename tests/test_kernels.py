"""Our C++ paged decode attention (model/csrc/paged_decode.cpp) against PyTorch's attention over the same keys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmserve.model import kernels
from vlmserve.model.attention import PagedBatch
from vlmserve.model.kv_cache import PagedKVCache

op = kernels.paged_decode_op()
needs_kernel = pytest.mark.skipif(op is None, reason="no C++ compiler here")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """q (B, Hkv, G, D), pools (NB, BS, Hkv, D): each sequence's keys gathered token by token, float64 SDPA."""
    bs = k.shape[1]
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        pos = torch.arange(max(0, n - window) if window is not None else 0, n)
        blocks, offsets = tables[b, pos // bs], pos % bs
        keys, values = k[blocks, offsets].double(), v[blocks, offsets].double()  # (S, Hkv, D)
        out.append(F.scaled_dot_product_attention(q[b].double(), keys.transpose(0, 1), values.transpose(0, 1)))
    return torch.stack(out)  # (B, Hkv, G, D)


def random_batch(seed: int, *, b: int, hkv: int, g: int, d: int, bs: int, lens: list[int], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    nb = max(-(-n // bs) for n in lens)
    pool = b * nb + 3
    k = torch.randn(pool, bs, hkv, d, generator=gen).to(dtype)
    v = torch.randn(pool, bs, hkv, d, generator=gen).to(dtype)
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    tables = torch.randperm(pool, generator=gen)[: b * nb].view(b, nb).contiguous()  # blocks scattered in the pool
    return q, k, v, tables, torch.tensor(lens)


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_matches_attention_over_the_gathered_keys(dtype: torch.dtype, tol: float, window: int | None, g: int) -> None:
    lens = [1, 7, 16, 17, 33, 90]
    q, k, v, tables, lens_t = random_batch(g, b=len(lens), hkv=2, g=g, d=32, bs=16, lens=lens, dtype=dtype)
    assert op is not None
    got = op(q, k, v, tables, lens_t, 32**-0.5, -1 if window is None else window)
    want = reference(q, k, v, tables, lens_t, window)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@needs_kernel
def test_scale_is_honoured() -> None:
    q, k, v, tables, lens = random_batch(0, b=2, hkv=2, g=2, d=16, bs=4, lens=[9, 3], dtype=torch.float32)
    assert op is not None
    got = op(q, k, v, tables, lens, 0.3, -1)
    torch.testing.assert_close(got.double(), reference(q * (0.3 / 16**-0.5), k, v, tables, lens, None),
                               atol=1e-5, rtol=1e-5)


@needs_kernel
def test_paged_batch_decodes_equal_pytorchs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving path: the same decode step through the kernel and through gather + SDPA."""
    cache = PagedKVCache(num_layers=1, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8)
    torch.manual_seed(0)
    cache.k[0].normal_(), cache.v[0].normal_()
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 0, 0], [9, 10, 11, 4]])
    lens = torch.tensor([13, 6, 16])
    q = torch.randn(3, 4, 8)  # (B, H, Dh)
    batch = PagedBatch(cache, torch.zeros(3, dtype=torch.long), num_decodes=3, decode_tables=tables,
                       decode_lens=lens, decode_max_len=16,
                       decode_masks=PagedBatch.decode_masks_for(lens, 16, {None, 5}, equal=False))
    fast = {w: batch._decodes(0, q, w, None) for w in (None, 5)}
    monkeypatch.setattr("vlmserve.model.attention.paged_decode_op", lambda: None)
    for w, got in fast.items():
        torch.testing.assert_close(got, batch._decodes(0, q, w, None), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bad, match", [
    ("lens", "has 40 keys"),
    ("dtype", "share a dtype"),
    ("layout", "contiguous"),
    ("tables", "int64"),
])
def test_bad_inputs_are_refused(bad: str, match: str) -> None:
    q, k, v, tables, lens = random_batch(1, b=2, hkv=2, g=2, d=16, bs=4, lens=[9, 3], dtype=torch.float32)
    if bad == "lens":
        lens = torch.tensor([40, 3])
    elif bad == "dtype":
        k = k.to(torch.bfloat16)
    elif bad == "layout":
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
    elif bad == "tables":
        tables = tables.int()
    assert op is not None
    with pytest.raises(RuntimeError, match=match):
        op(q, k, v, tables, lens, 0.25, -1)


def test_build_is_cached_and_failures_are_reported(tmp_path: Path) -> None:
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler here")
    good = tmp_path / "ok.cpp"
    good.write_text("extern \"C\" int vlmserve_answer() { return 42; }\n")
    first = kernels.build(good, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert kernels.build(good, tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert not list((tmp_path / "cache").glob("*.partial"))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match=r"compiling broken\.cpp failed"):
        kernels.build(broken, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # nothing half-written left


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("VLMSERVE_KERNELS", "0")
    kernels.paged_decode_op.cache_clear()
    try:
        assert kernels.paged_decode_op() is None
    finally:
        kernels.paged_decode_op.cache_clear()
    monkeypatch.delenv("VLMSERVE_KERNELS")
    with caplog.at_level(logging.WARNING):
        assert (kernels.paged_decode_op() is None) == (op is None)


# ---------------------------------------------------------------- the compiled step's C++ ops (step_ops.cpp)
step = kernels.step_ops()
needs_step_ops = pytest.mark.skipif(step is None, reason="no C++ compiler here")


@needs_step_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_packed_linear_equals_the_module(dtype: torch.dtype) -> None:
    from vlmserve.model.serving_weights import PackedLinear, use_native_ops

    torch.manual_seed(0)
    module = torch.nn.Sequential(PackedLinear(torch.nn.Linear(64, 48, bias=True).to(dtype)))
    assert use_native_ops(module, step) == 1 and use_native_ops(module, step) == 0  # registered once
    linear = module[0]
    x = torch.randn(2, 3, 64).to(dtype)  # (B, T, in)
    assert torch.equal(step.packed_linear(x, linear.handle, 48, linear.bias), linear(x))
    with pytest.raises(RuntimeError, match="no weight is registered under handle -5"):
        step.packed_linear(x, -5, 48, None)


@needs_step_ops
@pytest.mark.parametrize("window", [None, 5])
def test_native_decode_attention_equals_the_paged_batch(window: int | None) -> None:
    """Writes the new keys and values where PagedBatch.attend does, and attends the same."""
    gen = torch.Generator().manual_seed(3)
    caches = [PagedKVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16) for _ in range(2)]
    for src, dst in zip((*caches[0].k, *caches[0].v), (*caches[1].k, *caches[1].v), strict=True):
        src.copy_(torch.randn(src.shape, generator=gen))  # (NB, BS, Hkv, D)
        dst.copy_(src)
    slots, tables, lens = torch.tensor([6, 17]), torch.tensor([[0, 1, 0], [2, 3, 4]]), torch.tensor([7, 10])
    q, k, v = (torch.randn(1, 2, h, 16, generator=gen) for h in (4, 2, 2))  # (1, N, H or Hkv, D)
    want = PagedBatch(caches[0], slots, num_decodes=2, decode_tables=tables, decode_lens=lens,
                      decode_max_len=10).attend(1, q, k, v, window=window)
    step.register_pools(99, caches[1].k, caches[1].v)
    try:
        step.set_decode_step(99, slots, tables, lens)
        got = step.decode_attention(q, k, v, 1, 16**-0.5, -1 if window is None else window)
        step.clear_decode_step()
    finally:
        step.release_pools(99)
    assert torch.allclose(got, want, atol=1e-6) and torch.equal(caches[1].k[1], caches[0].k[1])
    with pytest.raises(RuntimeError, match="called outside set_decode_step"):
        step.decode_attention(q, k, v, 1, 0.25, -1)
    with pytest.raises(RuntimeError, match="no KV pools are registered under 99"):
        step.set_decode_step(99, slots, tables, lens)
