"""The server optimizer's state: Flower's strategies' moments as checkpoint values.

FedOpt's strategies (FedAdam, FedAdagrad, FedYogi) keep their moments in
``m_t`` and ``v_t``, dicts keyed like the arrays; FedAvgM keeps its momentum
in ``momentum_vector``, a list in the arrays' order. A checkpoint holds them
as ``<slot>/<array key>`` tensors plus the rule's name, so a resumed run
continues exactly, and a checkpoint of other models or another rule is
refused or ignored with a reason. The keys are a checkpoint format: a
checkpoint written before keeps resuming.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedgan_app.outputs.checkpoint import CheckpointError

# Server-optimizer state Flower's strategies keep.
STATE_SLOTS = ("m_t", "v_t", "momentum_vector")
RULE_KEY = "strategy"  # the rule whose state it is


def optimizer_state(strategy: Strategy, rule: str, params: list[str]) -> dict[str, Any]:
    """A Flower strategy's server-optimizer state as checkpoint values ({}: none).

    `params` are the keys of the arrays the strategy aggregates, in its order.
    """
    state: dict[str, Any] = {}
    for slot in STATE_SLOTS:
        value = getattr(strategy, slot, None)
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = list(zip(params, value, strict=True))
        else:
            continue
        state.update({f"{slot}/{key}": torch.from_numpy(np.array(array, copy=True))
                      for key, array in items})
    if state:
        state[RULE_KEY] = rule
    return state


def load_optimizer_state(strategy: Strategy, rule: str, shapes: Mapping[str, tuple[int, ...]],
                         state: Mapping[str, Any], source: Path | str) -> None:
    """Restore `optimizer_state`'s values into a Flower strategy.

    `shapes` maps each aggregated key, in the strategy's order, to its shape.
    CheckpointError (naming `source`) when the state does not fit these arrays;
    the state of another rule is ignored with a warning.
    """
    if not state:
        return
    if state.get(RULE_KEY) != rule:
        log(WARNING, "ignoring the server optimizer state of strategy %r in %s: "
            "this run uses strategy %r", state.get(RULE_KEY), source, rule)
        return
    restored: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        slot, _, name = key.partition("/")
        if key == RULE_KEY:
            continue
        if (slot not in STATE_SLOTS or not hasattr(strategy, slot)
                or name not in shapes or not isinstance(value, torch.Tensor)
                or tuple(value.shape) != shapes[name]):
            raise CheckpointError(
                f"checkpoint {source}: server optimizer state {key!r} does not fit "
                "this run's models"
            )
        restored.setdefault(slot, {})[name] = value.numpy()
    for slot, values in restored.items():
        if set(values) != set(shapes):
            raise CheckpointError(
                f"checkpoint {source}: server optimizer state '{slot}' covers "
                f"{len(values)} of the {len(shapes)} parameter arrays"
            )
        ordered = {k: values[k] for k in shapes}
        setattr(strategy, slot,
                list(ordered.values()) if slot == "momentum_vector" else ordered)
    log(INFO, "restored the %s server optimizer state (%s) from %s", rule,
        ", ".join(restored), source)
