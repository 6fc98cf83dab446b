"""The main job, `python -m vit_kernels.bench`, and the benchmark cases it shares with benchmarks/."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from vit_kernels.benchmarking import attention, attention_varlen, layer_norm
from vit_kernels.benchmarking.vit import VIT_SMALL_MODELS
from vit_kernels.testing import kernel_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_main_job_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "vit_kernels.bench", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
         "--plot", str(tmp_path / "r.png")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0].startswith("No CUDA device")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["device"] == "cpu" and report["rows"]
    assert all(row["rule_ok"] and row["error_vs_eager"] is not None for row in report["rows"])
    table = (tmp_path / "r.md").read_text()
    assert "| add_layer_norm |" in table
    # How busy the host was: host-bound timings depend on it.
    assert report["host_load"].startswith("load average") and report["host_load"] in table.splitlines()[0]
    # End to end: a tiny timm ViT after swap_modules, the reference ViT fused and tiny SigLIP and CLIP
    # towers after swap_modules, by the rule.
    assert {row["provider"] for row in report["rows"] if row["mode"] == "train step"} == {
        "timm_swapped", "reference_fused", "transformers_swapped"}
    assert {row["op"] for row in report["rows"] if row["mode"] == "train step"} == set(VIT_SMALL_MODELS)
    assert "End to end" in table
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", [p for p in layer_norm.PROVIDERS if p != "compile"])
def test_layer_norm_cases_run(provider, mode):
    """The closures the benchmarks time compute what they claim (compile is exercised on the GPU)."""
    case = layer_norm.case(provider, "tiny", (37, 96), mode, torch.float32, kernel_device())
    out = case.run()
    assert len(out) == (4 if mode == "fwd+bwd" else 2)
    assert all(torch.isfinite(t).all() for t in out)
    assert case.bytes_moved == (8 if mode == "fwd+bwd" else 4) * 37 * 96 * 4


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["vit_kernels", "vit_kernels_atomic_dq", "eager", "sdpa"])
def test_attention_cases_agree(provider, mode):
    """Every attention provider computes the same [B, N, H*d] output from the packed qkv."""
    device = kernel_device()
    case = attention.case(provider, "tiny", (2, 17, 2, 32), mode, torch.float32, device)
    torch.manual_seed(0)
    out = case.run()
    assert case.flops == int(4 * 2 * 2 * 17 * 17 * 32 * (3.5 if mode == "fwd+bwd" else 1))
    shape = (2, 17, 3, 2, 32) if mode == "fwd+bwd" else (2, 17, 64)
    assert (out[0] if mode == "fwd+bwd" else out).shape == shape


def test_attention_providers_match_each_other():
    qkv = torch.randn(2, 33, 3, 2, 64, device=kernel_device())
    want = attention.provider_fn("eager")(qkv)
    for provider in ("vit_kernels", "vit_kernels_atomic_dq", "sdpa"):
        torch.testing.assert_close(attention.provider_fn(provider)(qkv), want, rtol=1e-4, atol=1e-4)
    assert set(attention.PROVIDERS) >= {"vit_kernels", "eager", "sdpa"}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", attention_varlen.PROVIDERS)
def test_attention_varlen_cases_run(provider, mode):
    """Every varlen provider runs on the packed [T, H, d] inputs, ends with [T, H*d] and counts the
    work inside the images only."""
    lengths = attention_varlen.image_lengths(3, 20)
    case = attention_varlen.case(provider, "tiny", (3, 20, 2, 32), mode, torch.float32, kernel_device())
    out = case.run()
    assert case.flops == int(4 * 2 * 32 * sum(n * n for n in lengths) * (3.5 if mode == "fwd+bwd" else 1))
    if mode == "fwd+bwd":
        assert [g.shape for g in out] == [(sum(lengths), 2, 32)] * 3
    else:
        assert out.shape == (sum(lengths), 64)


def test_attention_varlen_providers_match_each_other():
    """Each image attends to itself only, whichever provider: against per-image attention."""
    lengths = attention_varlen.image_lengths(4, 24)
    assert len(set(lengths)) > 1 and lengths == attention_varlen.image_lengths(4, 24)  # mixed, and a fixed draw
    device = kernel_device()
    q, k, v = (torch.randn(sum(lengths), 2, 64, device=device) for _ in range(3))
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    want = torch.cat([attention.provider_fn("eager")(torch.stack([q[a:b], k[a:b], v[a:b]], 1)[None])[0]
                      for a, b in zip(starts, starts[1:])])
    for provider in attention_varlen.PROVIDERS:
        got = attention_varlen.provider_fn(provider, lengths, device)(q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=provider)


@pytest.mark.inductor
def test_timed_path_fills_the_report(monkeypatch):
    """The GPU job's bookkeeping (agreement, speedups, GB/s, TFLOP/s, % of peak), run on the CPU
    with a host timer standing in for CUDA events and the sdpa backends' absence reported."""
    import time

    from vit_kernels.benchmarking import report as results
    from vit_kernels.benchmarking import runner, timing

    def host_time_ms(fn, **_):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(timing, "time_cuda_ms", host_time_ms)
    # A graph's replay is timed by the same bookkeeping: a stand-in time, not a second run of each case.
    monkeypatch.setattr(timing, "time_cuda_graph_ms", lambda fn, **_: 0.5)
    # Inductor compiles the first op's compile provider only: on the CPU each compile takes tens
    # of seconds, and the bookkeeping under test is the same for every provider.
    compile_fresh, compiled = timing.compile_fresh, []
    monkeypatch.setattr(timing, "compile_fresh", lambda fn, **kw: fn if compiled else (
        compiled.append(fn) or compile_fresh(fn, **kw)))
    report = results.Report("test", "now", "t", "t", "p", copy_bandwidth_gbps=100.0, bf16_matmul_tflops=10.0)
    monkeypatch.setattr(timing, "randn", lambda *shape, device, dtype, scale=1.0, shift=0.0, requires_grad=False: (
        (torch.randn(*shape, device=device) * scale + shift).float().requires_grad_(requires_grad)))
    for op in runner.OPS:
        runner.run_timed(report, op, kernel_device(), dict(list(op.small_shapes.items())[:1]), reps=2)
    assert {r.op for r in report.rows} == {op.name for op in runner.OPS}
    for r in report.rows:
        assert r.provider in {provider for op in runner.OPS for provider in op.providers}
        if r.provider in ("vit_kernels", "vit_kernels_atomic_dq", "triton_gemm"):
            assert r.rule_ok and r.ms > 0 and r.speedup_vs_eager > 0 and r.pct_of_peak > 0
            assert r.graph_ms > 0 and r.graph_speedup_vs_baseline > 0
    table = results.markdown(report)
    assert "| flash_attention |" in table and "| flash_attention_varlen |" in table and "End to end" not in table  # every provider in the per-op table


