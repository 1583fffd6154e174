"""`fedemb-device`: what the owner of a device runs to take part in a deployment.

    fedemb-device key                                   # a key pair; send node.key.pub to the operator
    fedemb-device data me.npz --images photos/ --size 28x28
    fedemb-device join --superlink 192.0.2.7:9092 --ca ca.crt --data me.npz
    fedemb-device status
    fedemb-device stop

Bad input: one line `error: ...` and exit code 2. A join that fails: one line saying why, exit code 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from fedemb.data.image_files import parse_size
from fedemb.deploy import device_images, device_node
from fedemb.deploy.device_node import DEFAULT_PORT, LOG, PUBLIC_KEY, DeviceFolder
from fedemb.errors import FedembError

app = typer.Typer(help="Take part in a fedemb deployment from this device: its key, its data file, its Flower node.",
                  no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

FolderOpt = Annotated[Optional[Path], typer.Option(
    "--folder", help=f"The device folder (default ${device_node.HOME_VARIABLE} or ~/.fedemb-device).")]
NOT_RUNNING = 3


def one_line_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FedembError as exc:
            fail(str(exc))
    return wrapper


def fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def device_folder(folder: Path | None) -> DeviceFolder:
    return DeviceFolder(folder.expanduser() if folder is not None else device_node.default_folder())


@app.command()
@one_line_errors
def key(folder: FolderOpt = None,
        name: Annotated[Optional[str], typer.Option(help="The device's name (letters, digits, . _ -); "
                                                         "default <host name>-<6 random hex digits>.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace the folder's key.")] = False):
    """Make the device's key pair (node.key, node.key.pub); its public half goes to the server's operator."""
    device = device_folder(folder)
    made = device_node.make_key(device, name, force)
    typer.echo(f"device {made}: key pair in {device.path}")
    typer.echo(f"copy {device.file(PUBLIC_KEY)} to the server; it registers it by the name {made}")


@app.command()
@one_line_errors
def data(out: Annotated[Path, typer.Argument(help="The data file to write (.npz).")],
         images: Annotated[Optional[Path], typer.Option(help="A folder with one subfolder of images per class.")] = None,
         size: Annotated[Optional[str], typer.Option(help="Resize every image to HEIGHTxWIDTH, e.g. 28x28 "
                                                          "(default: keep; all images must then agree).")] = None,
         channels: Annotated[Optional[int], typer.Option(help="1: grayscale (default), 3: RGB.")] = None,
         classes: Annotated[Optional[str], typer.Option(help="Class folder names in label order, e.g. cat,dog "
                                                             "(default: the folders are named 0, 1, ...).")] = None,
         user: Annotated[int, typer.Option(help="The user id this device's examples belong to.")] = 0,
         arrays: Annotated[Optional[Path], typer.Option(help="Instead of --images: an x.npy of images.")] = None,
         labels: Annotated[Optional[Path], typer.Option(help="With --arrays: a y.npy of integer labels.")] = None):
    """Write the device's data file from a folder of labelled images (or from arrays)."""
    if (images is None) == (arrays is None):
        fail("give either --images DIR or --arrays X.npy --labels Y.npy")
    if user < 0:
        fail(f"--user must be a non-negative integer, got {user}")
    device_images.checked_output(out)
    names = device_images.parse_classes(classes) if classes is not None else None
    if arrays is not None:
        if labels is None:
            fail("--arrays needs --labels Y.npy")
        if size is not None or channels is not None or classes is not None:
            fail("--size, --channels and --classes apply to --images only")
        made, counts = device_images.read_arrays(arrays, labels, user)
    else:
        if labels is not None:
            fail("--labels goes with --arrays; with --images the class folders give the labels")
        if channels not in (None, 1, 3):
            fail(f"--channels must be 1 or 3, got {channels}")
        resize = parse_size(size) if size is not None else None
        made, counts = device_images.read_image_folder(
            device_images.ImageFolder(images, resize, channels or 1, names), user)
    device_images.write_device_file(made, out)
    for label, count in counts.items():
        typer.echo(f"class {label}{f' ({names[label]})' if names else ''}: {count} examples")
    typer.echo(f"wrote {out}: x {made.images.shape} {made.images.dtype}, y ({len(made.labels)},), user {user}")


@app.command()
@one_line_errors
def join(superlink: Annotated[str, typer.Option(help="The server's address, HOST:PORT.")],
         ca: Annotated[Path, typer.Option(help="The server's CA certificate (PEM), from its operator.")],
         data: Annotated[Path, typer.Option(help="This device's data file (fedemb-device data).")],
         user: Annotated[Optional[int], typer.Option(help="The user id to train, when the file holds several.")] = None,
         folder: FolderOpt = None,
         port: Annotated[int, typer.Option(help="The node's own local port (one per node on a machine).")] = DEFAULT_PORT,
         wait: Annotated[float, typer.Option(help="Seconds to wait for the server to activate the node.")] = 60.0):
    """Start this device's node and wait until the server activates it; it keeps running afterwards."""
    device = device_folder(folder)
    request = device_node.JoinRequest(device_node.parse_address(superlink), ca.expanduser(), data.expanduser(),
                                      user, port, wait)
    node = device_node.start_node(device, request)
    typer.echo(f"started the node of {device.name()} for {request.superlink}; waiting up to {wait:g} s "
               "for the server to activate it")
    try:
        result = device_node.wait_for_activation(device, request, node)
    except KeyboardInterrupt:
        typer.echo("interrupted: the node was stopped", err=True)
        raise typer.Exit(130) from None
    if result.node_id is None:
        typer.echo(f"not joined: {result.reason} (log {device.file(LOG)})", err=True)
        raise typer.Exit(1)
    typer.echo(f"joined {request.superlink} as {result.name} (node id {result.node_id}); log {device.file(LOG)}")


@app.command()
@one_line_errors
def status(folder: FolderOpt = None):
    """Whether this device's node runs, and where it points; exit code 0 when it runs, 3 when not."""
    device = device_folder(folder)
    state = device_node.status(device)
    settings = state.settings
    data_file = settings.get("data") or "-"
    if settings.get("user") is not None:
        data_file += f" (user {settings['user']})"
    rows = [("device", state.name),
            ("node", f"running (pid {state.pid})" if state.pid is not None else "not running"),
            ("node id", settings.get("node_id") or "-"),
            ("superlink", settings.get("superlink") or "-"),
            ("data", data_file),
            ("log", f"{device.file(LOG)}: {state.last_log_line or '-'}")]
    for label, value in rows:
        typer.echo(f"{label:<10} {value}")
    raise typer.Exit(0 if state.pid is not None else NOT_RUNNING)


@app.command()
@one_line_errors
def stop(folder: FolderOpt = None):
    """Stop this device's node and everything it started; nothing to do when none runs."""
    device = device_folder(folder)
    stopped = device_node.stop(device)
    if stopped is None:
        typer.echo(f"no node runs from {device.path}")
    else:
        owner = device.name() if device.has_key() else device.path
        typer.echo(f"stopped the node of {owner} (pid {stopped}, with everything it started)")


def main() -> None:
    """Like typer's own entry, but a usage error is one `error:` line too, not a box with the usage."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except click.UsageError as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        code = 2
    except click.Abort:
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
