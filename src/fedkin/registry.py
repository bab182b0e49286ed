"""Open registries: the names a config may use for its algorithm, dataset, model and optimizers.

Every extensible part of an experiment is one *entry* of a :class:`Registry`: a pydantic config
class whose ``name`` field is a one-value ``Literal`` (the name users write, e.g.
``algorithm.name=fedprox``) and a build function or class that turns a validated config into
the part. Built-ins and plugins register the same way::

    fedkin.register_algorithm(MyAlgorithm)          # an Algorithm subclass with a Config
    fedkin.register_dataset(MyDataConfig, build)    # build(cfg, stream) -> FederatedDataset
    fedkin.register_model(MyModelConfig)            # cfg.build(feature_shape, image_shape, C)
    fedkin.register_optimizer(MyOptConfig)          # cfg.build() -> Optimizer

Each ``register_*`` returns its first argument, so it also works as a class decorator.

**The schema is not frozen at import.** A config field typed with a registry's :attr:`field`
(``ExperimentConfig.algorithm``, ``data``, ``model``, ``client.optimizer`` …) validates
through a discriminated union over the registered config classes that the registry builds
when it is first needed and rebuilds after every registration. So registration order does not
matter: a plugin may register at any time before a config that names it is validated.

**Built-ins load lazily.** A registry imports the package that registers its built-ins (and
the installed ``fedkin.plugins`` entry points, see :mod:`fedkin.plugins`) the first time it is
read, so ``import fedkin`` stays cheap.

The channel's aggregators, pre-aggregations, compressors and attacks (:mod:`fedkin.channel`)
are registries of the same kind, extended with ``register_aggregator`` and friends.

**Adding a registry**: create a
``Registry(kind, key, builtins=(package,))`` here, type the config field with its ``field``,
register the built-ins at the bottom of that package, and export a ``register_<kind>``
function from :mod:`fedkin` like the four below.
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter
from pydantic_core import core_schema

from fedkin.core.errors import UserError


class RegistryError(UserError):
    """A registration that would make a name ambiguous or a config class unusable."""


@dataclass(frozen=True)
class Entry:
    """One registered name: its config class and what builds the part from a config."""

    config: type[BaseModel]
    build: Callable[..., Any]


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def config_name(config: type[BaseModel]) -> str:
    """The registered name of a config class: the single value of its ``name`` Literal."""
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise RegistryError(f"{config!r} is not a pydantic model class")
    field = config.model_fields.get("name")
    args = typing.get_args(field.annotation) if field is not None else ()
    if field is None or typing.get_origin(field.annotation) is not Literal or len(args) != 1:
        raise RegistryError(
            f'{_qualname(config)} needs a field `name: Literal["<name>"] = "<name>"` '
            "(the name configs use to select it)"
        )
    name = args[0]
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{_qualname(config)}.name must be a non-empty string literal")
    return name


class Registry(Mapping[str, type[BaseModel]]):
    """Names → config classes of one kind of part (with :meth:`build` for each name).

    ``kind`` names it in messages (``register_<kind>``), ``key`` is the config key that selects
    a name (``algorithm.name``), ``builtins`` the packages whose import registers the built-ins,
    ``required`` fields every config class must have (a dataset's ``num_clients``).
    """

    def __init__(
        self, kind: str, key: str, builtins: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.key = key
        self._builtins = builtins
        self._required = required
        self._entries: dict[str, Entry] = {}
        self._loaded = False
        self._version = 0  # bumped by every registration; the union adapter is rebuilt after
        self._adapter: tuple[int, TypeAdapter] | None = None
        self.field = Annotated[BaseModel, _RegistryField(self)]
        """The type of a config field holding one of this registry's configs."""

    # ----- registration -------------------------------------------------------------------------
    def register(self, config: type[BaseModel], build: Callable[..., Any]) -> None:
        """Register ``config`` (selected by its ``name`` Literal) and its builder.

        Registering the same class again (a re-imported module) replaces the entry; a name
        already taken by a different class is an error.
        """
        name = config_name(config)
        missing = [f for f in self._required if f not in config.model_fields]
        if missing:
            raise RegistryError(
                f"{self.kind} config {_qualname(config)} needs the field(s) {', '.join(missing)}"
            )
        if not callable(build):
            raise RegistryError(f"{self.kind} {name!r}: the builder {build!r} is not callable")
        old = self._entries.get(name)
        if old is not None and _qualname(old.config) != _qualname(config):
            raise RegistryError(
                f"{self.kind} name {name!r} is already registered by {_qualname(old.config)}; "
                f"give {_qualname(config)} another name"
            )
        self._entries[name] = Entry(config, build)
        self._version += 1

    # ----- reading ------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: the imports below register into this registry
        for module in self._builtins:
            importlib.import_module(module)
        from fedkin.plugins import load_entry_points

        load_entry_points()

    def entry(self, name: str) -> Entry:
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown(name)) from None

    def build(self, config: BaseModel, *args: Any) -> Any:
        """The part described by ``config``: its registered builder called on (config, *args)."""
        return self.entry(config.name).build(config, *args)  # type: ignore[attr-defined]

    def unknown(self, name: str) -> str:
        """The message for an unknown name: what is registered and how to register more."""
        names = ", ".join(repr(n) for n in self)
        return f"{self.key}: {name!r} is not one of: {names} ({self.hint})"

    @property
    def hint(self) -> str:
        return (
            f"register one with fedkin.register_{self.kind} or load a plugin "
            "with --plugin MODULE / plugins: [MODULE]"
        )

    @property
    def builders(self) -> Mapping[str, Callable[..., Any]]:
        """Read-only view: name → builder (for algorithms: the Algorithm class)."""
        return _Builders(self)

    def __getitem__(self, name: str) -> type[BaseModel]:
        self._ensure_loaded()
        return self._entries[name].config

    def __iter__(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    # ----- validation ---------------------------------------------------------------------------
    def union(self) -> TypeAdapter:
        """The discriminated union of the registered configs, built on first use after a change."""
        self._ensure_loaded()
        if self._adapter is None or self._adapter[0] != self._version:
            configs = tuple(e.config for e in self._entries.values())
            union = Annotated[Union[configs], Field(discriminator="name")]  # noqa: UP007
            self._adapter = (self._version, TypeAdapter(union))
        return self._adapter[1]

    def validate(self, value: Any) -> BaseModel:
        """Validate ``value`` (a dict with ``name``, or a config instance) against the union."""
        return self.union().validate_python(value)


class _Builders(Mapping[str, Callable[..., Any]]):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Callable[..., Any]:
        self._registry._ensure_loaded()
        return self._registry._entries[name].build

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)


