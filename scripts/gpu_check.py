"""Everything a GPU can show and a CPU cannot, in one run sized for 8 minutes on one GPU; one table, one JSON file.

    bash scripts/gpu_check.sh                                   # on a GPU: prints the table, writes gpu_check.json
    python scripts/gpu_check.py --device cpu --tiny --precisions no --compile false --isolate false   # CI: seconds

train   20 steps of each script (ddpm.py, ddpm_conditional.py in every conditioning mode, train_sd.py with a tiny
        random VAE and CLIP) in each precision, and in bf16 with --compile true; the host syncs of the steady state
        (steps 5 to 19) are counted with torch.cuda.set_sync_debug_mode("warn"). Each precision runs in its own
        process (Accelerate fixes the precision per process), its scripts in that process one after the other.
resume  a run saves at step 10; its state is given the RNG state of one more GPU than is visible, and the run resumes
        under CUDA_VISIBLE_DEVICES=0 to step 20 (a resume on a box with fewer GPUs).
bench   bench.py at 32 px (batch 128) and 64 px (batch 32): training images/s, % of the matmul peak, peak memory;
        and bench.py --data: the input pipeline against training.
layout  --channels_last: how many of the network's GroupNorm outputs keep the channels_last layout, and training
        images/s with and without it.
colors  data.classify_colors on images on the device gives the CPU's answer.

With --tiny every network is 8 channels wide at 16 px and trains 2 steps, ddpm_conditional.py in one conditioning
mode: the CI runs it on the CPU (tests/test_gpu_check.py), so that it cannot rot.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import bench  # noqa: E402
import ddpm  # noqa: E402
import ddpm_conditional  # noqa: E402
import train_sd  # noqa: E402
from data import ShapesDataset, classify_colors  # noqa: E402
from latents import make_tiny_models  # noqa: E402
from modules import UNet_conditional  # noqa: E402
from utils import UsageError, arg, atomic_save, load_checkpoint, parse_config, pick_device, run_cli  # noqa: E402


@dataclass
class Config:
    device: str = arg("cuda", "the device checked: cuda, cuda:N or cpu")
    tiny: bool = arg(False, "toy sizes (8 channels, 16 px, 2 steps): the CI's run on the CPU")
    steps: int = arg(20, "optimizer steps of each training run (--tiny: 2)")
    precisions: str = arg("no,bf16,fp16", "comma-separated --mixed_precision values of the training runs")
    compile: bool = arg(True, "also train ddpm_conditional.py and train_sd.py in bf16 with --compile true")
    isolate: bool = arg(True, "run each precision's training runs in a process of its own (false: one precision, "
                              "in this process)")
    sd_models: str | None = arg(None, "folder written by train_sd.py --make_tiny_models, reused (None: written anew)")
    out: str = arg("gpu_check.json", "JSON file of the table")


GROUP_FLAG = [("--group", {"default": None, "metavar": "PRECISION[+compile]",
                           "help": "run this one group of training runs here and write its rows to --out"})]
CONDITIONINGS = ("add", "concat", "xattn", "adanorm")


def sizes(cfg):
    """(image_size, base_channels, batch_size, steps) of the training runs."""
    return (16, 8, 4, 2) if cfg.tiny else (32, 64, 64, cfg.steps)


def row(check, setting, ok, figures="", **values):
    return {"check": check, "setting": setting, "status": "ok" if ok else "FAIL", "figures": figures, **values}


# ----------------------------------------------------------------------------- train: every script, every precision
def script_runs(cfg, sd_models, precision, compiled):
    """(name, main function, argv) of each training run of one group."""
    image_size, width, batch, steps = sizes(cfg)
    common = ["--dataset", "shapes", "--dataset_size", str(batch * steps), "--image_size", str(image_size),
              "--base_channels", str(width), "--batch_size", str(batch), "--max_steps", str(steps),
              "--sample_steps", "2", "--num_workers", "0", "--device", cfg.device, "--mixed_precision", precision,
              "--compile", str(compiled), "--print_every", "1000", "--checkpoint_every", "1000", "--overwrite"]
    tag = f"{precision}{'_compiled' if compiled else ''}"
    runs = [("ddpm.py", ddpm.main, common + ["--sampler", "ddim", "--n_samples", "4", "--run_name", f"u_{tag}"])]
    modes = ("add",) if compiled or cfg.tiny else CONDITIONINGS  # tests/test_training.py trains every mode on the CPU
    runs += [(f"ddpm_conditional.py {mode}", ddpm_conditional.main,
              common + ["--conditioning", mode, "--sampler", "ddim", "--n_per_row", "1", "--run_name",
                        f"c_{mode}_{tag}"]) for mode in modes]
    vae, text_encoder = (os.path.join(sd_models, name) for name in ("vae", "text_encoder"))
    runs.append(("train_sd.py", train_sd.main, common + ["--vae", vae, "--text_encoder", text_encoder,
                                                         "--n_per_row", "1", "--run_name", f"sd_{tag}"]))
    if compiled:
        runs = runs[1:]  # ddpm_conditional.py and train_sd.py: the two networks
    return runs


class SyncWatch:
    """Patches Diffusion.loss to time the steady state (loss calls first..last) and to count its host syncs there."""

    def __init__(self, device, first, last):
        self.device, self.first, self.last, self.calls = device, first, last, 0
        self.start = self.seconds = None
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        self.loss = ddpm.Diffusion.loss
        watch = self

        def watched(diffusion, *args, **kwargs):
            watch.calls += 1
            if watch.calls == watch.last and watch.start is not None:
                watch.sync_debug(0)
                watch.seconds = time.perf_counter() - watch.start
            if watch.calls == watch.first:
                watch.sync_debug("warn")
                watch.start = time.perf_counter()
            return watch.loss(diffusion, *args, **kwargs)

        ddpm.Diffusion.loss = watched
        self.caught = warnings.catch_warnings(record=True)
        self.warnings = self.caught.__enter__()
        warnings.simplefilter("always")
        return self

    def sync_debug(self, mode):
        """Wait for the GPU's queue (with the debug mode off), then set the mode; nothing on the CPU."""
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(mode)

    def __exit__(self, *exc_info):
        ddpm.Diffusion.loss = self.loss
        self.caught.__exit__(*exc_info)
        self.sync_debug(0)

    def syncs(self):
        """(count, 'file:line' of the first few) of the synchronizing operations in the steady state."""
        found = [w for w in self.warnings if "synchroniz" in str(w.message)]
        return len(found), sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in found})[:3]


