"""The `fedemb` command line: the root app, with every command and group registered here.

The commands live in fedemb/cli/, one module per group; each imports what it needs inside its
functions, so that `fedemb --help` starts without torch, Ray or Flower.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from fedemb.cli import audit, config, data, deploy, experiments, flwr_run, privacy, synth, train
from fedemb.cli.common import err_console

app = typer.Typer(
    help="Train image-embedding models with user-level differential privacy (DP-FedEmb) on Flower.\n\n"
         "Start with:  fedemb simulate --config simulations/configs/quickstart.toml",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

TRAIN, PRIVACY, RESULTS, DEPLOY, DATA = "Train and evaluate", "Privacy", "Experiments and results", "Deploy", "Data and settings"
app.command("simulate", rich_help_panel=TRAIN)(train.simulate)
app.command("flwr-run", rich_help_panel=TRAIN)(flwr_run.flwr_run)
app.command("pretrain", rich_help_panel=TRAIN)(train.pretrain)
app.command("centralized", rich_help_panel=TRAIN)(train.centralized)
app.command("evaluate", rich_help_panel=TRAIN)(train.evaluate)
app.add_typer(privacy.privacy_app, name="privacy", rich_help_panel=PRIVACY)
app.command("audit", rich_help_panel=PRIVACY)(audit.audit)
app.add_typer(synth.synth_app, name="synth", rich_help_panel=PRIVACY)
app.add_typer(experiments.experiments_app, name="experiments", rich_help_panel=RESULTS)
app.command("report", rich_help_panel=RESULTS)(experiments.report)
app.add_typer(deploy.deploy_app, name="deploy", rich_help_panel=DEPLOY)
app.add_typer(data.data_app, name="data", rich_help_panel=DATA)
app.add_typer(config.config_app, name="config", rich_help_panel=DATA)


# A device install (the base dependencies) lacks what the server-side commands import
FULL_INSTALL_HINT = 'this command needs the full install (pip install "fedemb[all]" / scripts/setup.sh)'
OWN_PACKAGES = ("fedemb", "strategies", "simulations")


def main() -> None:
    import logging

    from fedemb.flower_env import offline_flower_environment

    # fedemb's own log lines (such as a seeded run's notice) once each, plain: "WARNING: message"; not
    # through the root logger, which importing Opacus configures with timestamps
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("fedemb").addHandler(handler)
    logging.getLogger("fedemb").propagate = False
    offline_flower_environment()
    try:
        app()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OWN_PACKAGES:
            raise
        err_console.print(f"[bold red]error:[/] {escape(FULL_INSTALL_HINT)}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
