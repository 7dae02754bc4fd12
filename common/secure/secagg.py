"""Secure summation (SecAgg, Bonawitz et al. 2017) of fixed-point vectors, from Flower's primitives.

Every part of fedmerge's merge is a weighted sum over sites, so the server never needs
one site's values: each site adds masks to its quantised vector that cancel in the sum.
This module holds the pieces both sides share, tensors in and tensors out:

- **Fixed point.** Each segment of the vector (a tensor) has a scale agreed before any
  masking, from declared bounds: a value is ``round(x * scale)`` as a signed 64-bit
  integer, viewed as ``uint64``; sums wrap modulo 2^64 and are read back as ``int64``.
  The scale leaves room for the sum of every site, so nothing overflows; the rounding
  error of the decoded sum is at most ``K / (2 * scale)`` per element for K sites.
- **Masks.** Pairwise masks from an ECDH agreement (Flower's ``generate_shared_key``) and
  a self mask from a random seed, expanded by AES-CTR (the ``cryptography`` library).
  Flower's own ``pseudo_rand_gen`` seeds NumPy's RandomState with 32 bits of the key,
  which a server could search exhaustively, so it is not used.
- **Dropouts.** The self-mask seed and the mask key are split by Shamir's scheme
  (Flower's ``create_shares``/``combine_shares``), each share encrypted (Flower's
  ``encrypt``) to one other site; any ``threshold`` sites can remove the masks of a site
  that sent its masked vector and then vanished, or of one that vanished before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key

__all__ = [
    "SecureLayout",
    "SiteSecrets",
    "decode_sum",
    "encode",
    "mask_stream",
    "masked_input",
    "pairwise_mask",
    "public_key_bytes",
    "self_mask",
    "unmask",
]

_CURVE = ec.SECP384R1()
_HEADROOM_BITS = 62  # |sum of every site| < 2^62 < 2^63: the int64 reading never wraps


@dataclass(frozen=True)
class SecureLayout:
    """The vector's segments (name and length) and each segment's fixed-point scale."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    scales: tuple[float, ...]
    room: float  # the largest fixed-point magnitude one site's value may have

    @classmethod
    def from_bounds(
        cls, names: Sequence[str], sizes: Sequence[int], bounds: Sequence[float], sites: int
    ) -> SecureLayout:
        """Scales such that ``sites`` values within ``bounds`` sum within 2^62 in magnitude."""
        if sites < 1 or any(not (b > 0 and math.isfinite(b)) for b in bounds):
            raise ValueError(f"a secure layout needs sites >= 1 and positive finite bounds, got {sites}, {bounds}")
        room = 2.0 ** (_HEADROOM_BITS - math.ceil(math.log2(sites + 1)))
        return cls(tuple(names), tuple(int(s) for s in sizes), tuple(room / b for b in bounds), room)

    @property
    def length(self) -> int:
        return sum(self.sizes)

    def error_bound(self, sites: int) -> tuple[float, ...]:
        """The largest absolute error of a decoded sum of ``sites`` vectors, per segment.

        Each site's value is rounded to the grid (half a step) after a float64 product
        (2^-53 of at most ``room`` steps), and the sum is read back through float64 (2^-53
        of at most ``sites * room`` steps): at most sites * (0.5 + room * 2^-52) steps.
        """
        return tuple(sites * (0.5 + self.room * 2.0**-52) / s for s in self.scales)

    def relative_error_bound(self, sites: int) -> float:
        """The same bound as a share of each segment's agreed bound on one site's values."""
        return sites * (0.5 + self.room * 2.0**-52) / self.room


def encode(segments: Sequence[np.ndarray], layout: SecureLayout) -> np.ndarray:
    """One site's values as fixed-point integers (uint64); refuses a value outside its segment's bound."""
    if len(segments) != len(layout.sizes):
        raise ValueError(f"{len(segments)} segments for a layout of {len(layout.sizes)}")
    out = np.empty(layout.length, dtype=np.uint64)
    offset = 0
    for name, values, size, scale in zip(layout.names, segments, layout.sizes, layout.scales, strict=True):
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if flat.size != size:
            raise ValueError(f"segment {name!r} has {flat.size} values, the layout {size}")
        scaled = np.rint(flat * scale)
        if not np.all(np.isfinite(scaled)) or np.any(np.abs(scaled) > layout.room):
            raise ValueError(
                f"segment {name!r}: a value is not finite or beyond the agreed bound {layout.room / scale:.3g}"
            )
        out[offset : offset + size] = scaled.astype(np.int64).view(np.uint64)
        offset += size
    return out


def decode_sum(total: np.ndarray, layout: SecureLayout) -> list[np.ndarray]:
    """The unmasked sum (uint64, modulo 2^64) back to float64 segments."""
    signed = total.view(np.int64).astype(np.float64)
    out, offset = [], 0
    for size, scale in zip(layout.sizes, layout.scales, strict=True):
        out.append(signed[offset : offset + size] / scale)
        offset += size
    return out


def mask_stream(key: bytes, length: int, nonce: bytes = b"\x00" * 16) -> np.ndarray:
    """``length`` pseudo-random uint64 values from a 32-byte key: AES-256 in counter mode over zeros."""
    raw = key if len(key) == 32 else _key32(key)
    encryptor = Cipher(algorithms.AES(raw), modes.CTR(nonce)).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)) + encryptor.finalize(), dtype=np.uint64).copy()


