"""The experiment configuration: one validated pydantic schema, YAML plus ``key=value`` overrides.

Errors never reach the user as a traceback: :func:`load_config` turns every validation
problem into one line that names the dotted key and what is allowed (the accepted names of a
variant, the allowed keys of a section, or the constraint), raised as ``ConfigError``.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from fedkin.algorithms import ALGORITHMS
from fedkin.backends import BackendConfig, LocalBackendConfig
from fedkin.channel.attacks import AttackConfig
from fedkin.channel.pipeline import ChannelConfig, central_dp_conflict
from fedkin.core.errors import ConfigError
from fedkin.core.store import StoreConfig
from fedkin.data.config import DataConfig, DigitsConfig
from fedkin.engine import EngineConfig
from fedkin.models import MlpConfig, ModelConfig
from fedkin.optim import OptimizerConfig, SgdConfig
from fedkin.plugins import load_plugins
from fedkin.privacy.config import PrivacyConfig
from fedkin.registry import ALGORITHM_REGISTRY, registry_of

#: An algorithm's config: any registered algorithm (``fedkin.register_algorithm``).
AlgorithmConfig = ALGORITHM_REGISTRY.field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientConfig(_Section):
    local_steps: int = Field(
        10, ge=1, description="local optimizer steps per round (one batch each)"
    )
    batch_size: int = Field(16, ge=1, description="samples per local batch")
    optimizer: OptimizerConfig = Field(default_factory=lambda: SgdConfig(lr=0.1))


class ServerConfig(_Section):
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: SgdConfig(lr=1.0),
        description="server optimizer on the pseudo-gradient −Δ̄ (sgd lr=1: FedAvg; adam: FedAdam)",
    )


class CohortConfig(_Section):
    clients_per_round: int = Field(
        20, ge=1, description="clients sampled (without replacement) per round"
    )
    weighting: Literal["samples", "uniform"] = Field(
        "samples", description="aggregation weights: by train samples n_i, or equal"
    )
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="fixed: exactly clients_per_round without replacement; poisson: each "
        "training client joins independently with q = clients_per_round / N",
    )


class EvalConfig(_Section):
    every: int = Field(5, ge=1, description="evaluate every N rounds (and always after the last)")
    holdout_clients: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="fraction of clients that never train; evaluated as new clients after one "
        "local adaptation from the population model (new_acc_*)",
    )
    new_client_train_samples: int | None = Field(
        None,
        gt=0,
        description="keep only this many training samples on each new (held-out) client: the "
        "data it adapts on, a nested random subset as data.train_per_client; training clients "
        "and every test split are unchanged. None: all",
    )
    failure_patterns: bool = Field(
        False,
        description="model mel, local backend: also report accuracy under every failure pattern of "
        "the ensemble (global_acc_<pattern>, personal_acc_<pattern>; e.g. combiner+branch1)",
    )

    @model_validator(mode="after")
    def _new_clients_exist(self) -> EvalConfig:
        if self.new_client_train_samples is not None and self.holdout_clients == 0:
            raise ValueError(
                "eval.new_client_train_samples needs new clients: set eval.holdout_clients "
                "(allowed: 0 < holdout_clients <= 0.5) or leave it null"
            )
        return self


class CheckpointConfig(_Section):
    every: int = Field(1, ge=1, description="write the checkpoint every N rounds")


class ClientModelGroup(_Section):
    model: ModelConfig = Field(description="architecture of this group's personal models")
    fraction: float = Field(gt=0, le=1, description="share of the clients in this group")
    centers: int | None = Field(
        None,
        ge=2,
        description="quantization centers M of this group's personal models, for quantizing "
        "algorithms (qupel, quped): 2 = 1-bit, 4 = 2-bit; None = full precision",
    )


class CompareSection(_Section):
    """Used by `fedkin compare` (ignored by `fedkin run`)."""

    algorithms: list[str] = Field(
        default_factory=lambda: ["fedavg", "local"], description="algorithms to compare"
    )
    seeds: int = Field(3, ge=1, description="seeds 0..N-1; each seed fixes partition and cohorts")
    algorithm_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-algorithm options, e.g. {ditto: {lam: 0.5}}"
    )
    tune: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="per-algorithm option grids chosen on a validation split of the clients' "
        "training data, never on test data, e.g. {fedprox: {mu: [0.001, 0.01, 0.1, 0.5, 1]}}: "
        "every grid point runs for every seed with data.validation_fraction = "
        "compare.validation_fraction, the point with the highest mean final "
        "val_personal_acc_mean over seeds wins (ties: lower val_personal_loss, then grid "
        "order), and the reported run trains on the full training data with it",
    )
    validation_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of each client's training samples held out for validation in the "
        "tuning runs of compare.tune",
    )


class ExperimentConfig(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="run name")
    plugins: list[str] = Field(
        default_factory=list,
        description="modules imported before the config is validated; they register "
        "algorithms, datasets, models or optimizers (`fedkin run --plugin MODULE` adds them)",
    )
    seed: int = Field(
        0, ge=0, description="seed: all randomness derives from (seed, round, client)"
    )
    rounds: int = Field(60, ge=1, description="communication rounds")
    data: DataConfig = Field(default_factory=DigitsConfig)
    model: ModelConfig = Field(default_factory=MlpConfig)
    client_models: list[ClientModelGroup] = Field(
        default_factory=list,
        description="personal architectures by client group (empty: every client uses `model`)",
    )
    algorithm: AlgorithmConfig = Field(default_factory=lambda: ALGORITHM_REGISTRY["fedavg"]())
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    cohort: CohortConfig = Field(default_factory=CohortConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    backend: BackendConfig = Field(default_factory=LocalBackendConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    channel: ChannelConfig = Field(default_factory=ChannelConfig, description=ChannelConfig.__doc__)
    attack: AttackConfig | None = Field(
        None,
        description="simulated Byzantine clients, a fixed seeded fraction of the population "
        "(fedkin list attacks); none by default",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    compare: CompareSection | None = Field(None, description=CompareSection.__doc__)

    @model_validator(mode="after")
    def _cohort_fits(self) -> ExperimentConfig:
        training = self.data.num_clients - holdout_count(
            self.data.num_clients, self.eval.holdout_clients
        )
        if self.cohort.clients_per_round > training:
            raise ValueError(
                f"cohort.clients_per_round={self.cohort.clients_per_round} exceeds the "
                f"{training} training clients (data.num_clients={self.data.num_clients}, "
                f"eval.holdout_clients={self.eval.holdout_clients}); allowed: 1..{training}"
            )
        if self.privacy.enabled:
            self._private_cohorts(training)
        if getattr(self.data, "validation_fraction", 0.0) > 0 and self.backend.name == "flower":
            raise ValueError(
                "data.validation_fraction > 0 needs backend.name=local or ray (Flower nodes "
                "evaluate their test split only); allowed with flower: 0"
            )
        if self.privacy.enabled and self.algorithm.name == "ifca":
            raise ValueError(
                f"algorithm.name=ifca cannot run with privacy.mechanism={self.privacy.mechanism}: "
                "its cluster means divide noisy sums by noisy member counts near 0 (unbounded "
                "steps); use privacy.mechanism=none or another algorithm.name"
            )
        self._zeroth_order_fits()
        if self.privacy.dp_sgd is not None and not ALGORITHMS[self.algorithm.name].supports_dp_sgd:
            allowed = ", ".join(n for n, a in ALGORITHMS.items() if a.supports_dp_sgd)
            raise ValueError(
                f"privacy.dp_sgd: algorithm.name={self.algorithm.name} computes gradients "
                f"outside the shared local solver; DP-SGD works with: {allowed}"
            )
        if getattr(self.server.optimizer, "sharpness_aware", False):
            raise ValueError(
                f"server.optimizer.name={self.server.optimizer.name} needs a loss (two gradient "
                "evaluations per step); allowed for the server: any optimizer but sam, asam"
            )
        if (
            getattr(self.client.optimizer, "sharpness_aware", False)
            and not ALGORITHMS[self.algorithm.name].supports_dp_sgd
        ):
            allowed = ", ".join(n for n, a in ALGORITHMS.items() if a.supports_dp_sgd)
            raise ValueError(
                f"client.optimizer.name={self.client.optimizer.name}: algorithm.name="
                f"{self.algorithm.name} computes gradients outside the shared local solver, "
                f"which takes SAM's second gradient; sam and asam work with: {allowed}"
            )
        if getattr(self.client.optimizer, "sharpness_aware", False) and self.privacy.dp_sgd:
            raise ValueError(
                f"client.optimizer.name={self.client.optimizer.name} is sharpness-aware (a "
                "second gradient at θ + ε(g, θ), unclipped) and privacy.dp_sgd clips per-example "
                "gradients; use another client.optimizer (not sam, asam) or privacy.dp_sgd=null"
            )
        if self.eval.failure_patterns and (
            self.model.name != "mel" or self.client_models or self.backend.name != "local"
        ):
            # Ray workers and Flower nodes keep their own copy of the model, which does not see
            # the serving pattern set in this process
            raise ValueError(
                f"eval.failure_patterns needs model.name=mel (got {self.model.name!r}), no "
                f"client_models, and backend.name=local (got {self.backend.name!r})"
            )
        if self.client_models:
            total = sum(g.fraction for g in self.client_models)
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"client_models fractions must sum to 1, got {total:g}")
            algorithm = ALGORITHMS[self.algorithm.name]
            if not algorithm.supports_model_groups:
                allowed = ", ".join(n for n, a in ALGORITHMS.items() if a.supports_model_groups)
                raise ValueError(
                    f"algorithm.name={self.algorithm.name} needs one architecture for all clients; "
                    f"client_models works with: {allowed}"
                )
            quantizing = "centers" in algorithm.Config.model_fields
            for i, group in enumerate(self.client_models):
                if group.centers is not None and not quantizing:
                    allowed = ", ".join(
                        n for n, a in ALGORITHMS.items() if "centers" in a.Config.model_fields
                    )
                    raise ValueError(
                        f"client_models.{i}.centers: algorithm.name={self.algorithm.name} does "
                        f"not quantize; centers work with: {allowed}"
                    )
                if algorithm.personal_shape_is_global and group.model != self.model:
                    raise ValueError(
                        f"client_models.{i}.model must equal model for algorithm.name="
                        f"{self.algorithm.name} (its prior compares personal and global "
                        "parameters); give groups other centers, not other architectures"
                    )
        self._check_channel()
        return self

    def _zeroth_order_fits(self) -> None:
        """A zeroth-order client optimizer needs an algorithm whose client-optimizer steps are all
        shared local-solver steps (``supports_zeroth_order``), without DP-SGD; none serves
        FedOpt."""
        if getattr(self.server.optimizer, "zeroth_order", False):
            raise ValueError(
                f"server.optimizer.name={self.server.optimizer.name} is zeroth-order: it needs "
                "a loss, and the server has a pseudo-gradient; use a first-order optimizer"
            )
        if not getattr(self.client.optimizer, "zeroth_order", False):
            return
        name = self.client.optimizer.name
        if not ALGORITHMS[self.algorithm.name].supports_zeroth_order:
            allowed = ", ".join(n for n, a in ALGORITHMS.items() if a.supports_zeroth_order)
            raise ValueError(
                f"client.optimizer.name={name} is zeroth-order, but algorithm.name="
                f"{self.algorithm.name} steps its client optimizer outside the shared local "
                f"solver; zeroth-order client optimizers work with: {allowed}"
            )
        if self.privacy.dp_sgd is not None:
            raise ValueError(
                f"client.optimizer.name={name} is zeroth-order and privacy.dp_sgd clips "
                "per-example gradients; use a first-order client.optimizer or privacy.dp_sgd=null"
            )

    def _private_cohorts(self, training: int) -> None:
        """Under user-level DP, default ``cohort.weighting`` to uniform and ``cohort.sampling``
        to Poisson when the user left them unset; otherwise raise one error naming every key
        that must change and its allowed values."""
        privacy, unset = self.privacy, {"weighting", "sampling"} - self.cohort.model_fields_set
        defaults = {"weighting": "uniform", "sampling": "poisson"}
        self.cohort = cohort = self.cohort.model_copy(update={k: defaults[k] for k in unset})
        problems = []
        if cohort.weighting != "uniform":
            problems.append(
                "cohort.weighting=samples: set cohort.weighting=uniform (DP bounds each "
                "client's influence; sample-count weights would leak and unbound it)"
            )
        central_pld = privacy.mechanism == "central" and privacy.accountant == "pld"
        if cohort.sampling == "fixed" and central_pld:
            problems.append(
                "cohort.sampling=fixed with privacy.accountant=pld: the PLD accountant cannot "
                "account fixed-size cohorts; set cohort.sampling=poisson or privacy.accountant=rdp"
            )
        if privacy.delta >= 1 / training:
            problems.append(
                f"privacy.delta={privacy.delta:g} must be < 1/population = 1/{training} "
                "(a larger δ allows releasing one client's data outright)"
            )
        if problems:
            raise ValueError(f"privacy.mechanism={privacy.mechanism} needs: " + "; ".join(problems))

    def _check_channel(self) -> None:
        """A non-default channel (aggregator, compressor, attack) runs where it is supported."""
        if self.channel == ChannelConfig() and self.attack is None:
            return
        omniscient = self.attack is not None and self.attack._sees_honest()
        if self.backend.name == "flower" and self.privacy.enabled and omniscient:
            raise ValueError(
                f"attack.name={self.attack.name} sees the round's honest messages, which "
                "Flower nodes would have to send un-released to the simulated adversary; "
                "with privacy on backend.name=flower use an attack that sees its own update "
                "only (attack.name=scaled|gaussian|nonfinite|label_flip, or sign_flip with "
                "attack.reference=own) or privacy.mechanism=none"
            )
        if (
            self.privacy.mechanism == "local"
            and self.channel.model_copy(update={"momentum": None}) != ChannelConfig()
        ):
            raise ValueError(
                "privacy.mechanism=local noises each message on its client, so the server's "
                "robust rules and the uplink compressors do not apply; keep channel at its "
                "defaults, channel.momentum aside (or use privacy.mechanism=central)"
            )
        if self.channel.momentum is not None and not ALGORITHMS[self.algorithm.name].robust_delta:
            raise ValueError(
                f"channel.momentum: algorithm.name={self.algorithm.name} sends its model delta "
                "masked by cluster, and a client's momentum would carry it into the next "
                "cluster it picks; remove channel.momentum (and use a rule other than monna)"
            )
        if self.privacy.mechanism == "central":
            conflict = central_dp_conflict(self.channel)
            if conflict:
                raise ValueError(conflict)
        robust = central_dp_conflict(self.channel) is not None
        if robust and not ALGORITHMS[self.algorithm.name].robust_delta:
            raise ValueError(
                f"channel.aggregator.name={self.channel.aggregator.name}: algorithm.name="
                f"{self.algorithm.name} sends its model delta masked by cluster, which a robust "
                "rule would mix across clusters (only the key 'delta' is aggregated robustly; "
                "its cluster masses 'assign' are always averaged); use "
                "channel.aggregator.name=weighted_mean"
            )


def holdout_count(num_clients: int, fraction: float) -> int:
    """Number of held-out (never training) clients: round(fraction · N), at least 1 if > 0."""
    return max(1, round(fraction * num_clients)) if fraction > 0 else 0


# ----- loading --------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. rounds=10)")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = (
            deep_merge(merged[k], v)
            if isinstance(v, dict) and isinstance(merged.get(k), dict)
            else v
        )
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r} must be a mapping of keys, got {type(raw).__name__}"
        )
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    plugins: list[str] | None = None,
) -> ExperimentConfig:
    """The experiment of a YAML file (None: the defaults) with ``key=value`` overrides;
    ``plugins`` are added to the config's ``plugins`` (and imported before validation)."""
    raw = read_yaml(path) if path else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return validate_config(with_plugins(raw, plugins or []))


