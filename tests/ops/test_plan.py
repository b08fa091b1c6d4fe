"""The kernel planner: it never picks a wrong kernel, its cache follows the machine, and planned
models compute what safe ones do."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import logits_both_forms, rel_err

from rwkvpy.errors import RwkvpyError
from rwkvpy.models import RWKV4Config, build_model, random_state_dict
from rwkvpy.ops import plan
from rwkvpy.ops.linear import Int8Linear, Linear, plan_projections


def fast_and_wrong(x, w, scale=None, unbounded=False):
    """Returns at once, and is off by 1%: faster than every real kernel, and wrong."""
    return torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype).fill_(0.0) if x.shape[0] > 64 else \
        F.linear(x, w.to(x.dtype)) * 1.01


def test_a_fast_wrong_kernel_loses():
    entry = plan.plan_need(plan.Need("fp32", 96, 64), int8_ok=False, extra={"bogus": fast_and_wrong})
    assert all(not name.endswith("/bogus") for name in entry["timings"])
    assert any(name.endswith("/bogus") for name in entry["rejected"])
    choice = plan.choose(entry)
    assert "bogus" not in choice.kernels


def test_verification_rejects_garbage_and_accepts_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 40, generator=g)
    x = torch.randn(5, 40, generator=g)
    assert plan.verified(plan.linear, x, w, None, False, 2**-16)[0]
    assert plan.verified(plan.linear, x, w.bfloat16(), None, False, plan._UNIT["bfloat16"])[0]
    garbage = lambda x, w, s=None, u=False: F.linear(x, w) + 1e-3 * torch.randn(x.shape[0], w.shape[0])  # noqa: E731
    assert not plan.verified(garbage, x, w, None, False, 2**-16)[0]
    nan = lambda x, w, s=None, u=False: F.linear(x, w) * float("nan")  # noqa: E731
    assert not plan.verified(nan, x, w, None, False, 1.0)[0]


def test_choice_follows_the_timings():
    """The planner's logic with injected timings, as on a CPU with fast bf16 (where the storage
    that decodes fastest wins, then per rows class the fastest kernel on that storage)."""
    entry = {"timings": {
        "bfloat16/out_in/linear": [5.0, 9.0, 30.0, 90.0, 300.0],
        "bfloat16/out_in/upcast": [20.0, 21.0, 25.0, 40.0, 100.0],
        "bfloat16/in_out/linear": [4.0, 12.0, 35.0, 95.0, 310.0],
        "float16/out_in/linear": [3.0, 8.0, 50.0, None, None],  # pruned: 3x behind at 48 rows
        "float16/out_in/upcast": [20.0, 21.0, 26.0, 41.0, 120.0],
    }, "rejected": {}}
    assert plan.choose(entry) == plan.Choice("float16", "out_in", ("linear", "linear", "upcast", "upcast", "upcast"))
    # a matrix that does not convert to fp16 faithfully keeps bf16
    assert plan.choose(entry, {"bfloat16"}) == plan.Choice("bfloat16", "in_out", ("linear",) * 5)


def test_a_kernel_with_its_own_copy_must_win_by_a_margin():
    """fbgemm's packed fp16 product keeps a second copy of the weight: it is chosen only where
    it beats the plain kernels by EXTRA_COPY_MARGIN; once its copy is kept for one rows class,
    the other classes take it wherever it is faster at all, except one row (decoding), where
    the margin stays."""
    m = plan.EXTRA_COPY_MARGIN
    entry = {"timings": {
        "float16/out_in/linear": [100.0, 300.0, 900.0, 2000.0, 8000.0],
        "float16/out_in/fp16_packed": [100.0 / m * 1.05, 300.0 / m * 1.05, 890.0, 3000.0, 7900.0],
    }, "rejected": {}}
    assert plan.choose(entry).kernels == ("linear",) * 5
    entry["timings"]["float16/out_in/fp16_packed"][1] = 300.0 / m * 0.9
    assert plan.choose(entry).kernels == ("linear", "fp16_packed", "fp16_packed", "linear", "fp16_packed")


def test_more_rows_are_timed_only_on_the_storage_that_decodes_fastest():
    entry = plan.plan_need(plan.Need("bf16>fp16", 96, 64), int8_ok=False)
    first = {name: times[0] for name, times in entry["timings"].items()}
    assert all(t is not None for t in first.values())
    # every candidate timed at one row, or refused by this CPU (oneDNN's bf16 product needs
    # AVX-512 BW/VL/DQ or AVX-NE-CONVERT: an AVX2 machine rejects it)
    assert set(first) | set(entry["rejected"]) == {c.name for c in plan.candidates("bf16>fp16")}
    assert all(name.split("/")[-1] == "onednn" for name in entry["rejected"]), entry["rejected"]
    weighted = {name: plan.weighted(plan.Candidate.parse(name), t) for name, t in first.items()}
    best = plan.Candidate.parse(min(weighted, key=weighted.get))  # as the choice counts time
    for name, times in entry["timings"].items():
        c = plan.Candidate.parse(name)
        on_best = (c.dtype, c.layout) == (best.dtype, best.layout)
        assert all((t is not None) == on_best for t in times[1:]), name
    choice = plan.choose(entry)
    assert (choice.dtype, choice.layout) == (best.dtype, best.layout)


@pytest.mark.skipif(not hasattr(torch, "fbgemm_linear_fp16_weight"), reason="this torch has no fbgemm fp16 product")
def test_fp16_packed_product_is_verified_and_follows_in_place_changes():
    """fbgemm's fp16-weight product: fp32 arithmetic on the fp16 values (1, 2, 16 rows, 3-d
    input), within fp32 rounding of the float64 product where this build has it (else it is
    refused and so never chosen), and repacked when the weight changes in place."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(72, 40, generator=g) / 40**0.5).half()
    try:
        plan.fp16_packed(torch.randn(1, 40), w)
    except RuntimeError:  # no fbgemm on this CPU (ARM): the planner's check rejects it the same way
        entry = plan.plan_need(plan.Need("fp16", 72, 40), int8_ok=False)
        assert not any(name.endswith("/fp16_packed") for name in entry["timings"])
        return
    for shape in ((1, 40), (2, 40), (16, 40), (2, 3, 40)):
        x = torch.randn(*shape, generator=g)
        assert plan.verified(plan.fp16_packed, x, w, None, False, plan._UNIT["float32"])[0], shape
    with torch.no_grad():
        w.mul_(-1)  # e.g. load_state_dict into a planned model
    x = torch.randn(2, 40, generator=g)
    assert rel_err(plan.fp16_packed(x, w).double(), x.double() @ w.double().t()) < 1e-6
    entry = plan.plan_need(plan.Need("fp16", 72, 40), int8_ok=False)
    assert "float16/out_in/fp16_packed" in entry["timings"]


