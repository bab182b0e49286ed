"""What a run may release under differential privacy: the one place that decides it.

Under ``privacy.mechanism=central|local`` everything a run writes (``metrics.jsonl`` records of
every kind, the progress line, ``summary.json``, the run info) and everything a Flower node
sends is one of

1. the noised, accounted aggregate and post-processing of it (the population model Γ);
2. data-independent values: the round, ε spent (and δ, the noise multiplier, the planned ε),
   the config (so the fixed cohort size k), timings, a client's DP-SGD step counts per batch
   (``dp_steps``: a node sends them for the example-level accountant); with fixed cohorts and
   no compression the round's bytes (k float32 messages up, k copies of Γ down: sizes fixed by
   the config — with Poisson cohorts they would reveal the cohort size, and a compressor's
   output size, e.g. FedZip's entropy coding, or a rejected update sent uncompressed, depends
   on the data);
3. a release that is itself noised and accounted: adaptive clipping's clip norm, a function of
   a noisy count of unclipped updates.

Every other value computed from client data stays inside the run: per-client values (AdaPeD's
ψ_i and KD_i, IFCA's cluster ids, APFL's α_i), exact cohort aggregates (train loss, clipped
fraction), counts (the Poisson cohort size, rejected/accepted/dropped updates) and evaluation
on the clients' data (global, personal and new-client accuracies; it is not even computed).
Internal guards still see them: non-finite updates are rejected and three all-rejected rounds
stop the run. The filters are allow-lists, so a metric added later is withheld until it is
named here.

``privacy.release_diagnostics=true`` releases everything again (for simulations that measure
utility, e.g. ``fedkin bench privacy``); the run then warns and its summary says
``"private": false`` with the reason. Every DP summary carries ``"private"``.

One released value depends on client dataset sizes, which fedkin treats as public:
``example_epsilon`` (DP-SGD) uses the training-set sizes and participation counts of the clients
that trained (participation is drawn from the seed, not from the data).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedkin.config import ExperimentConfig

#: Train-record keys released under DP (``clients`` too when cohorts have the fixed size k).
TRAIN_RELEASE = frozenset({"round", "kind", "epsilon", "clip_norm", "round_time_s"})
#: Byte counts of a round: released under DP only with fixed cohorts and no compression.
BYTES_RELEASE = frozenset(
    {"uplink_bytes", "downlink_bytes", "uplink_bytes_total", "downlink_bytes_total"}
)
#: Per-client metrics of ``client_update`` that are data-independent (functions of the config):
#: ``dp_steps``, the DP-SGD gradients on each batch, which the example-level accountant reads. A
#: Flower node sends these under DP too; they never enter a record (the server consumes them).
CLIENT_METRIC_RELEASE = frozenset({"dp_steps"})
#: Eval-record keys released under DP.
EVAL_RELEASE = frozenset({"round", "kind", "example_epsilon", "eval_time_s"})
#: Summary keys released under DP (plus ``private``).
SUMMARY_RELEASE = frozenset(
    {
        "name",
        "algorithm",
        "runtime",
        "rounds",
        "stop_reason",
        "epsilon",
        "epsilon_rdp",
        "delta",
        "noise_multiplier",
        "planned_epsilon",
        "session_time_s",
        "example_epsilon",
        "eval_time_s",
    }
)
NOT_PRIVATE_REASON = (
    "privacy.release_diagnostics=true: exact per-client and client-derived diagnostics "
    "(train loss, ψ/KD/cluster/α by client, counts, accuracy on client data) were released "
    "outside the accounted mechanism"
)


class NotPrivateWarning(UserWarning):
    """A DP run that releases diagnostics outside the accounted mechanism."""


@dataclasses.dataclass(frozen=True)
class ReleasePolicy:
    """The release decision of one run; in-process, Ray and Flower all ask this object."""

    mechanism: str = "none"
    diagnostics: bool = False
    fixed_cohort: bool = False
    adaptive_clip: bool = False
    compressed: bool = False

    @classmethod
    def of(cls, config: ExperimentConfig) -> ReleasePolicy:
        p = config.privacy
        return cls(
            mechanism=p.mechanism,
            diagnostics=p.release_diagnostics,
            fixed_cohort=config.cohort.sampling == "fixed",
            adaptive_clip=p.adaptive_clip is not None,
            compressed=config.channel.compress.name != "none",
        )

    @property
    def restricted(self) -> bool:
        """True when only the accounted release may leave (DP on, no diagnostics opt-in)."""
        return self.mechanism != "none" and not self.diagnostics

    @property
    def client_evaluation(self) -> bool:
        """Whether evaluation on the clients' data runs and its results leave the clients."""
        return not self.restricted

    @property
    def node_reports(self) -> bool:
        """Whether a node's train reply carries its metrics, example count and ``ok`` flag;
        otherwise it carries its DP release only (see :meth:`node_sends_clip_bit`)."""
        return not self.restricted

    @property
    def node_sends_clip_bit(self) -> bool:
        """Whether a node reports if its update was clipped: as a diagnostic, or under
        adaptive clipping as its input to the noisy (accounted) count of unclipped updates."""
        return self.mechanism != "none" and (self.diagnostics or self.adaptive_clip)

    def client_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A client's ``client_update`` metrics as they may leave it (a Flower node's reply)."""
        if not self.restricted:
            return metrics
        return {k: v for k, v in metrics.items() if k in CLIENT_METRIC_RELEASE}

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A train/eval record as it may be released."""
        if not self.restricted:
            return record
        train = record["kind"] == "train"
        allowed = TRAIN_RELEASE if train else EVAL_RELEASE
        if self.fixed_cohort:
            allowed = allowed | {"clients"}
            if train and not self.compressed:
                allowed = allowed | BYTES_RELEASE
        return {k: v for k, v in record.items() if k in allowed}

    def summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The run summary as it may be released, with ``private`` under DP."""
        if self.mechanism == "none":
            return summary
        if self.diagnostics:
            return {**summary, "private": False, "not_private_reason": NOT_PRIVATE_REASON}
        return {**{k: v for k, v in summary.items() if k in SUMMARY_RELEASE}, "private": True}

    def info(self, info: dict[str, Any]) -> dict[str, Any]:
        """Run info for the trackers: under DP the dataset is only named and counted (its
        summary holds size and label statistics of the clients' data)."""
        if not self.restricted:
            return info
        ds = info.get("dataset", {})
        return {**info, "dataset": {k: ds[k] for k in ("name", "num_clients") if k in ds}}

    def warn(self) -> None:
        """Warn when a DP run releases diagnostics; call once when a run starts."""
        if self.mechanism != "none" and self.diagnostics:
            warnings.warn(
                f"this run is not private: {NOT_PRIVATE_REASON}", NotPrivateWarning, stacklevel=3
            )