def test_plot_draws_speedups_from_a_timed_report(tmp_path):
    pytest.importorskip("matplotlib")
    from vit_kernels.benchmarking.report import Report, Row, plot

    report = Report("NVIDIA H100 80GB HBM3", "2026-11-22", "2.11", "3.6", "3.11")
    report.rows = [Row("add_layer_norm", "(50432, 768)", "fwd", "vit_kernels", ms=0.1, speedup_vs_eager=2.5),
                   Row("add_layer_norm", "(50432, 768)", "fwd", "eager", ms=0.25, speedup_vs_eager=1.0),
                   Row("ViT-B/16", "batch 128, 224px", "train", "timm_swapped", ms=300.0, speedup_vs_eager=0.9)]
    plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_vit_flops_match_the_published_count():
    """ViT-B/16 at 224: 17.6 GMACs per image (timm / fvcore count) = 35.1 GFLOPs."""
    timm = pytest.importorskip("timm")
    from vit_kernels.benchmarking.vit import vit_flops_per_image

    flops = vit_flops_per_image(timm.create_model("vit_base_patch16_224", pretrained=False))
    assert 35.0e9 < flops < 35.3e9


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_vit_cases_run(mode):
    """The end-to-end closures the benchmarks time run (tiny models; compile is exercised on the GPU)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from vit_kernels.benchmarking.vit import VIT_SMALL_MODELS, vit_case

    ran = set()
    for label, spec in VIT_SMALL_MODELS.items():
        family = spec.get("family", "timm")
        providers = {"timm": ("timm", "timm_swapped", "reference_fused", "timm_graph", "timm_swapped_graph",
                              "reference_fused_graph"),
                     "transformers": ("transformers", "transformers_swapped")}[family]
        for provider in providers:
            case = vit_case(provider, label, mode, kernel_device(), spec=spec, batch=2)
            out = case.run()
            assert case.flops > 0
            if mode == "inference":
                assert out.shape == (2, 1000) and torch.isfinite(out).all()
            ran.add(family)
    assert ran == {"timm", "transformers"}


def test_tower_flops_match_timm_counts_of_the_same_architecture():
    """A transformers tower's count equals timm's count of the same ViT: CLIP ViT-L/14@336 against
    timm's vit_large_patch14_clip_336 (577 tokens), SigLIP so400m/14@384 against
    vit_so400m_patch14_siglip_384 with its attention pool added by hand (timm's count reads the
    blocks and the classifier only)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import timm

    from vit_kernels.benchmarking import vit as bench_vit

    def on_meta(make):
        with torch.device("meta"):
            return make()

    for label, timm_name in (("CLIP-ViT-L/14@336", "vit_large_patch14_clip_336"),
                             ("SigLIP-so400m/14@384", "vit_so400m_patch14_siglip_384")):
        spec = bench_vit.VIT_MODELS[label]
        tower = on_meta(lambda: bench_vit.base_model(spec, torch.device("meta")))
        theirs = on_meta(lambda: timm.create_model(timm_name, pretrained=False, num_classes=1000))
        expected = bench_vit.vit_flops_per_image(theirs)
        if label.startswith("SigLIP"):
            width, tokens = 1152, 729
            expected += 2 * (2 * tokens + 1) * width * width + 4 * tokens * width  # q, k, v of one query
            expected += 2 * width * width + 2 * 2 * width * 4304  # out projection, MLP on one row
        assert bench_vit.vit_flops_per_image(tower) == expected, label


