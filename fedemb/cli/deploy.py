"""`fedemb deploy`: the server side of a Flower deployment, or all of it on this machine (loopback).

The devices' side is `fedemb-device` (key, data, join, status, stop): docs/deployment.md. Every command
is offline-safe (telemetry off, no runtime dependency installation). The `flwr` CLI's connection is
written to FOLDER/flwr-home/config.toml under the name "fedemb":
    FLWR_HOME=runs/deploy/flwr-home flwr run . fedemb --stream
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedemb.cli.common import ConfigOpt, SetOpt, app_root, friendly_errors, load_run_config
from fedemb.errors import FedembError

deploy_app = typer.Typer(help="Deploy to real devices: the server's side (SuperLink, keys, runs), or all of it on this machine.",
                         no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
Folder = Annotated[Path, typer.Argument(help="The deployment folder: certs/, keys/, logs/, pids/, flwr-home/.")]
Port = Annotated[int, typer.Option(help="The SuperLink's port.")]
DEPLOY_CONFIG = Path("simulations/configs/deploy.toml")


@deploy_app.command()
@friendly_errors
def shards(out: Annotated[Path, typer.Argument(help="Where the device files go (and shards.json, their manifest).")],
           config: ConfigOpt = None, overrides: SetOpt = None,
           devices: Annotated[int, typer.Option(help="How many training users (the first N); 0: all.")] = 0,
           one_file: Annotated[bool, typer.Option(help="All users in one users.npz (devices then need user=ID).")] = False):
    """Give each device its own data: one .npz per training user of a config (for tests and demos of a
    deployment; real devices hold their own data)."""
    from fedemb.deploy.shards import write_shards

    cfg = load_run_config(config or app_root() / DEPLOY_CONFIG, overrides)
    manifest = write_shards(cfg, out, devices, one_file)
    typer.echo(f"{len(manifest)} devices' data in {out} ({sum(m['examples'] for m in manifest)} examples)")


@deploy_app.command()
@friendly_errors
def credentials(folder: Folder, hosts: Annotated[str, typer.Option(help="Comma-separated names/IPs the devices dial.")] = "127.0.0.1,localhost",
                days: int = 365):
    """The server's TLS material: a CA and the SuperLink's certificate for --hosts.

    The CA's key stays here. Devices get only certs/ca.crt; they make their own keys (`fedemb-device key`)."""
    from fedemb.deploy.credentials import make_server_credentials

    creds = make_server_credentials(folder / "certs", [h.strip() for h in hosts.split(",") if h.strip()], days)
    typer.echo(f"CA {creds.ca_cert} (give this file to each device); SuperLink certificate {creds.server_cert} "
               f"for {hosts}")


@deploy_app.command()
@friendly_errors
def superlink(folder: Folder, port: Port = 9092,
              host: Annotated[str, typer.Option(help="The address devices and the flwr CLI dial (in the certificate).")] = "127.0.0.1",
              bind: Annotated[str, typer.Option(help="The address to listen on (default: --host; 0.0.0.0: every interface).")] = ""):
    """Start the SuperLink with TLS and SuperNode authentication.

    Waits until it answers at HOST:PORT."""
    from fedemb.deploy.processes import Deployment

    deployment = Deployment(folder, port, host, bind)
    pid = deployment.start_superlink(authenticate_nodes=True)
    typer.echo(f"SuperLink pid {pid} listening on {deployment.listen_address}; devices dial {deployment.address} "
               f"with {folder / 'certs' / 'ca.crt'} (log {folder / 'logs' / 'superlink.log'})")
    for line in deployment.listening():
        typer.echo(f"  {line}")


@deploy_app.command()
@friendly_errors
def register(folder: Folder,
             keys: Annotated[list[Path], typer.Argument(help="Devices' public keys (NAME.pub from `fedemb-device key`).")],
             name: Annotated[str, typer.Option(help="Register a single key under this name instead of its own.")] = ""):
    """Register devices' public keys by name with the running SuperLink.

    Only registered keys may join."""
    from fedemb.deploy.processes import Deployment

    deployment = Deployment.open(folder)
    if name and len(keys) != 1:
        raise FedembError("--name names a single key")
    for key in keys:
        registered, node_id, before = deployment.register_device(key, name or None)
        typer.echo(f"{registered}: node id {node_id}" + (" (registered before)" if before else ""))


@deploy_app.command()
@friendly_errors
def run(folder: Folder,
        config: Annotated[Path, typer.Option(help="The fedemb config, relative to the app (the fedemb checkout).")] = DEPLOY_CONFIG,
        overrides: Annotated[str, typer.Option(help='"section.key=value ..." applied to the config.')] = "",
        run_dir: Annotated[Path | None, typer.Option(help="Where results go (default FOLDER/run-<time>).")] = None,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 3600.0,
        events: Annotated[bool, typer.Option(help="Show the run's server-private events (whom it waits for, "
                                                  "rejected replies) with device names, marked [server-private].")] = True):
    """Submit `flwr run . fedemb` with this config and wait for its final status.

    Waits for the SuperLink's final status of the run, not `--stream`'s exit code; exit 1 when the run
    did not complete."""
    from fedemb.deploy.processes import Deployment

    raise typer.Exit(submit_and_wait(Deployment.open(folder), config, overrides, run_dir, timeout, events))