@pytest.mark.parametrize("kind, dtype, unit", [("fp32", torch.float32, "float32"),
                                               ("bf16", torch.bfloat16, "bfloat16"),
                                               ("bf16>fp16", torch.float16, "bfloat16")])
def test_onednn_product_is_verified_and_follows_in_place_changes(kind, dtype, unit):
    """oneDNN's packed product: within its type's rounding of the float64 product at 1, 2, 16
    and 48 rows and for 3-d input, where this build has it (else refused, so never chosen);
    repacked when the weight changes in place; never offered for an fp16 checkpoint (its
    values need not fit bf16) or fp64."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(72, 40, generator=g) / 40**0.5).to(torch.bfloat16).to(dtype)
    assert not any(c.kernel == "onednn" for c in plan.candidates("fp16") + plan.candidates("fp64"))
    try:
        plan.onednn(torch.randn(1, 40), w)
    except RuntimeError:  # no oneDNN for this type here: the planner's check rejects it the same way
        entry = plan.plan_need(plan.Need(kind, 72, 40), int8_ok=False)
        assert not any(name.endswith("/onednn") for name in entry["timings"])
        return
    for shape in ((1, 40), (2, 40), (16, 40), (48, 40), (2, 3, 40)):
        x = torch.randn(*shape, generator=g)
        assert plan.verified(plan.onednn, x, w, None, False, plan._UNIT[unit])[0], shape
        assert plan.verified(plan.onednn, x, w.t().contiguous().t(), None, False, plan._UNIT[unit])[0], shape
    with torch.no_grad():
        w.mul_(-1)
    x = torch.randn(2, 40, generator=g)
    assert rel_err(plan.onednn(x, w).double(), x.double() @ w.double().t()) < plan._UNIT[unit] * 4
    entry = plan.plan_need(plan.Need(kind, 72, 40), int8_ok=False)
    assert f"{dtype}".removeprefix("torch.") + "/out_in/onednn" in entry["timings"]


def test_plan_cache_round_trip_refresh_and_corruption(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RWKVPY_CACHE_DIR", str(tmp_path))
    calls = []
    real = plan.plan_need
    monkeypatch.setattr(plan, "plan_need", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    need = plan.Need("fp32", 24, 16)
    plan.Planner().entries([need])  # planned, never saved
    p = plan.Planner()
    p.entries([need])
    p.save()
    assert len(calls) == 2  # the first planner was never saved
    saved = json.loads(plan.cache_path().read_text())["machines"]
    assert len(saved) == 1 and saved[0]["machine"] == plan.machine_key() and need.key in saved[0]["entries"]
    plan.Planner().entries([need])
    assert len(calls) == 2  # read back from the cache

    for field, value in (("torch", "9.9.9"), ("flags_sha256", "0" * 16)):
        key = {**plan.machine_key(), field: value}
        monkeypatch.setattr(plan, "machine_key", lambda key=key: key)
        fresh = plan.Planner()
        assert fresh.data["entries"] == {}  # another machine's plans are not used
        fresh.entries([need])
        fresh.save()
        assert json.loads(plan.cache_path().read_text())["machines"][0]["machine"][field] == value  # newest first
    monkeypatch.undo()  # the real machine_key again, with oneDNN capped as on an AVX2 machine
    monkeypatch.setenv("RWKVPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(plan, "plan_need", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    before = os.environ.get("ONEDNN_MAX_CPU_ISA")  # `make test-avx2` sets it already
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if before == "AVX2" else "AVX2")
    assert plan.Planner().data["entries"] == {}  # a plan that may name a kernel oneDNN now refuses
    if before is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", before)
    n = len(calls)
    plan.Planner().entries([need])
    assert len(calls) == n  # this machine's first plan outlived the other keys' writes

    capsys.readouterr()  # the planning notices so far
    plan.cache_path().write_text("{not json")
    p = plan.Planner()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err
    p.entries([need])
    p.save()
    assert "unreadable" not in capsys.readouterr().err  # one warning line, not one more on saving
    assert len(calls) == n + 1 and need.key in json.loads(plan.cache_path().read_text())["machines"][0]["entries"]


def test_plan_cache_keeps_the_latest_machines(tmp_path, monkeypatch):
    """Plans of up to MACHINES_KEPT machine keys stay (switching thread counts or instruction-set
    caps back and forth plans once per key), the most recently written first."""
    monkeypatch.setenv("RWKVPY_CACHE_DIR", str(tmp_path))
    real_key = plan.machine_key()
    for i in range(plan.MACHINES_KEPT + 2):
        monkeypatch.setattr(plan, "machine_key", lambda i=i: {**real_key, "threads": i})
        plan.write_cache({"entries": {f"need{i}": {"timings": {}, "rejected": {}}}, "int8_probe": {}})
    machines = json.loads(plan.cache_path().read_text())["machines"]
    assert [m["machine"]["threads"] for m in machines] == list(range(plan.MACHINES_KEPT + 1, 1, -1))
    monkeypatch.setattr(plan, "machine_key", lambda: {**real_key, "threads": 5})
    assert list(plan.read_cache()["entries"]) == ["need5"]
    plan.write_cache({"entries": {"more": {"timings": {}, "rejected": {}}}, "int8_probe": {}})
    machines = json.loads(plan.cache_path().read_text())["machines"]
    assert machines[0]["machine"]["threads"] == 5 and set(machines[0]["entries"]) == {"need5", "more"}
    assert len(machines) == plan.MACHINES_KEPT


def test_safe_mode_loads_plain_kernels(tmp_path, monkeypatch):
    import rwkvpy
    from rwkvpy.checkpoint import save_native

    cfg = RWKV4Config(vocab_size=64, n_embd=32, n_layer=1, dim_ffn=40)
    save_native(cfg, random_state_dict(cfg), tmp_path / "m")
    monkeypatch.setenv("RWKVPY_KERNELS", "safe")
    assert rwkvpy.load(tmp_path / "m").head.kernels is None
    monkeypatch.setenv("RWKVPY_KERNELS", "planned")
    assert rwkvpy.load(tmp_path / "m").head.kernels is not None
    monkeypatch.setenv("RWKVPY_KERNELS", "fastest")
    with pytest.raises(RwkvpyError, match="RWKVPY_KERNELS"):
        rwkvpy.load(tmp_path / "m")


def test_lean_mode_keeps_no_second_copy_of_a_weight(tmp_path, monkeypatch):
    """``RWKVPY_KERNELS=lean``: planned, but none of the kernels that pack a copy of their own,
    even where the timings (injected: those kernels far ahead) would choose them."""
    import rwkvpy
    from rwkvpy.checkpoint import save_native

    cfg = RWKV4Config(vocab_size=64, n_embd=32, n_layer=1, dim_ffn=48)
    save_native(cfg, random_state_dict(cfg), tmp_path / "m")
    real = plan.plan_need

    def copies_fastest(need, *a, **kw):
        entry = real(need, *a, **kw)
        for name, times in entry["timings"].items():
            if plan.Candidate.parse(name).kernel in plan.PREPARE:
                entry["timings"][name] = [None if t is None else t / 100 for t in times]
        return entry

    monkeypatch.setattr(plan, "plan_need", copies_fastest)
    monkeypatch.setenv("RWKVPY_CACHE_DIR", str(tmp_path / "cache"))
    for mode, dtype in (("planned", "fp32"), ("lean", "fp32"), ("planned", "bf16"), ("lean", "bf16")):
        monkeypatch.setenv("RWKVPY_KERNELS", mode)
        model = rwkvpy.load(tmp_path / "m", dtype=dtype)
        kernels = {k.__name__ for m in model.modules() if isinstance(m, Linear) for k in m.kernels}
        packing = {plan.KERNELS[k].__name__ for k in plan.PREPARE}
        entries = plan.read_cache(warn=False)["entries"].values()
        offered = any(plan.Candidate.parse(n).kernel in plan.PREPARE for e in entries for n in e["timings"])
        assert bool(kernels & packing) == (mode == "planned" and offered), (mode, dtype, kernels)


@pytest.mark.parametrize("n_in", [40, 168])
@pytest.mark.parametrize("batch", [1, 2, 16])
def test_int8_models_with_awkward_widths_match_fp32(n_in, batch):
    """in_features 40 and 168 (not multiples of 16: torch's int8 kernel fails on AVX-512), planned,
    in both forms, with 1, 2 and 16 rows: the fp32 logits within the int8 tolerance."""
    cfg = RWKV4Config(vocab_size=96, n_embd=n_in, n_layer=2, dim_ffn=n_in)
    sd = random_state_dict(cfg, seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(batch))
    ref_whole, _ = logits_both_forms(build_model(cfg, sd), tokens)
    model = build_model(cfg, sd, quantize="int8")
    plan_projections(model)
    assert all(m.kernels is not None for m in model.modules() if isinstance(m, Int8Linear))
    whole, steps = logits_both_forms(model, tokens)
    assert rel_err(whole, ref_whole) < 0.04 and rel_err(steps, ref_whole) < 0.04


@pytest.mark.parametrize("kw, tol", [({}, 1e-5), ({"dtype": torch.bfloat16}, 0.02),
                                     ({"dtype": torch.float16}, 0.002), ({"quantize": "int8"}, 0.03)],
                         ids=["fp32", "bf16", "fp16", "int8"])
def test_planned_and_safe_models_agree(kw, tol):
    cfg = RWKV4Config(vocab_size=80, n_embd=48, n_layer=2, dim_ffn=168)
    sd = random_state_dict(cfg, seed=8)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    safe = build_model(cfg, sd, **kw)
    planned = build_model(cfg, sd, **kw)
    report = []
    plan_projections(planned, report=report)
    assert report and all(m.kernels is not None for m in planned.modules() if isinstance(m, (Linear, Int8Linear)))
    a, b = logits_both_forms(safe, tokens), logits_both_forms(planned, tokens)
    for x, y in zip(a, b):
        assert rel_err(y, x) < tol


def test_the_int8_kernel_never_gets_a_misaligned_weight(tmp_path):
    """torch 2.13's int8 weight kernel segfaults on a weight not 64-byte aligned, which a tensor
    memory-mapped from a safetensors file usually is (found loading an int8 RWKV-7). Run in a
    subprocess: a regression crashes the child, not the test run."""
    import subprocess
    import sys
    import textwrap

    from rwkvpy.checkpoint import save_native
    from rwkvpy.ops.quant import quantize_state_dict
    from rwkvpy.models import projections

    cfg = RWKV4Config(vocab_size=256, n_embd=128, n_layer=2)
    save_native(cfg, quantize_state_dict(random_state_dict(cfg, seed=3), projections(cfg)), tmp_path / "m")
    child = textwrap.dedent(f"""
        import torch, rwkvpy
        from rwkvpy.ops import plan
        from rwkvpy.ops.linear import Int8Linear
        # the kernel itself, on a weight 8 bytes off alignment: the dequantizing product instead
        big = torch.randint(-127, 128, (64 * 128 + 8,), dtype=torch.int8)
        q = big[8:].view(64, 128)
        assert q.data_ptr() % 64
        x, s = torch.randn(5, 128), torch.rand(64)
        y = plan.int8_packed(x, q, s.bfloat16())
        ref = plan.int8_dequantized(x, q, s.bfloat16())
        assert torch.equal(y, ref)
        # a mapped int8 checkpoint: every projection that may take the kernel holds an aligned weight
        model = rwkvpy.load({str(tmp_path / "m")!r})
        for m in model.modules():
            if isinstance(m, Int8Linear) and plan.int8_packed in m.kernels:
                assert m.weight.data_ptr() % 64 == 0
        model(torch.randint(0, 256, (3, 7)))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("kernel, dtype", [("onednn", torch.float32), ("onednn", torch.bfloat16),
                                           ("fp16_packed", torch.float16)])
def test_packed_kernels_run_under_torch_compile(kernel, dtype):
    """Kernels whose packed weight torch.compile cannot trace run as custom ops there: a compiled
    batched step with every projection forced onto one of them decodes as the eager step."""
    if kernel not in {c.kernel for c in plan.candidates({torch.float32: "fp32", torch.bfloat16: "bf16",
                                                         torch.float16: "fp16"}[dtype])}:
        pytest.skip(f"this build has no {kernel} product")
    try:
        plan.PREPARE[kernel](torch.randn(16, 16).to(dtype))
    except RuntimeError as e:  # e.g. oneDNN's bf16 product on a CPU without AVX-512 BW/VL/DQ
        pytest.skip(f"this CPU has no {kernel} product for {dtype} ({str(e).splitlines()[0][:80]})")
    cfg = RWKV4Config(vocab_size=96, n_embd=64, n_layer=2, dim_ffn=128)
    model = build_model(cfg, random_state_dict(cfg, seed=5), dtype=dtype)
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Linear):
            m.kernels = (plan.KERNELS[kernel],) * len(plan.ROW_CLASSES)
    tokens = torch.randint(0, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = model(tokens[:, :3])
        ref = [model.step(tokens[:, t], state)[0] for t in range(3, 6)]
        model.compile_step()
        got = [model.step(tokens[:, t], state)[0] for t in range(3, 6)]
    assert model.step.compiled is not None and model.step.trusted  # compiled, not the eager fallback
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5
