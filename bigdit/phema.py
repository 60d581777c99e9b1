"""Power-function EMA and post-hoc EMA reconstruction (Karras et al., EDM2, arXiv 2312.02696, Sec. 3, App. C),
as pure functions of numbers: no tensors of the model, no I/O.

A power-function EMA with exponent ``gamma`` averages the weights seen up to time ``t`` with the profile
``p_t(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``[0, t]``; its width relative to ``t`` is
``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``. Updated once per optimizer step,
``ema <- beta ema + (1 - beta) w`` with ``beta = (1 - 1/t)**(gamma + 1)`` after the ``t``-th step. The profile
is scale-free, so the time unit (steps or images) does not matter while the batch is constant; we count steps.

Post-hoc reconstruction: snapshots of such EMAs at times ``t_i`` with exponents ``gamma_i`` are combined as
``sum_i x_i snapshot_i``; ``x`` minimises the L2 distance between ``sum_i x_i p_i`` and the profile of the wanted
``(t, sigma_rel)``, i.e. solves ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``.
"""

from __future__ import annotations

import numpy as np

#: the largest sigma_rel of a non-negative exponent (gamma = 0: the uniform average over all of training)
MAX_SIGMA_REL = float(np.sqrt(1 / 12))


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent ``gamma``."""
    g = float(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel`` (in ``(0, 1/sqrt(12))``).

    ``sigma_rel**-2 = (gamma + 2)**2 (gamma + 3) / (gamma + 1)`` is a cubic in gamma,
    ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0`` with ``s = sigma_rel**-2``; its largest real root.
    """
    s = float(sigma_rel)
    if not 0.0 < s < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {MAX_SIGMA_REL:.4f}) (1/sqrt(12): a plain average "
                         f"of all of training); EDM2 uses 0.05 and 0.10")
    inv = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, steps_done: int) -> float:
    """The decay of the update after the ``steps_done``-th step (1-based): ``(1 - 1/t)**(gamma + 1)``; 0 at the
    first step, so the EMA starts as the weights after it."""
    if steps_done < 1:
        raise ValueError(f"steps_done={steps_done}: the power EMA is updated after the first step and later")
    return float((1.0 - 1.0 / steps_done) ** (gamma + 1.0))


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """``<p_a, p_b> = integral of p_a p_b`` of two power-function profiles (broadcasting arrays):
    ``(ga + 1)(gb + 1) / (ga + gb + 1) * min(ta, tb)**(ga + gb + 1) / (ta**(ga + 1) tb**(gb + 1))``,
    evaluated through the ratio of the two times so that large times do not overflow."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    if np.any(t_a <= 0) or np.any(t_b <= 0):
        raise ValueError("profile times must be positive")
    a_first = t_a <= t_b
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)
    power = np.where(a_first, g_b, g_a)
    longer = np.maximum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio ** power / longer


def solve_coefficients(times, gammas, target_time: float, target_gamma: float) -> np.ndarray:
    """Coefficients ``x`` (one per snapshot) whose combination of the snapshot profiles ``(times[i], gammas[i])``
    is the least-squares closest to the profile ``(target_time, target_gamma)``; normalised to sum to 1 (the
    combined profile integrates to 1: a weighted average of weights, whatever the rounding of the solve)."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if t.shape != g.shape or t.size == 0:
        raise ValueError(f"need one gamma per snapshot time and at least one snapshot, got {t.size} times and "
                         f"{g.size} gammas")
    gram = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_inner_product(t, g, float(target_time), float(target_gamma))
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return x / x.sum()