def submit_and_wait(deployment, config: Path, overrides: str, run_dir: Path | None, timeout: float,
                    events: bool = True) -> int:
    """Submit the run, show its server-private events with device names, print its outcome; the exit code."""
    import json
    import time

    from fedemb.deploy.registry import NodeRegistry
    from fedemb.deploy.run_events import EventTail

    run_dir = (run_dir or deployment.folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    tail = EventTail(run_dir, NodeRegistry(deployment.path("keys")).names_by_node_id())

    def show_events():
        for line in tail.new_lines():
            typer.echo(line)
    run_id = deployment.submit_run(app_root(), {"config-file": str(config), "overrides": overrides,
                                                "run-dir": str(run_dir)})
    typer.echo(f"run {run_id} submitted; results will be in {run_dir}")
    status = deployment.wait_for_run(run_id, timeout, run_dir / "results.json", show_events if events else None)
    if events:
        show_events()
    results = run_dir / "results.json"
    if status != "finished:completed" or not results.is_file():
        typer.echo(f"error: run {run_id} ended {status}; its log:\n{deployment.run_log(run_id)[-3000:]}", err=True)
        return 1
    summary = json.loads(results.read_text())
    epsilon = float(summary["privacy"]["epsilon"])  # "inf" without noise
    final = summary.get("final") or {}
    recall = f", recall@1 {final['recall_at_1']:.3f}" if "recall_at_1" in final else ""
    typer.echo(f"run {run_id} {status}: {summary['rounds_completed']} rounds ({summary['stop_reason']}){recall}, "
               f"epsilon {epsilon:.3g} at delta {summary['privacy']['delta']:g} (unit: {summary['privacy']['unit']})")
    return 0


@deploy_app.command()
def loopback(folder: Folder,
             devices: Annotated[int, typer.Option(help="Devices to start, each holding one user's data.")] = 3,
             config: Annotated[Path, typer.Option(help="The fedemb config (its [data] gives the users), relative to the app.")] = DEPLOY_CONFIG,
             overrides: str = "", port: Port = 9092, timeout: float = 3600.0):
    """docs/deployment.md on this machine, in one command.

    Credentials, the SuperLink, one device per user (its own folder, key, data file and join, as
    `fedemb-device` does them), the run, and every process stopped."""
    from fedemb.config import load_config
    from fedemb.deploy.credentials import make_server_credentials
    from fedemb.deploy.device_node import (PUBLIC_KEY, DeviceFolder, JoinRequest, make_key, parse_address,
                                           start_node, wait_for_activation)
    from fedemb.deploy.device_node import stop as stop_device
    from fedemb.deploy.processes import Deployment, free_port
    from fedemb.deploy.shards import write_shards

    deployment = Deployment(folder, port)
    device_folders = [DeviceFolder(folder / "devices" / f"node{i}") for i in range(1, devices + 1)]
    try:
        make_server_credentials(folder / "certs", ["127.0.0.1", "localhost"])
        shards = write_shards(load_config(app_root() / config, []), folder / "shards", devices)
        deployment.start_superlink(authenticate_nodes=True)
        for device, shard in zip(device_folders, shards):
            name = device.name() if device.has_key() else make_key(device, device.path.name, force=False)
            deployment.register_device(device.file(PUBLIC_KEY))
            request = JoinRequest(parse_address(deployment.address), folder / "certs" / "ca.crt", Path(shard["file"]),
                                  port=free_port())
            joined = wait_for_activation(device, request, start_node(device, request))
            if joined.node_id is None:
                raise FedembError(f"{name} did not join: {joined.reason}")
            typer.echo(f"{name}: node id {joined.node_id}, user {shard['user']} ({shard['examples']} examples)")
        overrides = f"deployment.devices={devices} deployment.min_devices={devices} {overrides}".strip()
        code = submit_and_wait(deployment, config, overrides, None, timeout)
    except FedembError as exc:
        typer.echo(f"error: {exc}", err=True)
        code = 2
    finally:
        for device in device_folders:
            stop_device(device)
        deployment.stop_all()
    raise typer.Exit(code)


@deploy_app.command()
@friendly_errors
def status(folder: Folder):
    """The folder's processes, and every registered device by name with what the SuperLink says of it."""
    from fedemb.deploy.processes import Deployment
    from fedemb.deploy.registry import NodeRegistry

    deployment = Deployment.open(folder)
    pids = sorted(p.stem for p in (folder / "pids").glob("*.pid")) if (folder / "pids").is_dir() else []
    for name in pids:
        typer.echo(f"{name}: pid {deployment.pid(name)} {'running' if deployment.alive(name) else 'not running'}")
    names = NodeRegistry(folder / "keys").names_by_node_id()
    if not deployment.alive("superlink"):
        for node_id, name in sorted(names.items(), key=lambda kv: kv[1]):
            typer.echo(f"  {name}: node id {node_id} (SuperLink not running)")
        return
    for node in sorted(deployment.supernodes(), key=lambda n: names.get(int(n["node-id"]), "~")):
        node_id = int(node["node-id"])
        since = f" since {node['online-at']}" if node.get("status") == "online" else ""
        typer.echo(f"  {names.get(node_id, '(unnamed)')}: node id {node_id}, {node.get('status')}{since}")


@deploy_app.command()
@friendly_errors
def stop(folder: Folder):
    """Stop every process the folder started: SuperNodes, then the SuperLink, each with its process group."""
    from fedemb.deploy.processes import Deployment

    Deployment(folder).stop_all()
    typer.echo("stopped")