class _RegistryField:
    """``Annotated`` marker: validate through the registry's union, serialize as the config's
    own class (so a plugin's options are written to ``config.yaml``)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> Any:
        return handler(self.registry.union().core_schema)  # the registered configs, one of

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.registry.validate,
            serialization=core_schema.wrap_serializer_function_ser_schema(
                lambda value, serialize: serialize(value), schema=core_schema.any_schema()
            ),
        )


def registry_of(annotation: Any) -> Registry | None:
    """The registry behind a field annotation made with :attr:`Registry.field`, if any."""
    if typing.get_origin(annotation) is Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, _RegistryField):
                return meta.registry
    return None


# ----- the registries --------------------------------------------------------------------------

ALGORITHM_REGISTRY = Registry("algorithm", "algorithm.name", builtins=("fedkin.algorithms",))
DATASET_REGISTRY = Registry(
    "dataset", "data.name", builtins=("fedkin.data",), required=("num_clients",)
)
MODEL_REGISTRY = Registry("model", "model.name", builtins=("fedkin.models",))
OPTIMIZER_REGISTRY = Registry("optimizer", "optimizer.name", builtins=("fedkin.optim",))
AGGREGATOR_REGISTRY = Registry(
    "aggregator", "channel.aggregator.name", builtins=("fedkin.channel",)
)
PREAGGREGATOR_REGISTRY = Registry(
    "preaggregator", "channel.aggregator.pre[].name", builtins=("fedkin.channel",)
)
COMPRESSOR_REGISTRY = Registry("compressor", "channel.compress.name", builtins=("fedkin.channel",))
ATTACK_REGISTRY = Registry(
    "attack", "attack.name", builtins=("fedkin.channel",), required=("fraction",)
)


def register_algorithm(cls: type) -> type:
    """Register an :class:`~fedkin.algorithms.Algorithm` subclass under ``cls.name``; its
    ``Config`` (a pydantic model with ``name: Literal[cls.name]``) holds its options."""
    from fedkin.algorithms.base import Algorithm

    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise RegistryError(f"register_algorithm: {cls!r} is not a fedkin Algorithm subclass")
    config = getattr(cls, "Config", None)
    name = config_name(config) if config is not None else None
    if name is None or getattr(cls, "name", None) != name:
        raise RegistryError(
            f"algorithm {_qualname(cls)} needs `name` and a `Config` whose name Literal equals "
            f"it (got name={getattr(cls, 'name', None)!r}, Config name={name!r})"
        )
    ALGORITHM_REGISTRY.register(config, cls)
    return cls


def register_dataset(config: type[BaseModel], build: Callable[..., Any] | None = None) -> type:
    """Register a dataset: ``config`` (with ``name`` and ``num_clients`` fields) and
    ``build(cfg, stream) -> FederatedDataset`` (default: the config's ``build`` method).

    ``stream`` is a :class:`fedkin.core.rng.Stream` keyed by (seed, "data", name): draw all
    randomness from it and the dataset is a function of the seed only."""
    DATASET_REGISTRY.register(config, build or _method(config, "build"))
    return config


def register_model(config: type[BaseModel], build: Callable[..., Any] | None = None) -> type:
    """Register a model: ``config`` and ``build(cfg, feature_shape, image_shape, num_classes)
    -> nn.Module`` (default: the config's ``build`` method). The module maps a batch
    ``[B, *feature_shape]`` to logits ``[B, num_classes]``; ``image_shape`` is ``(C, H, W)``
    for image data and None for tabular data."""
    MODEL_REGISTRY.register(config, build or _method(config, "build"))
    return config


def register_optimizer(config: type[BaseModel], build: Callable[..., Any] | None = None) -> type:
    """Register an optimizer: ``config`` and ``build(cfg) -> Optimizer`` (default: the config's
    ``build`` method), an ``(init, step)`` pair of pure functions, usually
    ``fedkin.optim.from_transform(transformation)`` (see :mod:`fedkin.optim`; subclass
    ``fedkin.optim.BaseOptimizerConfig`` to get ``lr``, ``schedule`` and ``clip_norm``)."""
    OPTIMIZER_REGISTRY.register(config, build or _method(config, "build"))
    return config


def register_aggregator(config: type[BaseModel], build: Callable[..., Any] | None = None) -> type:
    """Register an aggregation rule: ``config`` and ``build(cfg, seed) -> Aggregator`` (default:
    the config's ``build`` method), an ``(init, apply)`` pair over stacked messages ``[n, d]``
    (see :mod:`fedkin.channel.aggregators`)."""
    AGGREGATOR_REGISTRY.register(config, build or _method(config, "build"))
    return config


def register_preaggregator(
    config: type[BaseModel], build: Callable[..., Any] | None = None
) -> type:
    """Register a pre-aggregation: ``config`` and ``build(cfg, seed)`` returning a function
    ``(x [n, d], w [n], round) -> (x' [n', d], w' [n'])`` that runs before any rule."""
    PREAGGREGATOR_REGISTRY.register(config, build or _method(config, "build"))
    return config


def register_compressor(config: type[BaseModel], build: Callable[..., Any] | None = None) -> type:
    """Register an uplink compressor: ``config`` and ``build(cfg, seed) -> Compressor`` (default:
    the config's ``build`` method), an encode-to-bytes / decode pair (see
    :mod:`fedkin.channel.compressors`)."""
    COMPRESSOR_REGISTRY.register(config, build or _method(config, "build"))
    return config


def register_attack(config: type[BaseModel], build: Callable[..., Any] | None = None) -> type:
    """Register a Byzantine attack: ``config`` (with a ``fraction`` field) and
    ``build(cfg, seed) -> Attack`` (see :mod:`fedkin.channel.attacks`)."""
    ATTACK_REGISTRY.register(config, build or _method(config, "build"))
    return config


def _method(config: type[BaseModel], name: str) -> Callable[..., Any]:
    method = getattr(config, name, None)
    if not callable(method):
        raise RegistryError(
            f"{_qualname(config)} has no `{name}` method; pass the builder explicitly"
        )
    return method
