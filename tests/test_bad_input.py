"""Bad input: one clear line naming the problem, a non-zero exit, no traceback, nothing started."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cli

QUICKSTART = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "quickstart.toml"


@pytest.mark.parametrize("override,needle", [
    ("privacy.clip_norm=-1", "privacy.clip_norm must be > 0"),
    ("sampling.rate=1.5", "sampling.rate must be in (0, 1]"),
    ("sampling.rate=0", "sampling.rate must be in (0, 1]"),
    ('model.name="no_such_net"', "model.name 'no_such_net' is not a timm model"),
    ('data.name="imagenet"', "data.name must be one of"),
    ("sampling.users_per_client=5000", "sampling.users_per_client = 5000 is larger than the"),
    ('data.name="idx"', "data.path must be a directory"),
    ('data.name="npz"', "data file not found"),
    ("sampling.bogus=1", "unknown key 'sampling.bogus'"),
    ('run.rounds="ten"', "run.rounds must be an integer"),
    ('client.head_init="zeros"', "client.head_init must be one of random, anchors"),
])
def test_bad_config_values_give_one_line_naming_the_field(override, needle, tmp_path):
    code, out = cli("simulate", "--config", str(QUICKSTART), "--set", override, "--run-dir", str(tmp_path / "r"))
    assert code == 2
    assert needle in " ".join(out.split())
    assert "Traceback" not in out
    assert not (tmp_path / "r").exists()  # nothing written before the input was checked


def test_malformed_toml_is_reported_with_its_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3\n")
    code, out = cli("simulate", "--config", str(bad))
    assert code == 2 and "malformed TOML" in out and "bad.toml" in out and "Traceback" not in out


def test_missing_config_file(tmp_path):
    code, out = cli("simulate", "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "config file not found" in out


def test_corrupt_idx_file_is_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3 + b"xx")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    code, out = cli("simulate", "--config", str(QUICKSTART), "--set", 'data.name="idx"',
                    "--set", f'data.path="{tmp_path}"')
    assert code == 2 and "corrupt IDX file" in out and "train-images-idx3-ubyte" in out


def test_corrupt_gzip_and_npz_files_are_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + bytes(1))
    code, out = cli("simulate", "--config", str(QUICKSTART), "--set", 'data.name="idx"', "--set", f'data.path="{tmp_path}"')
    assert code == 2 and "cannot read IDX file" in out
    npz = tmp_path / "d.npz"
    npz.write_bytes(b"PK\x03\x04garbage")
    code, out = cli("simulate", "--config", str(QUICKSTART), "--set", 'data.name="npz"', "--set", f'data.path="{npz}"')
    assert code == 2 and "cannot read .npz file" in out


def test_privacy_command_rejects_incomplete_flags():
    code, out = cli("privacy", "--sampling-rate", "0.1")
    assert code == 2 and "--rounds" in out and "--delta" in out


@pytest.mark.slow
def test_the_installed_console_script_exits_nonzero_with_one_line():
    """The real process: exit code and stderr as a user sees them."""
    exe = Path(sys.executable).with_name("fedemb")
    proc = subprocess.run([str(exe), "simulate", "--config", str(QUICKSTART), "--set", "privacy.clip_norm=-1"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: privacy.clip_norm must be > 0, got -1.0"]
    assert proc.stdout == ""
