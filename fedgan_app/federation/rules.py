"""The aggregation rules: for each 'strategy' setting, Flower's strategy and what it needs.

A `Rule` names a setting's value, builds Flower's strategy with its
documented settings, says whether it is robust (then BatchNorm buffers take
the coordinate-wise median too, `fedgan_app.federation.buffers`) and how
many valid replies a round needs (Krum: 2f+3, Bulyan: 4f+3). `RULES` holds
one per name in `fedgan_app.settings.STRATEGIES`; `check_federation` refuses a
federation no round of which could satisfy the rule, and the `Quorum` layer
refuses a round with too few valid replies.

Every strategy is built with fraction 1.0 and the message's keys
(`fedgan_app.protocol.message`): it sends to every node of the grid it is
given, and the sampling layer (`fedgan_app.federation.sampling`) gives it a
grid of the round's seeded sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedgan_app.config import RunConfig
from fedgan_app.federation.sampling import sampled_per_round
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.protocol.message import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES
from fedgan_app.settings import ConfigError


@dataclass(frozen=True)
class Rule:
    """One aggregation rule: its setting's name, its builder, and what it needs.

    Attributes
    ----------
    name : str
        The 'strategy' setting's value.
    build : Callable[[RunConfig, int], Strategy]
        Flower's strategy for the run's settings and the number of nodes.
    robust : bool
        Whether it resists attackers (buffers then take the median too).
    per_attacker, base : int
        A round needs ``per_attacker * f + base`` valid replies, f being
        'num-malicious-clients'.

    """

    name: str
    build: Callable[[RunConfig, int], Strategy]
    robust: bool = False
    per_attacker: int = 0
    base: int = 1

    def min_replies(self, num_malicious: int) -> tuple[int, str]:
        """Fewest valid replies a round needs, and the formula that says so."""
        need = self.per_attacker * num_malicious + self.base
        if not self.per_attacker:
            return need, str(need)
        return need, f"{self.per_attacker}f+{self.base} = {need}"


def _common(cfg: RunConfig) -> dict[str, Any]:
    """Settings every Flower strategy gets: fraction 1.0, this app's message keys."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0 if cfg.fraction_evaluate > 0 else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": 1,
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
    }


def _fedopt(cfg: RunConfig, betas: bool = True) -> dict[str, Any]:
    """FedOpt's settings (eta_l, the clients' learning rate, is informational in Flower)."""
    settings = {"eta": cfg.server_eta, "eta_l": cfg.lr_generator, "tau": cfg.server_tau}
    if betas:
        settings |= {"beta_1": cfg.server_beta1, "beta_2": cfg.server_beta2}
    return settings


def _multikrum(cfg: RunConfig, num_nodes: int) -> Strategy:
    """MultiKrum averaging 'multikrum-select' replies (0: all but f of the sampled)."""
    f = cfg.num_malicious_clients
    select = cfg.multikrum_select or sampled_per_round(cfg, num_nodes) - f
    return MultiKrum(**_common(cfg), num_malicious_nodes=f, num_nodes_to_select=max(1, select))


RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("fedavg", lambda cfg, n: FedAvg(**_common(cfg))),
    Rule("fedavgm", lambda cfg, n: FedAvgM(**_common(cfg), server_learning_rate=cfg.server_lr,
                                           server_momentum=cfg.server_momentum)),
    Rule("fedprox", lambda cfg, n: FedProx(**_common(cfg), proximal_mu=cfg.proximal_mu)),
    Rule("fedadam", lambda cfg, n: FedAdam(**_common(cfg), **_fedopt(cfg))),
    Rule("fedadagrad", lambda cfg, n: FedAdagrad(**_common(cfg), **_fedopt(cfg, betas=False))),
    Rule("fedyogi", lambda cfg, n: FedYogi(**_common(cfg), **_fedopt(cfg))),
    Rule("median", lambda cfg, n: FedMedian(**_common(cfg)), robust=True),
    Rule("trimmed-mean", lambda cfg, n: FedTrimmedAvg(**_common(cfg), beta=cfg.trim_fraction),
         robust=True),
    Rule("krum", lambda cfg, n: Krum(**_common(cfg), num_malicious_nodes=cfg.num_malicious_clients),
         robust=True, per_attacker=2, base=3),
    Rule("multikrum", _multikrum, robust=True, per_attacker=2, base=3),
    Rule("bulyan", lambda cfg, n: Bulyan(**_common(cfg),
                                         num_malicious_nodes=cfg.num_malicious_clients),
         robust=True, per_attacker=4, base=3),
)}


