"""Tests for bench.py: the tiny benchmark's JSON, FLOP counting against hand counts, and the CLI."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
from modules import NoAttention  # noqa: E402
from utils import UsageError, count_flops  # noqa: E402

TINY = ["--base_channels", "8", "--image_size", "16", "--batch", "2", "--steps", "2", "--warmup", "1",
        "--num_classes", "2", "--n_per_row", "2", "--peak_size", "256", "--peak_repeats", "2"]


def positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_benchmark_writes_positive_finite_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--isolate", "false", "--grid_samplers", "ddpm,dpm++", "--grid_full", "false",
                       "--out", str(out)])
    result = json.loads(out.read_text())
    assert positive_finite(result["matmul_peak"]["flops_per_s"])
    for part, rate in (("train", "images_per_s"), ("forward", "evals_per_s")):
        for key in (rate, "flops_per_s", "peak_mem_mib"):
            assert positive_finite(result[part][key]), (part, key)
    # the rates are the counted FLOPs over the measured seconds, the fractions those over the matmul's
    train, forward, peak = result["train"], result["forward"], result["matmul_peak"]["flops_per_s"]
    assert train["flops_per_s"] == pytest.approx(train["flops_per_step"] / train["step_s"])
    assert forward["flops_per_s"] == pytest.approx(forward["flops_per_call"] / forward["call_s"])
    assert forward["evals_per_s"] == pytest.approx(2 / forward["call_s"])  # --batch 2
    for part in (train, forward):
        assert part["fraction_of_peak"] == pytest.approx(part["flops_per_s"] / peak)
    # checkpointed training, side by side: the same images per step, with the blocks' forward passes counted again
    checkpointed = result["train_checkpointed"]
    assert positive_finite(checkpointed["images_per_s"]) and positive_finite(checkpointed["peak_mem_mib"])
    assert checkpointed["flops_per_step"] > 1.2 * train["flops_per_step"]
    # forward + backward is about 3 forwards: counted per image, the training step costs 2..4 times a forward
    ratio = (result["train"]["flops_per_step"] / 2) / (result["forward"]["flops_per_call"] / 2)
    assert 2 < ratio < 4
    grid = result["grid"]
    assert grid["images"] == 4 and set(grid["samplers"]) == {"ddpm", "dpm++"}
    assert grid["samplers"]["ddpm"]["steps"] == 999 and grid["samplers"]["dpm++"]["steps"] == 20
    for entry in grid["samplers"].values():  # steps x 8 rows (4 images, guided) at the measured evaluations/s
        assert entry["network_s"] == pytest.approx(entry["steps"] * 8 / forward["evals_per_s"])
        assert entry["estimated_s"] == pytest.approx(entry["network_s"] + entry["overhead_s"])
        assert positive_finite(entry["overhead_s"])
    estimated = {name: entry["estimated_s"] for name, entry in grid["samplers"].items()}
    assert grid["speedup_dpmpp_vs_ddpm"] == pytest.approx(estimated["ddpm"] / estimated["dpm++"])
    assert "estimated" in capsys.readouterr().out


def test_grid_full_times_complete_runs(monkeypatch):
    """The free network's run and the real one's are both complete: 20 calls of 8 rows (4 images, guided)."""
    rows = {"ZeroEps": [], "Runner": []}
    for name in rows:
        forward = getattr(bench, name).forward

        def counted(self, x, *args, forward=forward, name=name):
            rows[name].append(x.shape[0])
            return forward(self, x, *args)
        monkeypatch.setattr(getattr(bench, name), "forward", counted)
    cfg = bench.parse_config(bench.Config, TINY + ["--grid_samplers", "dpm++ode", "--grid_full", "true"])
    grid = bench.measure_grid(cfg, torch.device("cpu"))
    entry = grid["samplers"]["dpm++ode"]
    assert positive_finite(entry["measured_s"]) and positive_finite(entry["overhead_s"])
    assert entry["steps"] == 20 and rows == {"ZeroEps": [8] * 20, "Runner": [8] * 20}


def test_count_flops_linear_conv_and_attention_match_hand_counts():
    x = torch.randn(4, 16)
    assert count_flops(lambda: nn.Linear(16, 32)(x)) == 2 * 4 * 16 * 32
    image = torch.randn(2, 3, 8, 8)
    assert count_flops(lambda: nn.Conv2d(3, 5, 3, padding=1)(image)) == 2 * 2 * 5 * 8 * 8 * 3 * 9
    batch, tokens, dim = 2, 10, 8
    mha, h = nn.MultiheadAttention(dim, 2, batch_first=True), torch.randn(batch, tokens, dim)
    projections = 2 * batch * tokens * dim * (3 * dim + dim)  # q, k, v in; out
    attention = 4 * batch * tokens * tokens * dim  # QK^T and AV over all heads
    assert count_flops(lambda: mha(h, h, h, need_weights=False)) == projections + attention


def test_measure_peak_positive():
    cfg = bench.parse_config(bench.Config, TINY)
    assert positive_finite(bench.measure_peak(cfg, torch.device("cpu"))["flops_per_s"])


def test_cli_rejects_a_bad_value_with_one_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--precision", "fp16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "fp16" in proc.stderr


@pytest.mark.parametrize("name, value", [("grid_samplers", "plms"), ("batch", 0), ("device", "mps"),
                                         ("attn_factors", "3")])
def test_validate_names_the_bad_value(name, value):
    """Config.validate refuses the value with a line that names it, and parse_config runs it on the flags."""
    with pytest.raises(UsageError, match=str(value)):
        bench.Config(**{name: value}).validate()
    with pytest.raises(UsageError, match=str(value)):
        bench.parse_config(bench.Config, [f"--{name}", str(value)])


def test_the_grid_width_is_n_per_row_and_its_old_name_still_parses(capsys):
    assert bench.parse_config(bench.Config, ["--n_per_row", "3"]).n_per_row == 3
    assert bench.parse_config(bench.Config, ["--grid_per_class", "4"]).n_per_row == 4
    assert "note: --grid_per_class is now --n_per_row; the old name still works" in capsys.readouterr().err


def test_the_benchmarked_network_has_the_attention_it_is_asked_for():
    cfg = bench.parse_config(bench.Config, ["--base_channels", "8", "--attn_factors", "2,4,8", "--image_size", "16"])
    net, _, _ = bench.build(cfg, torch.device("cpu"))
    full = bench.build(bench.parse_config(bench.Config, ["--base_channels", "8", "--image_size", "16"]),
                       torch.device("cpu"))[0]
    assert isinstance(net.sa6, NoAttention) and not isinstance(full.sa6, NoAttention)  # none at 16x16 only
    assert type(net.sa3) is type(full.sa3)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.fixture
def tf32_flags():
    """Restore the global TF32 switches that a test sets."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("tf32, precision, mode", [("true", "fp32", "TF32"), ("false", "fp32", "IEEE fp32"),
                                                   ("true", "bf16", "bf16 autocast, other float32 ops in TF32")])
