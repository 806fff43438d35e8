"""The analytic FLOPs of benchmarks/gpu.py against torch's FLOP counter on a small DiT step
(SDPA forced onto its math path, so attention's matmuls are counted too)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from selfflow_core.builtin.dit import DiT
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.teachers import EMATeacher, NoTeacher
from selfflow_core.timesteps import DualTimestep, SingleTimestep
from selfflow_core.types import TokenBatch

BENCH = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("selfflow", [False, True], ids=["vanilla", "selfflow"])
def test_step_flops_match_the_counter(gpu, selfflow):
    torch.manual_seed(0)
    cfg = DiT.Config(depth=4, width=64, heads=4)
    b, n, c = 4, 32, 16
    pos = torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, 1)
    batch = TokenBatch.single(torch.randn(b, n, c), pos, labels=torch.arange(b))
    net = cfg.build(token_dims=[c], num_classes=10)
    obj = SelfFlowObjective(ObjectiveConfig(), depth=cfg.depth, width=cfg.width)
    teacher = (EMATeacher if selfflow else NoTeacher).Config().build()
    teacher.attach(net)
    sched = (DualTimestep.Config(mask_ratio=0.5) if selfflow else SingleTimestep.Config()).build()
    plan = sched.plan(batch, generator=torch.Generator().manual_seed(0))
    _, time_of = torch.unique(plan.student_t, return_inverse=True)
    rows = len(torch.unique(torch.arange(b)[:, None] * 10 ** 6 + time_of))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        obj(net, teacher, batch, plan, torch.randn(b, n, c)).total.backward()
    counted = counter.get_total_flops()
    analytic = gpu.step_flops(cfg, b, n, c, selfflow=selfflow, teacher_layer=obj.teacher_layer,
                              rows=rows)
    # the convention "backward = 2 x forward" also counts the input gradients of the first
    # layers (data tokens, sinusoidal time features), which autograd does not compute
    uncounted = 2 * b * n * c * cfg.width + 2 * rows * 256 * cfg.width
    assert analytic - counted == uncounted
    assert abs(analytic / counted - 1) < 0.01


def test_sizes_and_the_selfflow_overhead(gpu):
    rows = {r[0]: r for r in gpu.flops_table(["B", "XL"], {"B": 128, "XL": 64})}
    assert rows["XL"][2] == 20 and rows["B"][2] == 8  # teacher block 0.7 * depth
    for size, (depth, k) in {"B": (12, 8), "XL": (28, 20)}.items():
        # Self-Flow adds about k / (3 L) of a step for the truncated teacher, plus the head
        assert 1 + k / (3 * depth) < rows[size][5] < 1 + k / (3 * depth) + 0.1
    assert gpu.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3", None) == 989.4e12
    assert gpu.peak_flops("Some GPU", None) is None and gpu.peak_flops("x", 100) == 100e12


def test_the_measuring_code_runs_on_cpu(gpu, tmp_path):
    """The GPU benchmark's own code path (model, bf16 autocast, DTS, EMA teacher, optimizer,
    interleaved timing, record) on a CPU and a tiny shape: what a GPU run will execute."""
    payload = gpu.main(["--device", "cpu", "--sizes", "tiny", "--tokens", "16", "--batch", "4",
                        "--repeats", "2", "--inner", "1", "--out", str(tmp_path)])
    saved = (tmp_path / "gpu_cpu_check.json").read_text()
    assert '"tiny/selfflow"' in saved
    van, sf = payload["results"]["tiny/vanilla"], payload["results"]["tiny/selfflow"]
    cfg = DiT.Config.sized("tiny")
    k = ObjectiveConfig().layers(cfg.depth)[1]
    for rec, selfflow in ((van, False), (sf, True)):
        assert rec["median_s"] > 0 and rec["mfu"] is None  # no peak FLOP/s for a CPU
        assert rec["tokens_per_s"] == pytest.approx(4 * 16 / rec["median_s"])
        assert rec["step_flops"] == gpu.step_flops(cfg, 4, 16, gpu.CHANNELS, selfflow=selfflow,
                                                   teacher_layer=k)
    assert sf["step_time_ratio"] == pytest.approx(sf["median_s"] / van["median_s"])
    assert 1 < sf["flop_ratio"] < 1.5
