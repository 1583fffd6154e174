"""What a newcomer reads on a first run: fedemb's own notices once each, in its own words, as log lines;
no third-party chatter they cannot act on. The same through `fedemb simulate` on Ray (a subprocess,
its stderr) is checked by tests/test_simulation_integration.py."""

import logging
import subprocess
import sys
import warnings

import pytest

from fedemb.config import load_config
from fedemb.flower_env import silence_third_party_notices
from simulations.client_app import train
from simulations.inprocess import InProcessGrid
from simulations.run import run_federated
from tests.helpers import SMALL_RUN

RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default). To enable this behavior and turn off this error message, set "
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0")


def test_a_seeded_run_says_once_in_a_warning_log_line_that_its_noise_is_predictable(tmp_path, caplog, recwarn):
    cfg = load_config(None, SMALL_RUN + ["run.rounds=1", "run.seed=7"])
    with caplog.at_level(logging.WARNING, logger="fedemb"):
        run_federated(InProcessGrid(train, 2), cfg, tmp_path, show_progress=False)
    notices = [r for r in caplog.records if "seeded for reproduction" in r.getMessage()]
    assert len(notices) == 1
    notice = notices[0]
    assert notice.name == "fedemb" and notice.levelno == logging.WARNING
    assert "\n" not in notice.getMessage()
    assert "run.seed = 7" in notice.getMessage() and "predictable" in notice.getMessage()
    assert "release" in notice.getMessage()
    # not a Python warning, which would print a source file and line
    assert not [w for w in recwarn if "seed" in str(w.message)]


def test_ray_s_accelerator_tip_is_silenced_where_ray_raises_it_and_nothing_else_is():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        silence_third_party_notices()
        warnings.warn_explicit(RAY_TIP, FutureWarning, "worker.py", 1, module="ray._private.worker")
        warnings.warn_explicit("Another change in a future Ray", FutureWarning, "worker.py", 2, module="ray._private.worker")
        warnings.warn_explicit(RAY_TIP, FutureWarning, "elsewhere.py", 3, module="elsewhere")
        warnings.warn_explicit(RAY_TIP, UserWarning, "worker.py", 4, module="ray._private.worker")
    assert [w.lineno for w in shown] == [2, 3, 4]


@pytest.mark.slow
def test_fedemb_simulate_in_process_keeps_flower_s_round_by_round_info_lines_off_the_console(tmp_path):
    """Flower sets its logger to DEBUG when first imported; the engine must quiet it after that import."""
    settings = [a for item in SMALL_RUN + ['simulation.engine="inprocess"'] for a in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "fedemb", "simulate", *settings, "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO" not in proc.stderr and "DP-FedEmb: q=" not in proc.stderr, proc.stderr