def test_on_cuda_the_network_and_the_peak_share_one_tf32_mode(tf32_flags, tf32, precision, mode):
    """cuDNN convolutions default to TF32 and cuBLAS matmuls to IEEE: both are set alike, and the mode is named."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
    cfg = bench.parse_config(bench.Config, ["--tf32", tf32, "--precision", precision])
    assert bench.numeric_mode(cfg, torch.device("cuda")) == mode
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (tf32 == "true")
    assert bench.numeric_mode(cfg, torch.device("cpu")) == precision


def test_data_measures_each_pipeline_beside_training(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--isolate", "false", "--grid_samplers", "", "--data", "--data_workers", "0,1",
                       "--data_images", "8", "--batch", "4", "--out", str(out)])
    data = json.loads(out.read_text())["data"]
    assert set(data["dataloader_images_per_s"]) == {"0", "1"} and data["images"] == 8
    rates = [*data["dataloader_images_per_s"].values(), data["on_device_images_per_s"]]
    assert all(positive_finite(rate) for rate in rates)
    assert data["on_device_mib"] == pytest.approx(8 * (3 * 16 * 16 + 8) / 2**20)  # uint8 pixels, int64 labels
    table = capsys.readouterr().out
    assert "DataLoader, 1 workers" in table and "held on the device" in table and "x training" in table


@pytest.mark.parametrize("name, value", [("data_workers", "two"), ("data_workers", "-1"), ("data_images", 3)])
def test_data_flags_bad_values_are_named(name, value):
    with pytest.raises(UsageError, match="data_workers"):
        bench.Config(**{name: value}).validate()
    with pytest.raises(UsageError, match="data_workers"):
        bench.parse_config(bench.Config, [f"--{name}", str(value)])
