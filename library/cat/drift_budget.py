"""`--cat_drift_budget X`: alpha chosen during training so that the CAT term's running mean stays near X.

The fixed-alpha objective `main + alpha * cat` is the Lagrangian of "learn the concept (minimise
main) subject to E[cat] <= X"; alpha is its multiplier. Dual ascent raises the multiplier while the
constraint is violated and lowers it while there is slack. Here the ascent is taken on log(alpha):

    c_t     = BETA * c_{t-1} + (1 - BETA) * cat_t            (c_1 = cat_1, the running mean)
    alpha  <- alpha * exp(rate * clip((c_t - X) / X, -1, 1))  (kept in ALPHA_RANGE)

Why the log and the relative error: the CAT term's scale differs by orders of magnitude between
models, resolutions and timestep distributions, so an additive step `alpha + eta * (c - X)` needs a
step size tuned for each model; a relative step does not. The clip keeps one step within a factor
exp(rate) either way (at most x1.05 per step by default), so a noisy term cannot swing alpha. Alpha
rises when the running mean is above X and falls when it is below; it is fixed at the target.

`cat_t` is the preservation term alpha multiplies (`StepLosses.preservation`), averaged over the
optimizer step's batches and the processes, so every process holds the same alpha. The state
(alpha and the running mean) is saved with `--save_state` and restored by `--resume`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BETA = 0.9  # the running mean's memory: about the last 10 steps
ALPHA_RANGE = (1e-4, 1e4)


@dataclass
class DriftBudget:
    """The adapted alpha; `update` after every optimizer step."""

    target: float  # X
    rate: float  # eta
    alpha: float  # the current alpha (--cat_weight at the start)
    running: float | None = None  # c_t; None before the first step

    def update(self, preservation: float) -> float:
        """Fold in one optimizer step's CAT term and move alpha; returns the new alpha."""
        self.running = preservation if self.running is None else BETA * self.running + (1 - BETA) * preservation
        error = min(max((self.running - self.target) / self.target, -1.0), 1.0)
        low, high = ALPHA_RANGE
        self.alpha = min(max(self.alpha * math.exp(self.rate * error), low), high)
        return self.alpha

    def state_dict(self) -> dict[str, float | None]:
        return {"alpha": self.alpha, "running": self.running}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.alpha, self.running = float(state["alpha"]), state["running"]
