"""Validated configs for datasets and partitioners (pydantic v2, discriminated by ``name``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkin.registry import DATASET_REGISTRY


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IidPartition(_Strict):
    """Uniformly random split; client sizes differ by at most one."""

    name: Literal["iid"] = Field("iid", description="Partitioner name.")


class DirichletPartition(_Strict):
    """Label skew: each class is dealt to clients in Dir(alpha) proportions (Hsu et al. 2019)."""

    name: Literal["dirichlet"] = Field("dirichlet", description="Partitioner name.")
    alpha: float = Field(
        0.3, gt=0, description="Dirichlet concentration; smaller means stronger label skew."
    )
    min_size: int = Field(
        2,
        ge=2,
        description="Redraw until every client holds at least this many samples "
        "(>= 2: one for train, one for test).",
    )


class PathologicalPartition(_Strict):
    """Shard split (McMahan et al. 2017): each client holds at most k classes."""

    name: Literal["pathological"] = Field("pathological", description="Partitioner name.")
    classes_per_client: int = Field(
        2, ge=1, description="Label-pure shards per client (an upper bound on its classes)."
    )


class QuantitySkewPartition(_Strict):
    """IID labels with lognormal client sizes."""

    name: Literal["quantity"] = Field("quantity", description="Partitioner name.")
    sigma: float = Field(
        1.0, ge=0, description="Std dev of the log client-size weights (0 gives equal sizes)."
    )
    min_size: int = Field(2, ge=2, description="Samples every client gets before the skew.")


class _DatasetConfig(_Strict):
    """Fields every dataset shares."""

    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each client's training samples carved out as its validation set "
        "(never trained on; eval records then report val_* metrics, e.g. for choosing "
        "hyperparameters without the test split). 0: no validation set.",
    )
    train_per_client: int | None = Field(
        None,
        gt=0,
        description="Keep only this many training samples per client, a random subset that "
        "grows with the value (the subset for n is inside the one for 2n; ADEPT's data_ratio, "
        "and sample-amplification runs); the test split is unchanged. Every client must hold "
        "at least this many. None: all.",
    )


PartitionConfig = Annotated[
    IidPartition | DirichletPartition | PathologicalPartition | QuantitySkewPartition,
    Field(discriminator="name"),
]


class DigitsConfig(_DatasetConfig):
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes), pooled and partitioned."""

    name: Literal["digits"] = Field("digits", description="Dataset name.")
    num_clients: int = Field(100, gt=0, description="Number of clients.")
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each client's samples held out for testing."
    )
    partition: PartitionConfig = Field(
        default_factory=lambda: DirichletPartition(alpha=0.3),
        description="How the pooled samples are split among clients.",
    )


class SyntheticConfig(_DatasetConfig):
    """Synthetic(alpha, beta) of the FedProx paper (Li et al. 2020), one generated client each."""

    name: Literal["synthetic"] = Field("synthetic", description="Dataset name.")
    num_clients: int = Field(30, gt=0, description="Number of clients.")
    alpha: float = Field(
        1.0,
        ge=0,
        description="Std dev of the per-client mean u_k of the model W_k, b_k (shifts all "
        "logits of a client equally, so it does not change the labels).",
    )
    beta: float = Field(
        1.0, ge=0, description="Std dev of the per-client mean B_k of the feature mean v_k."
    )
    dim: int = Field(60, gt=0, description="Feature dimension.")
    num_classes: int = Field(10, ge=2, description="Number of classes.")
    iid: bool = Field(
        False,
        description="FedProx's Synthetic-IID: one shared model and zero feature mean for all "
        "clients (alpha and beta are ignored).",
    )
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each client's samples held out for testing."
    )


class LinearGaussianConfig(_DatasetConfig):
    """ADEPT's hierarchical linear-Gaussian model: a shared linear decoder perturbed per client
    (see :mod:`fedkin.data.linear_gaussian`); a reconstruction dataset (all labels 0)."""

    name: Literal["linear-gaussian"] = Field("linear-gaussian", description="Dataset name.")
    num_clients: int = Field(50, gt=0, description="Number of clients.")
    dim: int = Field(64, gt=0, description="Data dimension d (ADEPT's code: 64).")
    latent: int = Field(5, gt=0, description="Latent dimension r of the decoder.")
    signal_std: float = Field(
        0.1, gt=0, description="Std dev of the shared decoder's entries (ADEPT: 0.1)."
    )
    perturbation_std: float = Field(
        0.01,
        ge=0,
        description="Std dev of each client's perturbation of the decoder (ADEPT's gen_std); "
        "0 gives identical clients.",
    )
    latent_std: float = Field(0.5, gt=0, description="Std dev of the latents z (ADEPT: 0.5).")
    noise_std: float = Field(
        0.0,
        ge=0,
        description="Std dev of isotropic observation noise added to x (ADEPT's code: none).",
    )
    decoder_bias: bool = Field(
        True, description="Draw a decoder bias (shared plus perturbation) as ADEPT's code does."
    )
    train_samples: int = Field(10, gt=0, description="Training samples per client (ADEPT: 10).")
    test_samples: int = Field(20, gt=0, description="Test samples per client (ADEPT: 20).")


class FashionMnistConfig(_DatasetConfig):
    """Fashion-MNIST from the standard IDX files (train + test pooled: 70,000 images)."""

    name: Literal["fashion-mnist"] = Field("fashion-mnist", description="Dataset name.")
    root: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="Directory with the four IDX files (.gz or uncompressed); "
        "`apt-get install dataset-fashion-mnist` puts them in the default.",
    )
    num_clients: int = Field(20, gt=0, description="Number of clients.")
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each client's samples held out for testing."
    )
    partition: PartitionConfig = Field(
        default_factory=lambda: DirichletPartition(alpha=0.1),
        description="How the pooled samples are split among clients.",
    )
    max_samples: int | None = Field(
        None, gt=0, description="Use a random subset of this many images (None: all)."
    )


#: A dataset's config: any registered dataset (``fedkin.register_dataset``).
DataConfig = DATASET_REGISTRY.field
