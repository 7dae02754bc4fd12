"""The one merge engine: every entry point folds site updates into the same sums, by one spec.

``ingest`` checks one site's update whole and then folds it in, or refuses it with the
reason and leaves every sum as it was; the caller may drop the update right away, so a
server holds the sums and one update at most. ``pool_sums`` does the same for the
recalibration round's BN sums. ``save`` writes the merged model tensor by tensor
straight from the sums. The ServerApp's strategies, ``fedmerge merge`` and
``fedmerge compare`` are thin adapters over this class.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.bn.bank import BNBank, bank_to_checkpoint
from common.bn.stats import BNSums, CountProfile
from common.merge.bn_pooling import BufferMerger, MomentPool, capped_shares, moments_of_sums, statistics_buffers
from common.merge.methods import build_param_merger
from common.merge.spec import MergeSpec
from common.merge.sums import CHUNK, flat_numpy
from common.models.checkpoints import checkpoint_metadata, write_safetensors
from common.updates.site import SiteUpdate, bn_layer_names, split_state
from common.updates.validation import UpdateRejected, validate_sums, validate_update

__all__ = ["Accepted", "MergeEngine", "Refused"]

_MAX_WEIGHT = float(2**62)


@dataclass(frozen=True)
class Accepted:
    """A site folded into the merge, with what it counted for."""

    site: str
    num_examples: int
    bn_values: int  # values per channel behind its first BN layer's statistics
    weight: float  # its weight in the parameter sums (after any cap)
    clip_scale: float  # 1, or the factor its parameter change was scaled by


@dataclass(frozen=True)
class Refused:
    """A site kept out of the merge; the sums are as they were before it."""

    site: str
    reason: str


class MergeEngine:
    """Streaming merge of site updates by one :class:`MergeSpec`.

    ``template`` is the shared starting model: its keys, shapes and dtypes are what an
    update must match, and its values are θ₀ for the methods on task vectors and for
    the norm clip. ``profile`` lets each update's BN counts be checked against each
    other as the architecture relates them.
    """

    def __init__(self, spec: MergeSpec, template: Mapping[str, Tensor], profile: CountProfile | None = None) -> None:
        if not spec.options.streaming:
            raise ValueError(
                f"merge method {spec.method!r} needs every model at once; this engine merges one at a time"
            )
        self.spec = spec
        self.template = dict(template)
        self.profile = profile  # how the architecture relates the BN counts (bn_count_profile)
        params, _ = split_state(self.template)
        self._slots = [(k, tuple(v.shape), v.dtype) for k, v in params.items()]
        self._slot_index = {key: i for i, (key, _, _) in enumerate(self._slots)}
        self.params = build_param_merger(spec, self._slots, self.template if spec.needs_base else None)
        self.buffers = BufferMerger(self.template, spec.buffers, spec.equal_site_stats, spec.max_share)
        self.layers = bn_layer_names(self.template)
        self._channels = {layer: self.template[f"{layer}.running_mean"].numel() for layer in self.layers}
        self.accepted: list[Accepted] = []
        self.recalibration = MomentPool(gaussian=True, max_share=spec.max_share)
        self.recalibrated_sites: list[str] = []
        self._override: dict[str, Tensor] = {}
        self._weight_scale: tuple[float, float] | None = None  # (alpha, cap): share = min(alpha * w, cap)

    @property
    def sites(self) -> list[str]:
        return [a.site for a in self.accepted]

    # ----- weights ---------------------------------------------------------------------
    def expect_weights(self, weights: Sequence[float]) -> None:
        """Declare every site's claimed weight before the first update, so ``max_share`` can cap them.

        A streaming sum cannot re-weight a site once folded in; knowing the claims up
        front (every file's header, a census round) lets each be capped on arrival.
        """
        w = np.asarray([self._checked_weight(x, "declared") for x in weights], dtype=np.float64)
        if w.size == 0:
            raise ValueError("no weights declared")
        cap = max(self.spec.max_share, 1.0 / w.size)
        shares = capped_shares(w, cap)
        free = shares < cap
        alpha = float((shares[free] / w[free]).max()) if free.any() else cap / float(w.min())
        self._weight_scale = (alpha, cap)

    @staticmethod
    def _checked_weight(weight: float, what: str) -> float:
        """A weight the float64 sums can carry: positive, finite and at most 2^62 (any count fits)."""
        if not (isinstance(weight, int | float) and math.isfinite(weight) and 0 < weight <= _MAX_WEIGHT):
            raise ValueError(f"{what} weight must be a number in (0, 2^62], got {weight!r}")
        return float(weight)

    def _weight(self, update: SiteUpdate, weight: float | None) -> float:
        if self.spec.weighting == "uniform":
            return 1.0
        raw = float(update.num_examples) if self.spec.weighting == "counts" else weight
        if raw is None:
            raise ValueError("explicit weighting needs a weight with every update")
        w = self._checked_weight(raw, "the site's")
        if self._weight_scale is None:
            if self.spec.max_share < 1.0:
                raise ValueError("max-share with non-uniform weights needs every weight declared first")
            return w
        alpha, cap = self._weight_scale
        return min(alpha * w, cap)

    # ----- first round -----------------------------------------------------------------
    def ingest(self, update: SiteUpdate, weight: float | None = None) -> Accepted | Refused:
        """Check ``update`` whole, then fold it in; on any problem refuse it and change nothing."""
        try:
            validate_update(update, self.template, self.profile)
            w = self._weight(update, weight)
            scale = self._clip_scale(update) if self.spec.clip_norm > 0 else 1.0
            moments = self.buffers.moments(update, w)
        except (UpdateRejected, ValueError, KeyError, TypeError, OverflowError) as exc:
            return Refused(update.site, str(exc).strip("'\""))
        self.params.add(update.params, w, scale, update.site)
        self.buffers.add(update, moments)
        first = self.layers[0] if self.layers else None
        bn_values = int(update.counts[first].reshape(-1)[0]) if first else 0
        entry = Accepted(update.site, update.num_examples, bn_values, w, scale)
        self.accepted.append(entry)
        return entry

    def _clip_scale(self, update: SiteUpdate) -> float:
        """min(1, C / ‖θ - θ₀‖) over the parameters, in float64, chunk by chunk."""
        total = 0.0
        for key, _, _ in self._slots:
            theta, theta0 = flat_numpy(update.params[key]), flat_numpy(self.template[key])
            for start in range(0, theta.size, CHUNK):
                diff = theta[start : start + CHUNK].astype(np.float64) - theta0[start : start + CHUNK]
                total += float(np.dot(diff, diff))
        norm = math.sqrt(total)
        return 1.0 if norm <= self.spec.clip_norm else self.spec.clip_norm / norm

    # ----- second round ----------------------------------------------------------------
    def pool_sums(self, site: str, sums: Mapping[str, BNSums]) -> Refused | None:
        """Take one site's recalibration sums (checked whole first); None when accepted."""
        try:
            validate_sums(site, sums, self._channels)
            moments = moments_of_sums(sums, self.layers, self.spec.equal_site_stats)
        except (UpdateRejected, ValueError, KeyError, TypeError, OverflowError) as exc:
            return Refused(site, str(exc).strip("'\""))
        self.recalibration.add(site, moments)
        self.recalibrated_sites.append(site)
        return None

    def apply_recalibration(self) -> dict[str, Tensor]:
        """Use the pooled recalibration statistics from now on; returns those BN buffers."""
        self._override = statistics_buffers(self.template, self.layers, *self.recalibration.combine())
        return dict(self._override)

    def bank(self, source: str, image_weight: float = 0.0) -> BNBank:
        """BN statistics to ship as a bank: ``own`` (each site's exact statistics under its own parameters,
        one-shot), ``recalibrated`` (each site's under the merged parameters, the second round's) or
        ``merged`` (one entry, the merge's own statistics); ``image_weight`` is each test image's share
        of its own statistics in its normalisation (``common.bn.bank``)."""
        if not self.layers:
            raise ValueError("the model has no BN layers, so a BN bank has nothing to hold; leave bn-bank off")
        if source == "merged":
            return BNBank.single("merged", self.merged_buffers(), image_weight)
        pool = {"own": self.buffers.pool, "recalibrated": self.recalibration}.get(source)
        if pool is None:
            raise ValueError(f"a BN bank comes from 'own', 'recalibrated' or 'merged' statistics, not {source!r}")
        if not len(pool):
            raise ValueError(f"no {source} BN statistics to make a bank of")
        names, means, variances = zip(*pool.per_site(), strict=True)
        mean, var = {}, {}
        for site_mean, site_var in zip(means, variances, strict=True):
            for key, value in statistics_buffers(self.template, self.layers, site_mean, site_var).items():
                layer, _, leaf = key.rpartition(".")
                (mean if leaf == "running_mean" else var).setdefault(layer, []).append(value.reshape(-1))
        stack = {layer: torch.stack(values) for layer, values in mean.items()}
        return BNBank(tuple(names), stack, {layer: torch.stack(values) for layer, values in var.items()}, image_weight)

    # ----- the result ------------------------------------------------------------------
    def merged_buffers(self) -> dict[str, Tensor]:
        """The merged BN buffers alone (small): statistics and batch counts."""
        return {**self.buffers.merged(), **self._override}

    def iter_result(self) -> Iterator[tuple[str, Tensor]]:
        """The merged state dict one tensor at a time, in the template's order and dtypes."""
        if not self.accepted:
            raise ValueError("nothing to merge: no site update was accepted")
        buffers = self.merged_buffers()
        for key, value in self.template.items():
            if key in self._slot_index:
                yield key, self.params.value(self._slot_index[key])
            elif key in buffers:
                yield key, buffers[key].to(value.dtype).reshape(value.shape)
            else:
                raise KeyError(f"merged model lacks {key!r}")

    def result(self) -> dict[str, Tensor]:
        return dict(self.iter_result())

    def save(
        self,
        path: str | Path,
        arch: str,
        num_classes: int,
        extra: Mapping[str, str] | None = None,
        bank: BNBank | None = None,
    ) -> Path:
        """Write the merged ``checkpoint/1`` file tensor by tensor, straight from the sums (and a BN bank)."""
        layout = {k: (tuple(v.shape), v.dtype) for k, v in self.template.items()}
        meta = checkpoint_metadata(arch, num_classes, {"merged_from": ",".join(self.sites), **(extra or {})})
        tensors: Iterator[tuple[str, Tensor]] = self.iter_result()
        if bank is not None:
            extra_tensors, bank_meta = bank_to_checkpoint(bank)
            layout.update({k: (tuple(v.shape), v.dtype) for k, v in extra_tensors.items()})
            meta.update(bank_meta)
            tensors = itertools.chain(tensors, extra_tensors.items())
        return write_safetensors(path, layout, tensors, meta)

    def release(self) -> None:
        """Free the sums once the result is written."""
        self.params.release()