def test_end_to_end_timed_path_fills_the_report(monkeypatch):
    """The GPU job's end-to-end bookkeeping (agreement, images/s, MFU, peak memory, speedups
    over timm and torch.compile), run on the CPU with a tiny ViT: host timers stand in for
    CUDA events and memory stats, and torch.compile is left out (it is exercised on the GPU)."""
    pytest.importorskip("timm")
    import time

    from vit_kernels.benchmarking import report as results
    from vit_kernels.benchmarking import runner, timing
    from vit_kernels.benchmarking import vit as bench_vit

    def host_time_ms(fn, **_):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(timing, "time_cuda_ms", host_time_ms)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda model, **_: model)
    monkeypatch.setattr(bench_vit, "VIT_MODELS", dict(bench_vit.VIT_SMALL_MODELS))
    report = results.Report("test", "now", "t", "t", "p", bf16_matmul_tflops=10.0)
    measure = bench_vit.measure_vit
    monkeypatch.setattr(bench_vit, "measure_vit", lambda case, reps: measure(case, reps=reps, warmup=0))
    agreement = bench_vit.vit_agreement  # float32 on the CPU: the interpreter's bf16 dot is wrong
    monkeypatch.setattr(bench_vit, "vit_agreement", lambda spec, device, dtype: agreement(spec, device, None))
    runner.run_vit_timed(report, kernel_device(), reps=1)
    assert {(r.op, r.mode, r.provider) for r in report.rows} == {
        (label, mode, provider) for label, spec in bench_vit.VIT_SMALL_MODELS.items() for mode in bench_vit.MODES
        for provider in bench_vit.family_of(spec).providers}
    for r in report.rows:
        assert r.ms > 0 and r.images_per_s > 0 and r.pct_of_peak > 0 and r.peak_memory_gib == 1.0
        assert r.speedup_vs_eager > 0 and r.speedup_vs_baseline > 0
        assert r.rule_ok
    assert "End to end" in results.markdown(report)


GPU_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")


def _run_gpu_check(out_dir, *stages, **env_vars):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out_dir), SKIP_BUILD="1", **env_vars)
    return subprocess.run(["bash", GPU_CHECK, *stages], env=env, capture_output=True, text=True, timeout=300)


def test_gpu_check_leaves_what_a_device_call_returns(tmp_path):
    """A device call returns at most 8 files from $OUT, named in letters, digits, '.', '_' and
    '-': gpu_check.sh packs everything else into one archive, and a stage the budget has no
    room for is skipped, not started."""
    out_dir = tmp_path / "out"
    (out_dir / "sub").mkdir(parents=True)
    for i in range(12):
        (out_dir / f"stage-{i}.log").write_text(f"log {i}\n")
    (out_dir / "sub" / "inner.txt").write_text("inner\n")
    (out_dir / "bench-main.json").write_text("{}\n")
    result = _run_gpu_check(out_dir, "tests", "main", GPU_CHECK_BUDGET_S="45")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("tests", "main"):
        assert f"== {stage} skipped: the budget" in result.stdout, result.stdout
    names = sorted(path.name for path in out_dir.iterdir())
    assert names == ["bench-main.json", "gpu_check_logs.tar.gz", "summary.txt"], names
    with tarfile.open(out_dir / "gpu_check_logs.tar.gz") as archive:
        packed = set(archive.getnames())
    assert {f"stage-{i}.log" for i in range(12)} | {"sub/inner.txt", "env.txt"} <= packed, packed
    assert "skipped" in (out_dir / "summary.txt").read_text()


