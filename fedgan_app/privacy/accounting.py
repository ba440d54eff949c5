"""The privacy budget of a differentially private run: Flower's RDP accountant.

Each round that releases a model is one sampled Gaussian mechanism: m of the
N clients, drawn without replacement, each client's update clipped to the
norm C, noise of standard deviation z x C added to their sum (z x C / m on
the average). `PrivacyBudget` counts the released rounds and composes them,
as `GaussianPrivacyEvent`s, in Flower's `RdpAccountant` (Google's
``dp-accounting`` underneath) to report epsilon at the run's delta.

The accounting model is sampling without replacement with the replace-one
neighbouring relation: the pair ``dp-accounting`` analyses for a fixed-size
sample, which is how `fedgan_app.federation.sampling` draws the clients
(under DP from a secret seed, see there). Flower's fixed-clipping wrappers
accept an accountant only without amplification by sampling; this one is
kept beside them (`fedgan_app.federation.private`), so the sampling rate
q = m / N counts.

The accountant's ledger is a checkpoint value (JSON text), so a resumed run
goes on spending the same budget; a checkpoint of another accounting setup
(another delta, population or sampling) is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)

from fedgan_app.config import RunConfig
from fedgan_app.outputs.checkpoint import Checkpoint
from fedgan_app.settings import ConfigError

STATE_KEY = "privacy-accountant"  # the checkpoint's strategy_state key of the ledger


class BudgetError(ValueError):
    """The privacy budget cannot be set up or restored as asked."""


@dataclass(frozen=True)
class Release:
    """One round's private release: m of N clients, noise multiplier z."""

    noise_multiplier: float
    sample_size: int
    population: int

    def event(self) -> GaussianPrivacyEvent:
        """The release as Flower's privacy event."""
        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier,
                                    sample_size=self.sample_size,
                                    population_size=self.population)


class PrivacyBudget:
    """Epsilon spent so far by a run's released rounds, at the run's delta.

    Parameters
    ----------
    cfg : RunConfig
        The run's DP settings (noise multiplier, delta, target epsilon).
    population : int
        N: the clients the rounds sample from (the run's partitions).
    sample_size : int
        m: the clients each round trains.

    Notes
    -----
    With ``dp-noise-multiplier`` 0 nothing is private: no accountant is made
    and `epsilon` is infinite.

    """

    def __init__(self, cfg: RunConfig, population: int, sample_size: int) -> None:
        if not 1 <= sample_size <= population:
            raise BudgetError(f"a round samples {sample_size} of {population} clients: "
                              "it needs 1 <= m <= N")
        self.delta = cfg.dp_delta
        self.target = cfg.dp_target_epsilon or None
        self.release = Release(cfg.dp_noise_multiplier, sample_size, population)
        self.releases = 0
        self._epsilon: float | None = None  # epsilon() of the releases so far, once asked
        self._config = None
        self._cached: tuple[int, RdpAccountant] | None = None  # the last one composed
        if cfg.dp_noise_multiplier > 0:
            self._config = PrivacyConfig(
                target_delta=cfg.dp_delta, population_size=population,
                neighboring_relation=NeighboringRelation.REPLACE_ONE,
                sampling_method=SamplingMethod.WITHOUT_REPLACEMENT)

    @property
    def sampling_rate(self) -> float:
        """The sampling rate q = m / N."""
        return self.release.sample_size / self.release.population

    def epsilon(self) -> float:
        """Epsilon at the run's delta after the releases so far (inf without noise)."""
        if self._epsilon is None:
            self._epsilon = self._epsilon_of(self.releases)
        return self._epsilon

    def epsilon_after(self, more: int) -> float:
        """Epsilon once `more` further rounds are released (nothing is spent)."""
        return self._epsilon_of(self.releases + max(0, more))

    def rounds_within(self, limit: float, wanted: int) -> int:
        """The most of `wanted` further releases that keep epsilon <= `limit`."""
        low, high = 0, wanted
        while low < high:  # epsilon grows with every release: bisect
            mid = (low + high + 1) // 2
            if self.epsilon_after(mid) <= limit:
                low = mid
            else:
                high = mid - 1
        return low

    def spend(self) -> None:
        """Count one released round."""
        self.releases += 1
        self._epsilon = None

    def _accountant(self, releases: int) -> RdpAccountant:
        """Flower's accountant holding `releases` of the run's identical releases.

        Every release of a run is the same event, and RDP composes by adding:
        one composition with a count costs what one release does (a fraction
        of a second in dp-accounting), where a ledger of single releases would
        cost that for each, at every resume.
        """
        assert self._config is not None
        if self._cached is not None and self._cached[0] == releases:
            return self._cached[1]
        accountant = RdpAccountant(self._config)
        if releases:
            accountant.compose(self.release.event(), releases)
        self._cached = (releases, accountant)
        return accountant

    def _epsilon_of(self, releases: int) -> float:
        if not releases:
            return 0.0
        if self._config is None:
            return math.inf
        return float(self._accountant(releases).get_epsilon(self.delta))

    def state(self) -> dict[str, Any]:
        """The ledger as a checkpoint value."""
        ledger = self._accountant(self.releases).state_dict() if self._config else None
        return {STATE_KEY: json.dumps({"releases": self.releases, "ledger": ledger,
                                       "release": vars(self.release)}, sort_keys=True)}

    def load(self, state: Mapping[str, Any], source: Path | str) -> None:
        """Go on from a checkpoint's ledger; BudgetError when it does not fit this run.

        A checkpoint of a run without DP holds no ledger: its rounds spent no
        budget that could be accounted, so resuming it with DP is refused.
        """
        text = state.get(STATE_KEY)
        if text is None:
            raise BudgetError(
                f"checkpoint {source} has no privacy ledger: its rounds ran without "
                "differential privacy, so no epsilon can be stated for a run that "
                "continues it; start a fresh run with dp")
        try:
            saved = json.loads(text)
            release = Release(**saved["release"])
            releases = int(saved["releases"])
        except (TypeError, KeyError, ValueError) as exc:
            raise BudgetError(f"checkpoint {source}: its privacy ledger cannot be read "
                              f"({exc})") from exc
        if release != self.release:
            raise BudgetError(
                f"checkpoint {source} spent its budget on rounds of {release.sample_size} of "
                f"{release.population} clients with noise multiplier "
                f"{release.noise_multiplier:g}; this run's rounds are "
                f"{self.release.sample_size} of {self.release.population} with "
                f"{self.release.noise_multiplier:g}: the ledger would not add up")
        if self._config is not None:
            restored = RdpAccountant(self._config)
            try:
                restored.load_state_dict(saved["ledger"])
            except (TypeError, KeyError, ValueError) as exc:
                raise BudgetError(f"checkpoint {source}: its privacy ledger does not fit "
                                  f"this run's accounting (delta {self.delta:g}): {exc}") from exc
            if restored.num_releases != releases:
                raise BudgetError(f"checkpoint {source}: its privacy ledger counts "
                                  f"{restored.num_releases} releases, not {releases}")
        self.releases = releases
        self._epsilon = None


