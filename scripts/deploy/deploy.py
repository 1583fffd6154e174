"""A Flower deployment on this machine (loopback) or as the SuperLink side of several machines.

    .venv/bin/python scripts/deploy/deploy.py credentials runs/deploy --hosts 127.0.0.1,localhost --nodes 3
    .venv/bin/python scripts/deploy/deploy.py superlink runs/deploy --port 9092     # TLS + node authentication
    .venv/bin/python scripts/deploy/deploy.py register runs/deploy node1 node2 node3
    .venv/bin/python scripts/deploy/deploy.py supernode runs/deploy node1 --port 9094 --node-config "user=1"
    .venv/bin/python scripts/deploy/deploy.py run runs/deploy --config simulations/configs/deploy.toml
    .venv/bin/python scripts/deploy/deploy.py status runs/deploy
    .venv/bin/python scripts/deploy/deploy.py stop runs/deploy                      # every process, by PID
    .venv/bin/python scripts/deploy/deploy.py loopback runs/loopback --devices 3    # all of it on this machine

Every command is offline-safe (telemetry off, no runtime dependency installation). The `flwr` CLI's
connection is written to RUN/flwr-home/config.toml under the name "fedemb":
    FLWR_HOME=runs/deploy/flwr-home flwr run . fedemb --stream
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fedemb.deploy.credentials import make_node_key, make_server_credentials  # noqa: E402
from fedemb.deploy.processes import Deployment  # noqa: E402
from fedemb.errors import FedembError  # noqa: E402

app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
Folder = Annotated[Path, typer.Argument(help="The deployment folder: certs/, keys/, logs/, pids/, flwr-home/.")]
Port = Annotated[int, typer.Option(help="The SuperLink's port.")]


def fail(exc: FedembError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.command()
def credentials(folder: Folder, hosts: Annotated[str, typer.Option(help="Comma-separated names/IPs the nodes dial.")] = "127.0.0.1,localhost",
                nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make (node1..nodeN).")] = 0,
                days: int = 365):
    """A CA, the SuperLink's certificate for --hosts, and SuperNode key pairs."""
    try:
        creds = make_server_credentials(folder / "certs", [h.strip() for h in hosts.split(",") if h.strip()], days)
        for i in range(1, nodes + 1):
            make_node_key(folder / "keys", f"node{i}")
    except FedembError as exc:
        fail(exc)
    typer.echo(f"CA {creds.ca_cert}; SuperLink certificate {creds.server_cert}; {nodes} node keys in {folder / 'keys'}")


@app.command()
def superlink(folder: Folder, port: Port = 9092,
              host: Annotated[str, typer.Option(help="The address the CLI and nodes use to reach it.")] = "127.0.0.1"):
    """Start the SuperLink with TLS and SuperNode authentication; waits until its port is open."""
    try:
        pid = Deployment(folder, port, host).start_superlink(authenticate_nodes=True)
    except FedembError as exc:
        fail(exc)
    typer.echo(f"SuperLink pid {pid} on {host}:{port} (log {folder / 'logs' / 'superlink.log'})")


@app.command()
def register(folder: Folder, names: Annotated[list[str], typer.Argument(help="Key names under keys/.")],
             port: Port = 9092, host: str = "127.0.0.1"):
    """Register SuperNode public keys with the running SuperLink."""
    deployment = Deployment(folder, port, host)
    for name in names:
        try:
            node_id = deployment.register(folder / "keys" / f"{name}.pub", name)
        except FedembError as exc:
            fail(exc)
        typer.echo(f"{name}: node id {node_id}")


@app.command()
def supernode(folder: Folder, name: str,
              port: Annotated[int, typer.Option(help="This SuperNode's own local port (one per node on a machine).")] = 9094,
              superlink_port: Annotated[int, typer.Option(help="The SuperLink's port.")] = 9092,
              superlink_host: str = "127.0.0.1",
              node_config: Annotated[str, typer.Option(help='The node config, e.g. "data-path=\'shard.npz\' user=3".')] = ""):
    """Start a SuperNode with its private key keys/NAME."""
    try:
        pid = Deployment(folder, superlink_port, superlink_host).start_supernode(
            name, folder / "keys" / name, port, node_config)
    except FedembError as exc:
        fail(exc)
    typer.echo(f"{name} pid {pid} (log {folder / 'logs' / f'{name}.log'})")