def test_gpu_check_interrupts_a_stage_at_its_cap(tmp_path):
    """<STAGE>_TIMEOUT_S stops the stage (pytest interrupted, so it reports) and the script goes on."""
    sleeper = tmp_path / "test_sleeps.py"
    sleeper.write_text("import time\n\n\ndef test_sleeps():\n    time.sleep(120)\n")
    result = _run_gpu_check(tmp_path / "out", "tests", TEST_FILES=str(sleeper), TESTS_TIMEOUT_S="3",
                            TEST_WORKERS="0")
    assert "== tests (load average" in result.stdout and "capped at 3 s" in result.stdout, result.stdout
    took = [line for line in result.stdout.splitlines() if line.startswith("-- tests took")]
    # Shorter than the sleep: the stage was cut, not waited out (a bound on the work, not on this
    # machine's speed; a wall-clock margin fails on a loaded machine).
    assert took and int(took[0].split()[3]) < 120, result.stdout
    assert result.returncode == 1, result.stdout  # the interrupted stage counts as a failure
    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tar.gz") as archive:
        log = archive.extractfile("tests.log").read().decode()
    assert "KeyboardInterrupt" in log, log


HOST_PROBE = os.path.join(os.path.dirname(GPU_CHECK), "host_probe.py")
PROBE_LAUNCHES = ("torch.add(a, b, out=c)", "torch.add(a, b)", "triton kernel[grid](3 args)",
                  "vit_kernels launch(3 args)", "vit_kernels add_layer_norm", "eager x + r, F.layer_norm")


def test_host_probe_times_each_launch_it_lists():
    """scripts/host_probe.py --stubbed (the CPU, Triton's launch path kept): a line per launch with
    a positive time. Its step part needs CUDA and is not run here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, HOST_PROBE, "--stubbed"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("launch: ")]
    assert [line[len("launch: "):].rsplit(None, 2)[0] for line in lines] == list(PROBE_LAUNCHES), result.stdout
    assert all(float(line.split()[-2]) > 0 for line in lines), result.stdout
    assert not any(line.startswith("step:") for line in result.stdout.splitlines()), result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe's refusal without CUDA")
def test_gpu_check_probe_stage_without_a_gpu_says_so(tmp_path):
    """The lease's first stage, on a machine without CUDA: a clear line and a failed stage, and the
    script goes on (its output packed like any other)."""
    result = _run_gpu_check(tmp_path / "out", "probe")
    assert "== probe (load average" in result.stdout, result.stdout
    assert result.returncode == 1, result.stdout
    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tar.gz") as archive:
        log = archive.extractfile("probe.txt").read().decode()
    assert log.count("host_probe: no CUDA device") == 3, log


def test_main_job_cut_short_keeps_its_tables_and_chart(tmp_path, monkeypatch):
    """gpu_check.sh stops a capped main job with SIGINT (KeyboardInterrupt): the rows measured
    so far still reach the JSON, the markdown and the chart, and the exit status is 1."""
    from vit_kernels import bench
    from vit_kernels.benchmarking import runner
    from vit_kernels.benchmarking.report import Row

    ran = []

    def numerics_then_interrupt(report, op, device):
        if ran:
            raise KeyboardInterrupt
        ran.append(op.name)
        report.rows.append(Row(op.name, "(2, 8)", "fwd", "vit_kernels", error_vs_eager=0.5))

    monkeypatch.setattr(runner, "run_numerics", numerics_then_interrupt)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    paths = {suffix: tmp_path / f"r.{suffix}" for suffix in ("json", "md", "png")}
    status = bench.main(["--ops", "add_layer_norm", "bias_gelu", "--json", str(paths["json"]),
                         "--markdown", str(paths["md"]), *(["--plot", str(paths["png"])] if _has_matplotlib() else [])])
    assert status == 1 and ran == ["add_layer_norm"]
    assert [row["op"] for row in json.loads(paths["json"].read_text())["rows"]] == ["add_layer_norm"]
    assert "| add_layer_norm |" in paths["md"].read_text()
    if _has_matplotlib():
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
