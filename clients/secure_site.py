"""A site's side of a secure sum, one Flower message per step, its secrets kept in the node's context.

1. ``advertise``: fresh key pairs and a self-mask seed; only the public keys (and the
   number of images) leave.
2. ``share_keys``: Shamir shares of the seed and of the mask key, each encrypted to one peer.
3. ``masked_input``: the site's vector (``common.secure.layout``) plus its masks: uniform noise
   to anyone who does not hold every other site's masks.
4. ``unmask``: for each peer the server says sent its vector, the share of its seed; for
   each peer it says vanished before that, the share of its mask key; never both for one peer.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from common.secure.secagg import SecureLayout, SiteSecrets, encode, masked_input

__all__ = ["advertise", "layout_from_config", "masked_input_reply", "share_keys", "unmask_reply"]

STATE = "secagg"  # the context.state record that holds this site's secrets between messages


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state:
        raise ValueError("no secure sum is in progress at this site (its secrets are gone)")
    return context.state[STATE]  # type: ignore[return-value]


def _secrets(state: ConfigRecord) -> SiteSecrets:
    return SiteSecrets.from_bytes({k: bytes(state[k]) for k in ("share-key", "mask-key", "seed")})  # type: ignore[arg-type]


def _by_node(record: ConfigRecord, prefix: str) -> dict[int, bytes]:
    return {int(k[len(prefix) :]): bytes(v) for k, v in record.items() if k.startswith(prefix)}


def advertise(context: Context, num_examples: int, domain: str) -> RecordDict:
    """Step 1: new secrets for this sum; the reply holds the two public keys and the image count."""
    secrets = SiteSecrets.generate()
    context.state[STATE] = ConfigRecord(secrets.to_bytes())
    share_public, mask_public = secrets.public()
    return RecordDict(
        {
            "keys": ConfigRecord({"share-public": share_public, "mask-public": mask_public}),
            "counts": MetricRecord({"num-examples": int(num_examples)}),
            "info": ConfigRecord({"domain": domain}),
        }
    )


def share_keys(context: Context, config: ConfigRecord) -> RecordDict:
    """Step 2: one encrypted share per participant (this site included), addressed by node id."""
    state = _state(context)
    secrets = _secrets(state)
    share_public = _by_node(config, "share-public:")
    mask_public = _by_node(config, "mask-public:")
    peers = sorted(share_public)
    if context.node_id not in peers or set(mask_public) != set(peers):
        raise ValueError("the participant list does not include this site or lacks keys")
    for node, key in mask_public.items():
        state[f"mask:{node}"] = key
    for node, key in share_public.items():
        state[f"share:{node}"] = key
    threshold = int(config["threshold"])
    ciphertexts = secrets.shares_for(peers, threshold, context.node_id, share_public)
    return RecordDict({"shares": ConfigRecord({f"to:{node}": ct for node, ct in ciphertexts.items()})})


def layout_from_config(config: ConfigRecord) -> SecureLayout:
    return SecureLayout(
        tuple(str(n) for n in config["layout-names"]),  # type: ignore[union-attr]
        tuple(int(s) for s in config["layout-sizes"]),  # type: ignore[union-attr]
        tuple(float(s) for s in config["layout-scales"]),  # type: ignore[union-attr]
        float(config["layout-room"]),  # type: ignore[arg-type]
    )


def masked_input_reply(context: Context, config: ConfigRecord, segments: list[np.ndarray]) -> RecordDict:
    """Step 3: keep the shares addressed to this site; send the masked vector."""
    state = _state(context)
    secrets = _secrets(state)
    share_public = _by_node(state, "share:")
    for sender, ciphertext in _by_node(config, "from:").items():
        seed_share, key_share = secrets.open_share(sender, ciphertext, share_public[sender], context.node_id)
        state[f"got-seed:{sender}"] = seed_share
        state[f"got-key:{sender}"] = key_share
    peers = [int(n) for n in config["participants"]]  # type: ignore[union-attr]
    mask_public = {n: k for n, k in _by_node(state, "mask:").items() if n in peers}
    masked = masked_input(encode(segments, layout_from_config(config)), secrets, context.node_id, mask_public)
    return RecordDict({"masked": ArrayRecord({"y": Array.from_numpy_ndarray(masked)})})


def unmask_reply(context: Context, config: ConfigRecord) -> RecordDict:
    """Step 4: seed shares of the peers that sent their vector, key shares of those that did not."""
    state = _state(context)
    survivors = {int(n) for n in config["survivors"]}  # type: ignore[union-attr]
    dropped = {int(n) for n in config["dropped"]}  # type: ignore[union-attr]
    if survivors & dropped:
        raise ValueError("the server asked for both shares of one site; refusing (it would reveal its vector)")
    seeds, keys = _by_node(state, "got-seed:"), _by_node(state, "got-key:")
    out = {f"seed:{n}": seeds[n] for n in survivors if n in seeds}
    out.update({f"key:{n}": keys[n] for n in dropped if n in keys})
    del context.state[STATE]  # this sum is over: nothing of it stays at the site
    return RecordDict({"shares": ConfigRecord(out)})
