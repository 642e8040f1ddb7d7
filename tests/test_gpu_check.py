"""scripts/gpu_check.py at toy sizes on the CPU, as the CI runs it, so that the GPU check cannot rot."""
import importlib.util
import json
import pathlib

import pytest

from utils import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--tiny", "--precisions", "no", "--compile", "false", "--isolate", "false"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_check_runs_and_passes_on_the_cpu(gpu_check, tmp_path, capsys, tiny_sd_models):
    out = tmp_path / "check.json"
    sd_models = str(pathlib.Path(tiny_sd_models["vae"]).parent)
    result = gpu_check.main(CPU + ["--out", str(out), "--sd_models", sd_models])
    assert json.loads(out.read_text()) == result and result["passed"]
    settings = {(r["check"], r["setting"]) for r in result["rows"]}
    scripts = ["ddpm.py", "ddpm_conditional.py add", "train_sd.py"]  # --tiny: one conditioning mode
    assert {("train", f"{name}, no") for name in scripts} <= settings
    assert {check for check, _ in settings} == {"train", "resume", "bench", "bench --data", "layout", "colors"}
    (layout,) = [r for r in result["rows"] if r["check"] == "layout"]
    assert layout["groupnorm"] > 20 and 0 <= layout["groupnorm_channels_last"] <= layout["groupnorm"]
    (resume,) = [r for r in result["rows"] if r["check"] == "resume"]
    assert "2 CUDA RNG states saved, 1 GPU visible" in resume["setting"] and "reached step 2" in resume["figures"]
    printed = capsys.readouterr().out
    assert printed.count("\ncheck  ") == 1 and "all passed" in printed


@pytest.mark.parametrize("args, message", [
    (["--precisions", "no,bf16"], "--isolate false runs one group in this process, not 2"),
    (["--precisions", "fp16"], "fp16 needs a GPU"),
    (["--precisions", "fp8"], "precision 'fp8' is unknown"),
])
def test_bad_settings_are_one_line_errors(gpu_check, tmp_path, args, message):
    with pytest.raises(UsageError, match=message):
        gpu_check.train_rows(gpu_check.parse_config(gpu_check.Config, CPU + args), str(tmp_path), str(tmp_path))