def budget_line(budget: PrivacyBudget) -> str:
    """A log line of what the budget is: the mechanism, the rate, epsilon so far."""
    release = budget.release
    return (f"differential privacy: {release.sample_size} of {release.population} clients "
            f"per round (q = {budget.sampling_rate:.3g}), noise multiplier "
            f"{release.noise_multiplier:g}; epsilon {budget.epsilon():.4g} at delta "
            f"{budget.delta:g} after {budget.releases} released rounds")


def privacy_budget(cfg: RunConfig, num_nodes: int, sample_size: int,
                   resume: Checkpoint | None,
                   resume_path: Path | None) -> tuple[PrivacyBudget | None, RunConfig]:
    """The run's budget (None without DP) and its settings, shortened to fit the target.

    `num_nodes` clients make the population, `sample_size` of them train a round.

    A resumed run's ledger is loaded first. With 'dp-target-epsilon', the run
    ends after the last round whose release keeps epsilon within it: its
    'num-server-rounds' is lowered to that round (logged), so that round is
    scored, sampled and summarised as a last round is. ConfigError when no
    further round fits, or the checkpoint's ledger does not fit this run.
    """
    if not cfg.private:
        return None, cfg
    budget = PrivacyBudget(cfg, num_nodes, sample_size)
    done = 0
    if resume is not None:
        try:
            budget.load(resume.strategy_state, resume_path or "the checkpoint")
        except BudgetError as exc:
            raise ConfigError(str(exc)) from exc
        done = resume.server_round
    log(INFO, budget_line(budget))
    if budget.target is None:
        return budget, cfg
    wanted = cfg.num_server_rounds - done
    fits = budget.rounds_within(budget.target, wanted)
    if fits == 0:
        raise ConfigError(
            f"setting 'dp-target-epsilon' is {budget.target:g}, but one more round would take "
            f"epsilon to {budget.epsilon_after(1):.4g} (now {budget.epsilon():.4g} after "
            f"{budget.releases} released rounds): the budget is spent")
    if fits < wanted:
        log(WARNING, "dp-target-epsilon %g: %d of the %d rounds to go fit in the budget "
            "(epsilon %.4g at delta %g after them); the run ends after round %d",
            budget.target, fits, wanted, budget.epsilon_after(fits), budget.delta, done + fits)
        cfg = replace(cfg, num_server_rounds=done + fits)
    return budget, cfg
