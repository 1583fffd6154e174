"""Which timm backbone families run under DP, and what a round costs on this machine.

    .venv/bin/python scripts/benchmark_backbones.py                  # writes docs/backbones.md
    .venv/bin/python scripts/benchmark_backbones.py --rounds 3 --out /tmp/b.md

Every family runs the same DP-FedEmb job in this process, one after the other: 32x32 RGB images stored
channels-last in an .npz (random pixels: the cost, not the accuracy, is measured), model.norm = "group",
the same users, sampling and local epochs. The seconds per round are the median over the rounds after
the first (which builds the model), and each is shown as a ratio to the project's LeNet, run first as
the baseline.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from fedemb.config import load_config, to_toml
from fedemb.models.embedding_net import has_batchnorm
from fedemb.monitoring.telemetry import read_telemetry
from fedemb.run_setup import prepare_run
from simulations.client_app import train
from simulations.inprocess import InProcessGrid
from simulations.run import run_federated

REPO = Path(__file__).resolve().parents[1]

BASELINE = ("baseline", "fedemb_lenet")
FAMILIES = [("ResNet", "resnet18"), ("EfficientNet", "efficientnet_b0"), ("MobileNet", "mobilenetv3_small_100"),
            ("ConvNeXt", "convnext_atto"), ("ViT (LayerNorm)", "vit_tiny_patch16_224"), ("RegNet", "regnetx_002")]


def write_data(path: Path, users: int, per_user: int) -> None:
    rng = np.random.default_rng(0)
    n = users * per_user
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, n),
             user=np.repeat(np.arange(users), per_user))


def run_family(model: str, data: Path, work: Path, rounds: int) -> dict:
    cfg = load_config(None, ['data.name="npz"', f'data.path="{data}"', f'model.name="{model}"', "model.norm=\"group\"",
                             f"run.rounds={rounds}", "run.seed=0", "run.eval_every=0", "sampling.rate=0.25",
                             "sampling.users_per_client=1", "client.epochs=1", "data.eval_users=0.2",
                             "privacy.enabled=true"])
    run_dir = work / model
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(to_toml(cfg))
    net = prepare_run(cfg).net
    started = time.monotonic()
    results = run_federated(InProcessGrid(train, 2), cfg, run_dir, show_progress=False)
    rounds_s = [r["round-seconds"] for r in read_telemetry(run_dir)]
    return {"params": sum(p.numel() for p in net.parameters()), "batchnorm": has_batchnorm(net),
            "buffers": len(list(net.backbone.buffers())), "completed": results["rounds_completed"],
            "diverged": results["diverged"], "round_s": statistics.median(rounds_s[1:] or rounds_s),
            "total_s": time.monotonic() - started}


def main(out: Annotated[Path, typer.Option(help="Where the table goes.")] = REPO / "docs" / "backbones.md",
         rounds: Annotated[int, typer.Option(help="Rounds per family (the first is left out of the median).")] = 3,
         users: int = 40, per_user: int = 10):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_data(work / "rgb.npz", users, per_user)
        rows = []
        for family, model in [BASELINE, *FAMILIES]:
            measured = run_family(model, work / "rgb.npz", work, rounds)
            rows.append((family, model, measured))
            typer.echo(f"{family:16s} {model:24s} {measured['round_s']:6.2f} s/round")
    base = rows[0][2]["round_s"]
    lines = [
        "# Backbones under DP: which families run, and their cost per round",
        "",
        f"Written by `scripts/benchmark_backbones.py --rounds {rounds}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.platform()}, {platform.processor() or 'CPU'}, 2 cores, no GPU.",
        "",
        f"The job: {users} users with {per_user} random 32x32 RGB images each, stored channels-last (uint8) in "
        "an .npz; DP-FedEmb with q = 0.25, k = 1, one local epoch, `model.norm = \"group\"`, 2 in-process "
        "workers. Seconds per round: the median over the rounds after the first. Ratio: against the "
        "project's LeNet in the same command.",
        "",
        "| family | timm model | parameters | BatchNorm left | buffers in the backbone | rounds completed | s / round | ratio to LeNet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, model, m in rows:
        lines.append(f"| {family} | `{model}` | {m['params'] / 1e6:.2f}M | {'yes' if m['batchnorm'] else 'no'} | "
                     f"{m['buffers']} | {m['completed']} of {rounds} | {m['round_s']:.2f} | {m['round_s'] / base:.1f} |")
    lines += ["", "BatchNorm becomes GroupNorm (`model.norm = \"group\"`; `\"affine\"` keeps a pretrained "
              "BatchNorm's function with no statistics), so no running statistic learnt from a client's data "
              "is left outside its clipped update. ViT is built for the data's image size (timm's `img_size`); "
              "its LayerNorm has no statistics. Pretrained weights come only from a local file "
              "(`model.pretrained_file`, passed to timm as `pretrained_cfg_overlay`), never a download.", ""]
    out.write_text("\n".join(lines))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