@app.command()
def run(folder: Folder,
        config: Annotated[Path, typer.Option(help="The fedemb config, relative to the app (this repository).")] = Path("simulations/configs/deploy.toml"),
        overrides: Annotated[str, typer.Option(help='"section.key=value ..." applied to the config.')] = "",
        run_dir: Annotated[Path | None, typer.Option(help="Where results go (default FOLDER/run-<time>).")] = None,
        port: Port = 9092, host: str = "127.0.0.1",
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 3600.0):
    """`flwr run . fedemb` with this config; waits for the run's final status (not `--stream`'s exit code)."""
    raise typer.Exit(submit_and_wait(Deployment(folder, port, host), config, overrides, run_dir, timeout))


def submit_and_wait(deployment: Deployment, config: Path, overrides: str, run_dir: Path | None, timeout: float) -> int:
    run_dir = (run_dir or deployment.folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    try:
        run_id = deployment.submit_run(REPO, {"config-file": str(config), "overrides": overrides, "run-dir": str(run_dir)})
        typer.echo(f"run {run_id} submitted; results will be in {run_dir}")
        status = deployment.wait_for_run(run_id, timeout, run_dir / "results.json")
    except FedembError as exc:
        fail(exc)
    results = run_dir / "results.json"
    if not status.startswith("finished:completed") or not results.is_file():
        typer.echo(f"error: run {run_id} ended {status}; its log:\n{deployment.run_log(run_id)[-3000:]}", err=True)
        return 1
    summary = json.loads(results.read_text())
    epsilon = summary["privacy"]["epsilon"]  # "inf" without noise
    typer.echo(f"run {run_id} {status}: {summary['rounds_completed']} rounds, recall@1 "
               f"{summary['final']['recall_at_1']:.3f}, epsilon {float(epsilon):.3g} "
               f"(unit: {summary['privacy']['unit']}); totals {summary['totals']}")
    return 0


@app.command()
def loopback(folder: Folder,
             devices: Annotated[int, typer.Option(help="SuperNodes to start, each holding one user's data.")] = 3,
             config: Annotated[Path, typer.Option(help="The fedemb config (its [data] gives the users).")] = Path("simulations/configs/deploy.toml"),
             overrides: str = "", port: Port = 9092, timeout: float = 3600.0):
    """Everything on this machine: credentials, SuperLink (TLS + node authentication), one SuperNode per
    device with its own data file, the run, and then every process stopped."""
    deployment = Deployment(folder, port)
    try:
        make_server_credentials(folder / "certs", ["127.0.0.1", "localhost"])
        subprocess.run([sys.executable, str(REPO / "scripts" / "deploy" / "make_shards.py"), str(REPO / config),
                        str(folder / "shards"), "--devices", str(devices)], check=True)
        shards = json.loads((folder / "shards" / "shards.json").read_text())
        deployment.start_superlink(authenticate_nodes=True)
        for i, shard in enumerate(shards, start=1):
            private, public = make_node_key(folder / "keys", f"node{i}")
            node_id = deployment.register(public, f"node{i}")
            deployment.start_supernode(f"node{i}", private, port + 10 + i, f"data-path='{shard['file']}'")
            typer.echo(f"node{i}: node id {node_id}, user {shard['user']} ({shard['examples']} examples)")
        overrides = f"deployment.devices={devices} deployment.min_devices={devices} {overrides}".strip()
        code = submit_and_wait(deployment, config, overrides, None, timeout)
    except (FedembError, subprocess.CalledProcessError) as exc:
        typer.echo(f"error: {exc}", err=True)
        code = 2
    finally:
        deployment.stop_all()
    raise typer.Exit(code)


@app.command()
def status(folder: Folder, port: Port = 9092, host: str = "127.0.0.1"):
    """Which processes of the folder run, and the SuperNodes the SuperLink knows."""
    deployment = Deployment(folder, port, host)
    pids = sorted(p.stem for p in (folder / "pids").glob("*.pid")) if (folder / "pids").is_dir() else []
    for name in pids:
        typer.echo(f"{name}: pid {deployment.pid(name)} {'running' if deployment.alive(name) else 'not running'}")
    if "superlink" in pids and deployment.alive("superlink"):
        for node in deployment.supernodes():
            typer.echo(f"  {node}")


@app.command()
def stop(folder: Folder):
    """Stop every process the folder started: SuperNodes, then the SuperLink, each with its process group."""
    Deployment(folder).stop_all()
    typer.echo("stopped")


if __name__ == "__main__":
    app()
