"""Lesson: forward KL covers both modes of a bimodal target; reverse KL picks one.

What is run. The target p is a mixture of two well separated Gaussians,
discretised on a grid (so every quantity is an exact finite sum, computed in
log space with sandbox.infotheory). The model q is a single discretised
Gaussian with a learned mean and log-std, fitted by Adam twice:

- forward KL(p || q) = E_p[log p - log q] punishes q for missing mass where
  p has it: q spreads to cover both modes (moment matching: mean ~ 0, std ~
  the mixture's std), putting mass in the valley between them;
- reverse KL(q || p) = E_q[log q - log p] punishes q for putting mass where
  p has none: q settles on one mode (the one nearer its start) and ignores
  the other.

This is the asymmetry behind "mode covering" maximum likelihood (forward KL
to the data) versus "mode seeking" objectives such as a reverse-KL penalty
to a reference model.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from sandbox.infotheory import kl_divergence, log_softmax
from sandbox.precision import exact
from sandbox.teaching.lessons import LessonResult, label_axes, new_figure, save_figure

NAME = "kl_direction"
TITLE = "KL direction: forward KL covers both modes, reverse KL picks one"
NARRATIVE = """\
Fit one Gaussian q to a two-humped target p (modes at -3 and +3) by gradient descent, once
minimising forward KL(p||q) and once reverse KL(q||p). Forward KL is large wherever p has mass
and q does not, so q stretches over both humps. Reverse KL is large wherever q has mass and p
does not, so q hides inside one hump. We measure how much of q's mass lies near each mode."""

MODES = (-3.0, 3.0)
MODE_STD = 0.7
GRID = np.linspace(-9.0, 9.0, 721)


def fit(direction: str, steps: int, init=(0.5, 0.0)) -> tuple[float, float]:
    """(mean, std) of the Gaussian fitted under `direction` ('forward' or 'reverse')."""
    x = jnp.asarray(GRID, jnp.float32)
    logp = log_softmax(jnp.logaddexp(*[-0.5 * ((x - m) / MODE_STD) ** 2 for m in MODES]))

    def logq(theta):
        mean, log_std = theta
        return log_softmax(-0.5 * ((x - mean) / jnp.exp(log_std)) ** 2)

    def loss(theta):
        return kl_divergence(logp, logq(theta)) if direction == "forward" else kl_divergence(logq(theta), logp)

    tx = optax.adam(0.05)
    theta = jnp.asarray(init, jnp.float32)
    opt = tx.init(theta)

    @exact.jit
    def step(theta, opt):
        g = jax.grad(loss)(theta)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(theta, upd), opt

    for _ in range(steps):
        theta, opt = step(theta, opt)
    return float(theta[0]), float(np.exp(theta[1]))


def density(mean: float, std: float) -> np.ndarray:
    """q on the grid; normalised max-shifted, so a mean far off the grid gives no 0/0."""
    return special.softmax(-0.5 * ((GRID - mean) / std) ** 2)


def target() -> np.ndarray:
    """p on the grid, the mixture formed in log space like the fit's."""
    return special.softmax(np.logaddexp.reduce([-0.5 * ((GRID - m) / MODE_STD) ** 2 for m in MODES], axis=0))


def mode_mass(q: np.ndarray) -> tuple[float, ...]:
    """q's mass within 2 mode-stds of each mode."""
    return tuple(float(q[np.abs(GRID - m) < 2 * MODE_STD].sum()) for m in MODES)


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    out_dir = Path(out_dir)
    steps = 300 if quick else 800
    res = LessonResult(NAME)
    fits = {d: fit(d, steps) for d in ("forward", "reverse")}
    masses = {d: mode_mass(density(*fits[d])) for d in fits}
    fm, rm = masses["forward"], masses["reverse"]
    res.check("forward KL: q centred between the modes (|mean| < 0.5) with >15% of its mass near each",
              f"mean {fits['forward'][0]:+.2f} std {fits['forward'][1]:.2f}; mass near modes "
              f"{fm[0]:.2f} / {fm[1]:.2f}", min(fm) > 0.15 and abs(fits["forward"][0]) < 0.5)
    res.check("reverse KL: q puts >90% near one mode and <1% near the other (picks one)",
              f"mean {fits['reverse'][0]:+.2f} std {fits['reverse'][1]:.2f}; mass near modes "
              f"{rm[0]:.2f} / {rm[1]:.2f}", max(rm) > 0.9 and min(rm) < 0.01)

    fig, (ax,) = new_figure(1)
    ax.fill_between(GRID, target(), color="lightgrey", label="target p (bimodal)")
    for d, ls in (("forward", "-"), ("reverse", "--")):
        ax.plot(GRID, density(*fits[d]), ls, label=f"q fitted by {d} KL")
    label_axes(ax, "x", "probability per grid cell", "forward KL covers both modes, reverse KL picks one")
    res.plots.append(save_figure(fig, out_dir / "kl_direction.png"))
    return res