def rule_of(cfg: RunConfig) -> Rule:
    """The rule the run's 'strategy' setting names."""
    return RULES[cfg.strategy]


def min_replies(cfg: RunConfig) -> tuple[int, str]:
    """Fewest valid replies the run's rule needs per round, and the formula."""
    return rule_of(cfg).min_replies(cfg.num_malicious_clients)


def check_federation(cfg: RunConfig, num_nodes: int) -> None:
    """Raise ConfigError when no round of this federation could satisfy the rule.

    With no node connected yet (a deployment whose SuperNodes come later) there
    is nothing to check: each round then refuses what it cannot aggregate.
    """
    if num_nodes == 0:
        log(WARNING, "no node connected yet: the federation's size is not checked")
        return
    sampled = sampled_per_round(cfg, num_nodes)
    federation = (f"{sampled} clients are sampled per round ({num_nodes} nodes x "
                  f"fraction-train {cfg.fraction_train:g})")
    need, formula = min_replies(cfg)
    if need > sampled:
        raise ConfigError(
            f"setting 'num-malicious-clients' is {cfg.num_malicious_clients}: strategy "
            f"'{cfg.strategy}' needs at least {formula} replies per round, but only "
            f"{federation}; lower num-malicious-clients or add clients"
        )
    if cfg.min_train_replies > sampled:
        raise ConfigError(
            f"setting 'min-train-replies' is {cfg.min_train_replies}, but only "
            f"{federation}: no round could update the model"
        )
    if cfg.strategy == "multikrum" and cfg.multikrum_select > sampled - cfg.num_malicious_clients:
        raise ConfigError(
            f"setting 'multikrum-select' is {cfg.multikrum_select}, more than the "
            f"{sampled - cfg.num_malicious_clients} honest replies multikrum can assume "
            f"({federation}, num-malicious-clients {cfg.num_malicious_clients})"
        )


class Quorum(Wrapper):
    """Refuse a round with fewer valid replies than 'min-train-replies' or the rule needs.

    A refused round keeps the previous global model: the layers below are not asked.
    """

    def __init__(self, strategy: Strategy, cfg: RunConfig) -> None:
        super().__init__(strategy)
        self.cfg = cfg

    def summary(self) -> None:
        """Log the replies a round needs, then the layers below."""
        _, formula = min_replies(self.cfg)
        log(INFO, "\t├──> a round needs min-train-replies %d and strategy %s's %s valid "
            "replies", self.cfg.min_train_replies, self.cfg.strategy, formula)
        self.strategy.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate below, unless too few replies are left."""
        replies = list(replies)
        refusal = self._refusal(len(replies))
        if refusal is not None:
            log(WARNING, "round %d: %s; keeping the previous global model", server_round,
                refusal)
            return None, None
        return self.strategy.aggregate_train(server_round, replies)

    def _refusal(self, num_accepted: int) -> str | None:
        """Why this round cannot update the model with these replies, or None."""
        if num_accepted < self.cfg.min_train_replies:
            return (f"{num_accepted} valid replies < min-train-replies="
                    f"{self.cfg.min_train_replies}")
        need, formula = min_replies(self.cfg)
        if num_accepted < need:
            return (f"strategy '{self.cfg.strategy}' needs at least {formula} valid "
                    f"replies (num-malicious-clients="
                    f"{self.cfg.num_malicious_clients}), got {num_accepted}")
        return None
