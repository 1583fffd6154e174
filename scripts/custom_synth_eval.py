"""Customized synthesis on real users: accuracy on each user's own held-out images, per sharing level,
against the L0-only baseline, with and without the federated model's released artifacts.

The users are NIST writers of MNIST t10k (QMNIST writer ids; disjoint from the training writers).
Each writer's task: `--references` images per digit as references (foreground = intensity > 0.3), the
rest of the writer's images as the test set. For every writer and every level configuration, the full
`fedemb synth custom` path runs (sanitize -> payload bytes -> server synthesis -> specialised model),
and the synthetic images also train a from-scratch model for comparison. Writes a markdown table.

    .venv/bin/python scripts/custom_synth_eval.py runs/mnist --invert runs/mnist/synth/invert-seed0 \\
        --test-writers PATH/qmnist-test-labels-idx2-int.gz --writers 8 --out docs/synthesis-custom-mnist.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedemb.config import load_config
from fedemb.synth.custom import custom_settings
from fedemb.synth.custom_run import run_custom, task_accuracy
from fedemb.synth.task_spec import load_task
from fedemb.synth.task_writer import write_task, writer_images

CONFIGS = {  # name: (foreground level, background level, foreground embedding ε)
    "L1 foreground": ("L1", "L0", 0.0),
    "L2 foreground": ("L2", "L0", 0.0),
    "L0 + DP embedding (ε = 4)": ("L0", "L0", 4.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--invert", type=Path, required=True, help="a `fedemb synth invert` output of the run")
    ap.add_argument("--mnist", type=Path, default=Path("data/mnist"))
    ap.add_argument("--test-writers", type=Path, required=True)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--references", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = time.perf_counter()
    cfg = load_config(args.run / "config.toml")
    from fedemb.synth.from_run import embedding_centre, load_encoder

    net, splits = load_encoder(cfg, args.run / "checkpoints" / "final.pt")
    centre = embedding_centre(cfg, net, splits)
    rows = []
    scratch = None
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(args.writers):
            images, labels, writer = writer_images(args.mnist, args.test_writers, rank, args.references + 1)
            for with_artifacts in (True, False):
                for i, (name, (fg, bg, eps)) in enumerate(CONFIGS.items()):
                    folder = Path(tmp) / f"w{rank}-{i}-{with_artifacts}"
                    task_file = write_task(folder, images, labels, args.references, {"foreground": fg, "background": bg},
                                           {"foreground": eps}, 0.3, rank, f"writer-{writer}", {})
                    task = load_task(task_file, splits.train.image_shape)
                    results = run_custom(cfg.model, net, centre, task, folder / "out", cfg.privacy.accountant,
                                         args.invert if with_artifacts else None, baseline=i == 0)
                    settings = custom_settings(task.synthesis, str(task_file))
                    scratch = replace(settings, model="scratch")
                    with np.load(folder / "out" / "synthetic.npz") as f:
                        scratch_acc = task_accuracy(cfg.model, net, centre, task, f["images"], f["labels"], scratch, rank)
                    row = {"writer": writer, "artifacts": with_artifacts, "config": name,
                           "test_images": results["test_images"], "head": results["customized"]["accuracy"],
                           "scratch": scratch_acc, "epsilon": results["privacy"]["epsilon_per_reference_image"],
                           "mi_fraction": results["privacy"]["objects"]["foreground"]["fraction"],
                           "cos": results["privacy"]["embedding_similarity"]["foreground"]["synthetic_vs_own_reference"],
                           "uploaded_bytes": results["uploaded_bytes"]}
                    rows.append(row)
                    if i == 0:
                        with np.load(folder / "out" / "l0_baseline.npz") as f:
                            base_scratch = task_accuracy(cfg.model, net, centre, task, f["images"], f["labels"],
                                                         scratch, rank)
                        rows.append({**row, "config": "L0 only (nothing uploaded)",
                                     "head": results["l0_baseline"]["accuracy"], "scratch": base_scratch,
                                     "epsilon": 0.0, "mi_fraction": 0.0, "cos": None, "uploaded_bytes": 0})
                    print(json.dumps(rows[-1]), flush=True)
    write_report(args, rows, time.perf_counter() - started)


def write_report(args, rows: list[dict], seconds: float) -> None:
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/custom_synth_eval.py", *sys.argv[1:]])
    writers = sorted({r["writer"] for r in rows})
    lines = [
        "# Customized synthesis on real users (MNIST t10k writers)", "",
        f"Generated by `{command}` ({seconds / 60:.0f} min on this machine).", "",
        f"{len(writers)} NIST writers of MNIST t10k (QMNIST ids {', '.join(map(str, writers))}); each shares "
        f"{args.references} reference per digit and is tested on the rest of their own images "
        f"({sum(r['test_images'] for r in rows if r['config'] == 'L1 foreground' and r['artifacts'])} in all). "
        "Foreground = pixels above 0.3; the background is L0 throughout. `head`: linear head on the frozen "
        "DP-FedEmb encoder (the default specialised model); `scratch`: the encoder's architecture from random "
        "initialisation. Accuracy is the mean over writers (min–max).", "",
    ]
    for with_artifacts in (True, False):
        lines += [("## With the run's released artifacts (DP prototypes and activation statistics of "
                   f"`{args.invert}`: post-processing)" if with_artifacts else
                   "## Without released artifacts (the payload alone)"), "",
                  "| shared | ε per reference image | head accuracy | scratch accuracy | fg pixel MI / H(raw) | "
                  "cos(synthetic, raw fg) | bytes uploaded |", "|---|---|---|---|---|---|---|"]
        for config in ["L0 only (nothing uploaded)", *CONFIGS]:
            group = [r for r in rows if r["artifacts"] == with_artifacts and r["config"] == config]
            if not group:
                continue

            def stat(key, fmt="{:.3f}"):
                values = np.array([r[key] for r in group if r[key] is not None], dtype=float)
                if not len(values):
                    return "–"
                return (fmt.format(values.mean()) + f" ({values.min():.2f}–{values.max():.2f})"
                        if key in ("head", "scratch") else fmt.format(values.mean()))

            lines.append(f"| {config} | {stat('epsilon', '{:.2f}')} | {stat('head')} | {stat('scratch')} | "
                         f"{stat('mi_fraction', '{:.2f}')} | {stat('cos')} | {stat('uploaded_bytes', '{:.0f}')} |")
        lines.append("")
    lines += ["## Per writer", "", "| writer | artifacts | shared | head | scratch |", "|---|---|---|---|---|"]
    lines += [f"| {r['writer']} | {'yes' if r['artifacts'] else 'no'} | {r['config']} | {r['head']:.3f} | "
              f"{r['scratch']:.3f} |" for r in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
