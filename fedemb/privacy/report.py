"""Reading a run's privacy ledger for people: consecutive releases with the same mechanism and
parameters become one row."""

from __future__ import annotations

import math
from pathlib import Path

from fedemb.errors import FedembError
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.run_dir import LEDGER_FILE


def load_ledger(run_dir: Path) -> PrivacyLedger:
    path = Path(run_dir) / LEDGER_FILE
    if not path.is_file():
        raise FedembError(f"no privacy ledger in {run_dir} (expected {LEDGER_FILE})")
    try:
        return PrivacyLedger.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise FedembError(f"{path} is not a readable privacy ledger: {exc}") from None


def _fmt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4g}"


def ledger_rows(ledger: PrivacyLedger) -> list[tuple[str, ...]]:
    rows: list[list] = []
    for e in ledger.entries:
        signature = (e.stage, e.mechanism, e.sampling_rate, e.noise_multiplier, e.attempt)
        if rows and rows[-1][0] == signature:
            rows[-1][2] = e
        else:
            rows.append([signature, e, e])
    out = []
    for _, first, last in rows:
        span = first.release if first is last else f"{first.release} – {last.release.split()[-1]}"
        if first.attempt:
            span += f" (attempt {first.attempt + 1})"
        sens = sorted({e.sensitivity for e in ledger.entries[ledger.entries.index(first):ledger.entries.index(last) + 1]})
        sens_text = f"{sens[0]:.4g}" if len(sens) == 1 else f"{sens[0]:.4g}–{sens[-1]:.4g}"
        out.append((first.stage, span, first.mechanism, f"{first.sampling_rate:g}", _fmt(first.noise_multiplier),
                    sens_text, _fmt(last.epsilon)))
    return out
