"""Opacus's RDP accountant, with RDP orders beyond Opacus's defaults when the best order is the largest.

ε from RDP is a minimum over orders α. Opacus's default orders end at 63; a mechanism that loses little
per step (much noise, a small sampling rate, few steps) has its best order above that, and its ε from
the default orders is loose (Opacus then warns "Optimal order is the largest alpha"). Here the orders
grow in blocks, each doubling the largest order, for as long as the best order is the largest one so
far. The default orders come first and stay, so ε is never larger than with them, and for a mechanism
whose best order is among them it is exactly the same.

The RDP curves are Opacus's (`compute_rdp`, cached per (z, q, block) and linear in steps). The
conversion to (ε, δ) is Balle et al. 2020, Theorem 21, as Opacus applies it, computed here so that an
extreme best order never warns. The orders stop at 16,384, and for q < 1 Opacus's curves are NaN past
about 1,000 (ignored); a best order there means ε of a few hundredths at most (about
2 log(1/δ) / order), where a looser figure is harmless.

`ExtendedOrdersRDPAccountant` is registered with Opacus under `MECHANISM`, so Opacus's own tools
(`get_noise_multiplier`, `PrivacyEngine`) calibrate and report with the same orders.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant, register_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

MECHANISM = "rdp-extended-orders"  # the name of this accountant in Opacus's registry

ORDER_BLOCKS: tuple[tuple[float, ...], ...] = (
    tuple(RDPAccountant.DEFAULT_ALPHAS),
    # (2^b, 2^(b+1)] in 32 even steps: 66, 68, ..., 128, then 132, ..., 256, ..., up to 16,384
    *(tuple(float(a) for a in np.linspace(2.0**b, 2.0 ** (b + 1), 33)[1:]) for b in range(6, 14)),
)


@lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sampling_rate: float, block: int) -> np.ndarray:
    curve = np.asarray(rdp_analysis.compute_rdp(q=sampling_rate, noise_multiplier=noise_multiplier, steps=1,
                                                orders=ORDER_BLOCKS[block]), dtype=float)
    curve.setflags(write=False)  # shared by every caller through the cache
    return curve


def epsilon_at_orders(orders: np.ndarray, rdp: np.ndarray, delta: float) -> np.ndarray:
    """ε(α) for each order: the RDP-to-(ε, δ) conversion of Balle et al. 2020, Theorem 21."""
    return rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)


def privacy_spent(history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(ε, best order) of a composition of sampled-Gaussian mechanisms [(z, q, steps), ...]."""
    if not history:
        return 0.0, math.nan
    orders, rdp = np.empty(0), np.empty(0)
    for block, block_orders in enumerate(ORDER_BLOCKS):
        orders = np.concatenate([orders, block_orders])
        rdp = np.concatenate([rdp, sum(steps * _rdp_of_one_step(z, q, block) for z, q, steps in history)])
        eps = epsilon_at_orders(orders, rdp, delta)
        if np.isnan(eps).all():  # no noise
            return math.inf, math.nan
        best = int(np.nanargmin(eps))
        if best < len(orders) - 1:
            break
    return float(eps[best]), float(orders[best])


class ExtendedOrdersRDPAccountant(RDPAccountant):
    """Opacus's RDPAccountant whose default orders extend as far as the best order needs."""

    def get_privacy_spent(self, *, delta: float, alphas: list[float] | None = None) -> tuple[float, float]:
        if alphas is not None:  # orders chosen by the caller: Opacus's accounting, as asked
            return super().get_privacy_spent(delta=delta, alphas=alphas)
        return privacy_spent(self.history, delta)

    @classmethod
    def mechanism(cls) -> str:
        return MECHANISM


register_accountant(MECHANISM, ExtendedOrdersRDPAccountant, force=True)  # force: a reimport registers it again