def train_group(cfg, sd_models, group):
    """The rows of one group of training runs ('no', 'bf16', 'fp16', or 'bf16+compile'), in this process."""
    precision, compiled = group.split("+")[0], group.endswith("+compile")
    _, _, batch, steps = sizes(cfg)
    rows = []
    for name, main, argv in script_runs(cfg, sd_models, precision, compiled):
        setting = f"{name}, {precision}{', compiled' if compiled else ''}"
        started = time.perf_counter()
        with SyncWatch(cfg.device, min(5, steps), steps) as watch:
            try:
                result = main(argv)
            except (Exception, SystemExit) as exc:  # a check reports every failure in its table and goes on
                rows.append(row("train", setting, False, f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
        losses = result["losses"]
        ok = len(losses) == steps and math.isfinite(losses[-1])
        figures = [f"loss {losses[-1]:.3f}", f"{time.perf_counter() - started:.0f} s in all"]
        if watch.seconds:
            figures.append(f"{(watch.last - watch.first) * batch / watch.seconds:.0f} img/s steady")
        count, where = watch.syncs()
        if watch.cuda:
            figures.append(f"{count} host syncs in steps {watch.first}-{watch.last - 1}" + (f" ({', '.join(where)})"
                                                                                          if where else ""))
        if result["skipped"]:
            figures.append(f"{result['skipped']} skipped")
        rows.append(row("train", setting, ok, "; ".join(figures), syncs=count if watch.cuda else None))
    return rows


def groups(cfg):
    found = [p.strip() for p in cfg.precisions.split(",") if p.strip()]
    bad = [p for p in found if p not in ("no", "bf16", "fp16")]
    if bad:
        raise UsageError(f"precision '{bad[0]}' is unknown: use some of no, bf16, fp16")
    if cfg.device == "cpu" and "fp16" in found:
        raise UsageError("fp16 needs a GPU: leave it out of --precisions with --device cpu")
    return found + (["bf16+compile"] if cfg.compile else [])


def train_rows(cfg, workdir, sd_models):
    """Each group in a process of its own (Accelerate fixes the precision per process), or here without isolate."""
    todo = groups(cfg)
    if not cfg.isolate:
        if len(todo) > 1:
            raise UsageError(f"--isolate false runs one group in this process, not {len(todo)}: pass one precision "
                             "and --compile false, or --isolate true")
        return train_group(cfg, sd_models, todo[0])
    rows = []
    for group in todo:
        out = os.path.join(workdir, f"group_{group}.json")
        argv = [f"--{f.name}={getattr(dataclasses.replace(cfg, sd_models=sd_models), f.name)}"
                for f in dataclasses.fields(cfg) if f.name != "out"]
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--group", group, "--out", out],
                              cwd=workdir, capture_output=True, text=True)
        if done.returncode == 0:
            rows += json.load(open(out))
        else:
            rows.append(row("train", f"the {group} group", False, done.stderr.strip().splitlines()[-1][:200]))
    return rows


# ----------------------------------------------------------------------------- resume with fewer GPUs visible
def resume_row(cfg, workdir):
    image_size, width, batch, steps = sizes(cfg)
    first, total = max(1, steps // 2), steps
    argv = ["--dataset", "shapes", "--dataset_size", str(batch * total), "--image_size", str(image_size),
            "--base_channels", str(width), "--batch_size", str(batch), "--sampler", "ddim", "--sample_steps", "2",
            "--n_per_row", "1", "--num_workers", "0", "--device", cfg.device, "--run_name", "resume",
            "--checkpoint_every", str(first)]
    ddpm_conditional.main(argv + ["--max_steps", str(first), "--overwrite"])
    path = os.path.join(workdir, "models", "resume", "training_state.pt")
    state = load_checkpoint(path)
    cuda_states = state["rng"].get("cuda") or [torch.zeros(16, dtype=torch.uint8)]
    state["rng"]["cuda"] = cuda_states + [cuda_states[-1].clone()]  # saved on one GPU more than is visible now
    atomic_save(state, path)
    resume = argv + ["--max_steps", str(total), "--resume"]
    if cfg.device.startswith("cuda"):  # a process of its own, with one GPU visible
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": REPO}
        done = subprocess.run([sys.executable, os.path.join(REPO, "ddpm_conditional.py"),
                               *[a if a != cfg.device else "cuda" for a in resume]],
                              cwd=workdir, env=env, capture_output=True, text=True)
        error = done.stderr.strip().splitlines()[-1][:200] if done.returncode else ""
    else:
        ddpm_conditional.main(resume)
        error = ""
    step = load_checkpoint(path)["step"]
    return row("resume", f"{len(cuda_states) + 1} CUDA RNG states saved, 1 GPU visible", not error and step == total,
               error or f"resumed at step {first}, reached step {step}")


# ----------------------------------------------------------------------------- bench
def bench_rows(cfg, workdir):
    tiny = ["--base_channels", "8", "--num_classes", "2", "--batch", "4", "--steps", "2", "--warmup", "1",
            "--peak_size", "256", "--peak_repeats", "2", "--data_images", "8", "--data_workers", "0"]
    runs = ([("16 px, fp32", ["--image_size", "16"], False)] if cfg.tiny else
            [("32 px, batch 128, TF32", ["--image_size", "32", "--batch", "128"], False),
             ("32 px, batch 128, bf16", ["--image_size", "32", "--batch", "128", "--precision", "bf16"], True),
             ("64 px, batch 32, bf16", ["--image_size", "64", "--batch", "32", "--precision", "bf16"], False)])
    rows = []
    for setting, args, with_data in runs:
        data = ["--data", "--data_workers", "0,2,8"] if with_data else []
        argv = args + (tiny + ["--data"] if cfg.tiny else data) + [
            "--grid_samplers", "", "--isolate", "false", "--device", cfg.device,
            "--out", os.path.join(workdir, "bench.json")]
        result = bench.main(argv)
        train = result["train"]
        figures = (f"{train['images_per_s']:.1f} img/s, {100 * train['fraction_of_peak']:.0f}% of the "
                   f"{result['matmul_peak']['flops_per_s'] / 1e12:.2f} TFLOP/s peak, {train['peak_mem_mib']:.0f} MiB, "
                   f"EMA {result['ema']['ms_per_step']:.2f} ms")
        rows.append(row("bench", setting, 0 < train["fraction_of_peak"] <= 1 or cfg.tiny, figures))
        if "data" in result:
            data = result["data"]
            rates = ", ".join(f"{w} workers {r:.0f}" for w, r in data["dataloader_images_per_s"].items())
            rows.append(row("bench --data", setting, True, f"DataLoader {rates}; on the device "
                            f"{data['on_device_images_per_s']:.0f} img/s; training {train['images_per_s']:.0f} img/s"))
    return rows


# ----------------------------------------------------------------------------- channels_last and the colour judge
def training_images_per_s(net, device, image_size, batch, steps):
    """Images/s of AdamW steps on the DDPM loss, under bf16 autocast on CUDA."""
    diffusion = ddpm.Diffusion(image_size=image_size, device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x_0 = torch.randn(batch, 3, image_size, image_size, device=device)  # NCHW batches, as training gives them
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = diffusion.loss(net, x_0, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / bench.median(bench.time_calls(step, device, 2, steps))


def layout_row(cfg):
    device = torch.device(cfg.device)
    image_size, width, batch, steps = sizes(cfg)
    rates = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = UNet_conditional(num_classes=10, base_channels=width).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        rates[channels_last] = training_images_per_s(net, device, image_size, batch, max(2, steps // 2))
    kept = []
    hooks = [m.register_forward_hook(lambda m, i, out: kept.append(out.is_contiguous(memory_format=torch.channels_last)))
             for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x = torch.randn(2, 3, image_size, image_size, device=device)
        net(x, torch.full((2,), 500, device=device), torch.zeros(2, dtype=torch.long, device=device))
    for hook in hooks:
        hook.remove()
    return row("layout", "--channels_last", True,
               f"{sum(kept)} of {len(kept)} GroupNorm outputs stay channels_last; training {rates[True]:.1f} img/s "
               f"with it, {rates[False]:.1f} without ({rates[True] / rates[False]:.2f}x)",
               groupnorm_channels_last=sum(kept), groupnorm=len(kept), speedup=rates[True] / rates[False])


def colors_row(cfg):
    shapes = ShapesDataset(16, size=20)
    images = torch.stack([shapes[i][0] for i in range(len(shapes))])
    on_device = classify_colors(images.to(cfg.device)).cpu()
    return row("colors", f"classify_colors on {cfg.device}", torch.equal(on_device, classify_colors(images)),
               f"{len(images)} images judged alike on {cfg.device} and the CPU")


# ----------------------------------------------------------------------------- the table
def format_table(rows):
    widths = [max(len(str(r[key])) for r in rows + [{k: k for k in ("check", "setting", "status")}])
              for key in ("check", "setting", "status")]
    lines = [f"{'check':<{widths[0]}}  {'setting':<{widths[1]}}  {'status':<{widths[2]}}  figures"]
    lines += [f"{r['check']:<{widths[0]}}  {r['setting']:<{widths[1]}}  {r['status']:<{widths[2]}}  {r['figures']}"
              for r in rows]
    return "\n".join(lines)


def main(argv=None):
    cfg, flags = parse_config(Config, argv, __doc__, extra=GROUP_FLAG)
    pick_device(cfg.device)
    out = os.path.abspath(cfg.out)
    with tempfile.TemporaryDirectory() as workdir:
        previous = os.getcwd()
        os.chdir(workdir)  # every run writes its results/ and models/ here
        try:
            if flags.group is not None:  # one group, in the process the orchestrator started
                with open(out, "w") as f:
                    json.dump(train_group(cfg, cfg.sd_models, flags.group), f)
                return None
            sd_models = cfg.sd_models or os.path.dirname(make_tiny_models(os.path.join(workdir, "sd"))[0])
            rows = train_rows(cfg, workdir, sd_models)
            rows += [resume_row(cfg, workdir), *bench_rows(cfg, workdir), layout_row(cfg), colors_row(cfg)]
        finally:
            os.chdir(previous)
    name = torch.cuda.get_device_name(torch.device(cfg.device)) if cfg.device.startswith("cuda") else "cpu"
    result = {"device": name, "torch": torch.__version__, "tiny": cfg.tiny, "rows": rows,
              "passed": all(r["status"] == "ok" for r in rows)}
    print(f"{name}, torch {torch.__version__}{', tiny sizes' if cfg.tiny else ''}")
    print(format_table(rows))
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'all passed' if result['passed'] else 'FAILED'}; written to {cfg.out}")
    return result


def cli(argv=None):
    """main, exiting 1 when a check failed."""
    result = main(argv)
    if result is not None and not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(cli)
