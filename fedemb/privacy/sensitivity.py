"""L2 sensitivity of the round's clipped sum to adding or removing one user, in units of C.

- k = 1 (each sampled user is its own virtual client), Poisson sampling: the user's clipped update is
  added or removed: sensitivity C.
- k > 1, Poisson sampling: the user's virtual client exists with or without them (its other members
  still train), so its clipped update moves from one point of the C-ball to another: sensitivity 2C.
- Fixed-size sampling: adding a user can also displace the last user that was sampled, changing a
  second virtual client: twice the Poisson figure.

The accountant is told z_acc = noise std / sensitivity, so ε is right for whichever case applies.
"""

from __future__ import annotations


def sensitivity_in_clip_norms(users_per_client: int, sampling_method: str = "poisson") -> float:
    per_client = 1.0 if users_per_client == 1 else 2.0
    return per_client * (2.0 if sampling_method == "fixed" else 1.0)


def accounting_noise_multiplier(noise_multiplier: float, users_per_client: int,
                                sampling_method: str = "poisson") -> float:
    """The noise multiplier the accountant sees: (z * C) / sensitivity."""
    return noise_multiplier / sensitivity_in_clip_norms(users_per_client, sampling_method)


def noise_multiplier_for(accounting_z: float, users_per_client: int, sampling_method: str = "poisson") -> float:
    """Inverse of accounting_noise_multiplier: the z (std / C) to configure."""
    return accounting_z * sensitivity_in_clip_norms(users_per_client, sampling_method)
