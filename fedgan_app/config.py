"""Run settings: one frozen, validated `RunConfig` built from `context.run_config`.

`RunConfig.from_run_config` checks each of a run's values against the settings
table (`fedgan_app.settings`) once, before any training starts, then the
relations between settings (class-aware, dp, ...); nobody else indexes
`run_config["..."]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedgan_app.settings import (
    CLASS_AWARE_STRATEGIES,
    DP_STRATEGIES,
    REMOVED_SETTINGS,
    SERVER_OPTIMIZERS,
    SETTINGS,
    SETTINGS_BY_KEY,
    ConfigError,
    check_value,
)


@dataclass(frozen=True)
class RunConfig:
    """All settings of a run, validated; field names are the keys in snake_case."""

    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_replies: int
    round_timeout: float
    local_steps: int
    batch_size: int
    lr_generator: float
    lr_discriminator: float
    adam_beta1: float
    adam_beta2: float
    lr_decay_every: int
    lr_decay_factor: float
    latent_dim: int
    g_width: int
    g_depth: int
    d_width: int
    d_norm: str
    gan_loss: str
    diffaugment: str
    generator_ema: float
    batchnorm: str
    conditional: bool
    conditioning: str
    g_conditioning: str
    aux_weight: float
    d_minibatch_std: int
    mode_seeking: float
    dataset: str
    partitioner: str
    dirichlet_alpha: float
    classes_per_client: int
    seed: int
    sample_every: int
    eval_every: int
    eval_samples: int
    sample_noise_scale: float
    audit_samples: int
    animation_share: float
    output_dir: str
    run_name: str
    resume_from: str
    wandb_mode: str
    wandb_project: str
    device: str
    client_threads: int
    client_optimizer_state: str
    strategy: str
    server_lr: float
    server_momentum: float
    server_eta: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    proximal_mu: float
    trim_fraction: float
    num_malicious_clients: int
    multikrum_select: int
    max_update_norm_ratio: float
    max_metadata_bytes: int
    weight_check: str
    weight_cap_ratio: float
    max_weight_share: float
    class_aware: str
    dp: str
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_delta: float
    dp_target_epsilon: float
    dp_clipped_quantile: float
    dp_clip_norm_lr: float
    dp_clipped_count_stddev: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Validate a Flower run_config; missing keys take their defaults."""
        for old, new in REMOVED_SETTINGS.items():
            if old in run_config:
                raise ConfigError(
                    f"setting '{old}' was replaced by '{new}' "
                    f"({SETTINGS_BY_KEY[new].allowed()}); set '{new}' instead"
                )
        unknown = sorted(set(run_config) - set(SETTINGS_BY_KEY))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}; known settings: "
                + ", ".join(sorted(SETTINGS_BY_KEY))
            )
        values = {}
        for setting in SETTINGS:
            raw = run_config.get(setting.key, setting.default)
            values[setting.key.replace("-", "_")] = check_value(setting, raw)
        config = cls(**values)
        config._check_relations()
        return config

    @property
    def keeps_optimizer_state(self) -> bool:
        """Whether a client keeps its Adam state between rounds (client-optimizer-state)."""
        if self.client_optimizer_state == "auto":
            return self.fraction_train >= 1.0
        return self.client_optimizer_state == "keep"

    @classmethod
    def defaults(cls, **overrides: Any) -> RunConfig:
        """Build the default config; overrides use snake_case field names."""
        raw = {s.key: s.default for s in SETTINGS}
        raw.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return cls.from_run_config(raw)

    def _check_relations(self) -> None:
        """Check constraints that involve more than one setting."""
        if not self.dataset.strip():
            raise ConfigError("setting 'dataset' must not be empty")
        if not self.output_dir.strip():
            raise ConfigError("setting 'output-dir' must not be empty")
        if "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(
                f"setting 'run-name' must be a plain folder name, got {self.run_name!r}"
            )
        if self.g_conditioning != "input" and not self.conditional:
            raise ConfigError(f"setting 'g-conditioning' is {self.g_conditioning!r} but an "
                              "unconditional GAN has no labels (set conditional = true, or "
                              "g-conditioning = 'input')")
        if self.class_aware == "on":
            self._check_class_aware()
        if self.private:
            self._check_dp()
        elif self.dp_target_epsilon > 0:
            raise ConfigError("setting 'dp-target-epsilon' needs differential privacy "
                              "(dp = 'server-fixed', 'client-fixed' or 'server-adaptive')")
        if 0 < self.weight_cap_ratio < 1:
            raise ConfigError(
                f"setting 'weight-cap-ratio' is {self.weight_cap_ratio:g}: below 1 it would "
                "clip honest claims under the median; use >= 1, or 0 for no clip"
            )

    def class_aware_blocker(self) -> str | None:
        """Why per-class weights make no sense in this run (None: they do)."""
        if not self.conditional:
            return "an unconditional GAN has no class rows"
        if self.strategy not in CLASS_AWARE_STRATEGIES:
            why = ("its server optimizer's state would not match the class rows replaced"
                   if self.strategy in SERVER_OPTIMIZERS else
                   "a robust rule would let unscreened per-class rows in")
            return (f"strategy {self.strategy!r} is not one it works with "
                    f"({' or '.join(CLASS_AWARE_STRATEGIES)}): {why}")
        if self.weight_check != "partition-size":
            return ("the label counts it weights by are checked only by weight-check "
                    "'partition-size'")
        if self.private:
            return "under dp a client's share of the average must stay bounded"
        return None

    @property
    def aggregates_by_class(self) -> bool:
        """Whether the class rows are averaged by class counts (class-aware on, or auto)."""
        return self.class_aware != "off" and self.class_aware_blocker() is None

    def _check_class_aware(self) -> None:
        """Refuse class-aware 'on' where per-class weights make no sense."""
        blocker = self.class_aware_blocker()
        if blocker is not None and not self.private:  # _check_dp names the dp clash
            raise ConfigError(f"setting 'class-aware' is 'on' but {blocker}; set it to "
                              "'auto' (on wherever it applies) or 'off'")

    def _check_dp(self) -> None:
        """Refuse what would break the guarantee the accountant reports."""
        if self.strategy not in DP_STRATEGIES:
            raise ConfigError(
                f"setting 'dp' works with strategy {' or '.join(DP_STRATEGIES)}, not "
                f"{self.strategy!r}: Flower's wrappers add noise calibrated to a mean of "
                "clipped updates to what the rule returns; a robust rule reweights or drops "
                "clients and a server optimizer's step is not bounded by the clipping norm")
        if self.class_aware == "on":
            raise ConfigError(
                "setting 'class-aware' cannot be used with 'dp': it weights a client's "
                "class rows by its class counts, so one client's share of the average, "
                "and the noise it needs, is no longer bounded")
        if self.dp_target_epsilon > 0 and self.dp_noise_multiplier == 0:
            raise ConfigError("setting 'dp-target-epsilon' needs dp-noise-multiplier > 0: "
                              "without noise epsilon is infinite from the first round")

    @property
    def private(self) -> bool:
        """Whether the run trains with differential privacy (dp is not 'none')."""
        return self.dp != "none"

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a kebab-case dict (for run_config.json and W&B)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def scores_round(self, server_round: int) -> bool:
        """Whether a round (>= 1) computes quality metrics and asks clients for D's accuracy.

        Every `eval-every` rounds and the last round.
        """
        return server_round > 0 and (server_round % self.eval_every == 0
                                     or server_round == self.num_server_rounds)

    def lr_at(self, server_round: int) -> tuple[float, float]:
        """Scheduled (lr_generator, lr_discriminator) for a 1-based round."""
        if self.lr_decay_every == 0:
            return self.lr_generator, self.lr_discriminator
        factor = self.lr_decay_factor ** ((server_round - 1) // self.lr_decay_every)
        return self.lr_generator * factor, self.lr_discriminator * factor


# The dataclass and the table must list the same keys.
assert [f.name for f in fields(RunConfig)] == [
    s.key.replace("-", "_") for s in SETTINGS
], "RunConfig fields and SETTINGS are out of sync"