def _key32(material: bytes) -> bytes:
    """A 32-byte AES key from key material of another length (Flower's shared keys are base64 text)."""
    import base64
    import hashlib

    try:
        decoded = base64.urlsafe_b64decode(material)
        if len(decoded) == 32:
            return decoded
    except ValueError:
        pass
    return hashlib.sha256(material).digest()


@dataclass
class SiteSecrets:
    """One site's key pairs and self-mask seed for one secure sum (never sent in the clear)."""

    share_key: ec.EllipticCurvePrivateKey  # encrypts the Shamir shares sent to each other site
    mask_key: ec.EllipticCurvePrivateKey  # agrees the pairwise masks
    seed: bytes  # the self mask's seed

    @classmethod
    def generate(cls) -> SiteSecrets:
        return cls(ec.generate_private_key(_CURVE), ec.generate_private_key(_CURVE), os.urandom(32))

    def to_bytes(self) -> dict[str, bytes]:
        return {"share-key": _private_bytes(self.share_key), "mask-key": _private_bytes(self.mask_key),
                "seed": self.seed}  # fmt: skip

    @classmethod
    def from_bytes(cls, data: Mapping[str, bytes]) -> SiteSecrets:
        load = serialization.load_der_private_key
        return cls(load(data["share-key"], None), load(data["mask-key"], None), data["seed"])  # type: ignore[arg-type]

    def public(self) -> tuple[bytes, bytes]:
        return public_key_bytes(self.share_key), public_key_bytes(self.mask_key)

    def shares_for(
        self, peers: Sequence[int], threshold: int, own_id: int, share_public: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        """Shamir shares of (seed, mask key), one encrypted to each peer (the peers include this site)."""
        seeds = create_shares(self.seed, threshold, len(peers))
        keys = create_shares(_private_bytes(self.mask_key), threshold, len(peers))
        out = {}
        for peer, seed_share, key_share in zip(peers, seeds, keys, strict=True):
            plain = _pack(own_id, peer, seed_share, key_share)
            shared = generate_shared_key(self.share_key, _load_public(share_public[peer]))
            out[peer] = encrypt(shared, plain)
        return out

    def open_share(
        self, sender: int, ciphertext: bytes, sender_share_public: bytes, own_id: int
    ) -> tuple[bytes, bytes]:
        """(seed share, mask-key share) another site sent this one; checks it was meant for it."""
        shared = generate_shared_key(self.share_key, _load_public(sender_share_public))
        src, dst, seed_share, key_share = _unpack(decrypt(shared, ciphertext))
        if (src, dst) != (sender, own_id):
            raise ValueError(f"a share from node {sender} claims to be from {src} to {dst}")
        return seed_share, key_share


def public_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key")
    return key


def _pack(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    return b"".join([src.to_bytes(8, "little"), dst.to_bytes(8, "little"), len(seed_share).to_bytes(4, "little"),
                     seed_share, key_share])  # fmt: skip


def _unpack(data: bytes) -> tuple[int, int, bytes, bytes]:
    n = int.from_bytes(data[16:20], "little")
    return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little"), data[20 : 20 + n], data[20 + n :]


def pairwise_mask(
    mask_key: ec.EllipticCurvePrivateKey, own_id: int, peer: int, peer_public: bytes, length: int
) -> np.ndarray:
    """The mask this site adds for ``peer``: +stream if own_id < peer, -stream otherwise; the pair's cancel."""
    stream = mask_stream(generate_shared_key(mask_key, _load_public(peer_public)), length)
    return stream if own_id < peer else (np.uint64(0) - stream)


def self_mask(seed: bytes, length: int) -> np.ndarray:
    return mask_stream(seed, length, nonce=b"\x01" * 16)


def masked_input(
    values: np.ndarray, secrets: SiteSecrets, own_id: int, peers_mask_public: Mapping[int, bytes]
) -> np.ndarray:
    """y = x + self mask + pairwise masks (mod 2^64) against every other peer of the sum."""
    out = values + self_mask(secrets.seed, values.size)
    for peer, public in peers_mask_public.items():
        if peer != own_id:
            out += pairwise_mask(secrets.mask_key, own_id, peer, public, values.size)
    return out


def unmask(
    total: np.ndarray,
    survivors: Sequence[int],
    dropped: Sequence[int],
    seed_shares: Mapping[int, list[bytes]],
    key_shares: Mapping[int, list[bytes]],
    mask_public: Mapping[int, bytes],
) -> np.ndarray:
    """Σ x over the survivors from Σ y: remove each survivor's self mask (its seed rebuilt from shares)
    and each dropped site's pairwise masks with the survivors (its mask key rebuilt from shares)."""
    out = total.copy()
    for node in survivors:
        out -= self_mask(combine_shares(seed_shares[node]), out.size)
    for node in dropped:
        key = serialization.load_der_private_key(combine_shares(key_shares[node]), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        for peer in survivors:
            # the survivor added its pair mask with the dropped site: pairwise_mask(peer, node) = -(node, peer)
            out += pairwise_mask(key, node, peer, mask_public[peer], out.size)
    return out