def with_plugins(raw: dict[str, Any], plugins: list[str]) -> dict[str, Any]:
    """``raw`` with ``plugins`` appended to its ``plugins`` list (each module once)."""
    if not plugins:
        return raw
    listed = raw.get("plugins") or []
    if not isinstance(listed, list):
        return raw  # validation reports the bad value
    return {**raw, "plugins": [*listed, *(p for p in plugins if p not in listed)]}


def fill_variant_names(raw: dict[str, Any], cls: type[BaseModel] | None = None) -> dict[str, Any]:
    """Give every variant section without a ``name`` the name of its default variant, so
    ``data.partition.alpha=0.5`` alone keeps the default partitioner instead of failing."""
    cls = cls or ExperimentConfig
    out = dict(raw)
    for key, value in raw.items():
        field = cls.model_fields.get(key)
        if field is None or not isinstance(value, dict):
            continue
        variants = _variants(_annotation(field))
        if "" in variants:
            out[key] = fill_variant_names(value, variants[""])
            continue
        if not variants:
            continue
        name = value.get("name")
        if name is None:
            default = field.get_default(call_default_factory=True)
            name = getattr(default, "name", None)
            if name is None:
                continue
            value = {"name": name, **value}
        out[key] = fill_variant_names(value, variants[name]) if name in variants else value
    return out


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Import the config's ``plugins`` (so the names they register are known), then validate."""
    plugins = raw.get("plugins")
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        load_plugins(plugins)
    try:
        return ExperimentConfig.model_validate(fill_variant_names(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


# ----- error messages ---------------------------------------------------------------------------


def _annotation(field: FieldInfo) -> Any:
    """A field's full annotation (pydantic keeps ``Annotated`` metadata apart)."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def _variants(annotation: Any) -> dict[str, type[BaseModel]]:
    """Models a field may hold, keyed by their ``name`` tag ("" for a single untagged model)."""
    registry = registry_of(annotation)
    if registry is not None:
        return dict(registry)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"": annotation}
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _variants(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        out = {}
        for member in typing.get_args(annotation):
            if (
                isinstance(member, type)
                and issubclass(member, BaseModel)
                and "name" in member.model_fields
            ):
                out[member.model_fields["name"].default] = member
        return out
    return {}


def _walk(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """Dotted user-facing path of a pydantic error location (union tags dropped) and the
    model class that contains its last key."""
    cls: type[BaseModel] | None = ExperimentConfig
    parent: type[BaseModel] | None = ExperimentConfig
    names: list[str] = []
    i = 0
    while i < len(loc):
        key = loc[i]
        i += 1
        names.append(str(key))
        parent = cls
        if cls is None or key not in cls.model_fields:
            cls = None
            continue
        annotation = _annotation(cls.model_fields[key])
        if typing.get_origin(annotation) is list and i < len(loc) and isinstance(loc[i], int):
            names.append(str(loc[i]))  # an item of a list section
            annotation = typing.get_args(annotation)[0]
            i += 1
        variants = _variants(annotation)
        if "" in variants:
            cls = variants[""]
        elif variants and i < len(loc) and loc[i] in variants:
            cls = variants[loc[i]]
            i += 1
        else:
            cls = None
    return ".".join(names), parent


def _field_annotation(loc: tuple[Any, ...]) -> Any:
    """The annotation of the field at ``loc``."""
    _, parent = _walk(loc)
    field = parent.model_fields.get(str(loc[-1])) if parent and loc else None
    return _annotation(field) if field else None


def _expected_names(loc: tuple[Any, ...]) -> str:
    """The variant names allowed at ``loc`` (a discriminated-union field)."""
    annotation = _field_annotation(loc)
    return ", ".join(repr(n) for n in _variants(annotation)) if annotation else "?"


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path, parent = _walk(tuple(e["loc"]))
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"unknown key '{path}'; allowed keys here: {allowed}")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            got = e.get("ctx", {}).get("tag")
            expected = e.get("ctx", {}).get("expected_tags") or _expected_names(tuple(e["loc"]))
            what = f"'{got}' is not one of" if got is not None else "is required; one of"
            registry = registry_of(_field_annotation(tuple(e["loc"])))
            hint = f" ({registry.hint})" if registry is not None else ""
            lines.append(f"{path}.name: {what}: {expected}{hint}")
        elif kind == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
