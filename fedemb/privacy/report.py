"""Reading a run's privacy ledger for people: consecutive releases with the same mechanism and
parameters become one row; each row says its neighbouring relation, and ε is composed per relation
(a ledger that mixes relations has no single ε)."""

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
        signature = (e.stage, e.mechanism, e.neighbouring, e.sampling_rate, e.noise_multiplier, e.attempt)
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
        out.append((first.stage, span, f"{first.mechanism} ({first.neighbouring} neighbours)",
                    f"{first.sampling_rate:g}", _fmt(first.noise_multiplier), sens_text, _fmt(last.epsilon)))
    return out


def summary_lines(ledger: PrivacyLedger) -> list[str]:
    """The whole run's (ε, δ) in one line; for a ledger that mixes neighbouring relations, one line
    per relation and a line saying there is no single (ε, δ)."""
    by_relation = ledger.epsilon_by_relation()
    how = f"{ledger.unit}-level, {ledger.accountant} accountant"
    if len(by_relation) <= 1:
        relation = next(iter(by_relation), "no")
        return [f"(ε, δ) = ({_fmt(ledger.epsilon)}, {ledger.delta:.3g}) for the whole run: {len(ledger.entries)} "
                f"releases, {how}, {relation} neighbours"]
    lines = []
    for relation, eps in by_relation.items():
        own = [e for e in ledger.entries if e.neighbouring == relation]
        stages = ", ".join(dict.fromkeys(e.stage for e in own))
        lines.append(f"(ε, δ) = ({_fmt(eps)}, {ledger.delta:.3g}) under {relation} neighbours: {len(own)} releases "
                     f"({stages}), {how}")
    lines.append("no single (ε, δ) for the whole run: its releases are under different neighbouring relations, "
                 "whose guarantees do not compose into one")
    return lines
