"""The channel on the Flower wire: what a node's client half sends, and how the server reads it.

A node runs :meth:`RoundChannel.client_half <fedkin.channel.runtime.RoundChannel.client_half>`
on its own message (a cohort of one) and replies with

* ``"message"`` (``ArrayRecord``): the message tree as float32 — without the model delta when
  the delta went compressed;
* ``"uplink"`` (``ArrayRecord``): the compressed delta, the encoder's exact bytes as a uint8
  array (``"delta"``), plus under central DP the clip factor min(1, C/‖m‖) as float64
  (``"scale"``: the release is the decoded delta times it); and ``"uplink-spec"``
  (``ConfigRecord``): the delta's leaf names and shapes, so the server can unflatten it.

The server decodes with the same compressor (the randomness of random-k is regenerated from
(seed, round, client)) and counts the bytes it received exactly as the in-process client half
counts them, so records agree across runtimes. Keys an algorithm packs itself
(:class:`~fedkin.channel.runtime.WireCodec`, FedKSeed's per-seed scalars) travel in
``"message"`` as float32 (what the codec decodes them to, exactly) and are counted as the length
of their encoding, as in-process.

**Omniscient attacks** (sign flip of the honest mean, ALIE, IPM, mimic) see the round's honest
messages, which no single node holds. The attack is a simulation, so the server plays the
adversary: a Byzantine client's node sends its raw trained message (after its momentum step, the
node's own state), an honest node adds its raw message (its momentum, if the channel has one) as
``"adversary-view"`` (not counted as uplink), and the server runs the client half for
the Byzantine rows with the adversary's residuals (:func:`adversary_rows`). Non-omniscient
attacks (scaled, Gaussian, NaN/Inf, label flip) run on the Byzantine node itself.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from fedkin.channel.flat import TreeSpec, flatten, unflatten
from fedkin.channel.pipeline import MODEL_KEY
from fedkin.channel.runtime import RoundChannel, Uplink
from fedkin.core.tree import Tree, tree_map

CHANNEL_KEY = "fedkin-channel"  # the node's context.state entry: its residual and momentum


def _row(tree: Tree) -> Tree:
    return tree_map(lambda t: t[0], tree)


def pack(up: Uplink) -> dict[str, Any]:
    """The reply records of a node's client half (a cohort of one)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedkin.backends.flower_app import tree_to_record

    message = _row(up.messages)
    buffer = up.buffers[0] if up.buffers else None
    if buffer is None:
        return {"message": tree_to_record(message)}
    rest = {k: v for k, v in message.items() if k != MODEL_KEY}
    _, spec = flatten(up.messages[MODEL_KEY])
    arrays = ArrayRecord()
    arrays["delta"] = Array.from_numpy_ndarray(np.frombuffer(buffer, dtype=np.uint8).copy())
    if up.scales is not None:
        arrays["scale"] = Array.from_numpy_ndarray(up.scales[:1].numpy())
    leaves = [[list(path), list(shape)] for path, shape in spec.leaves]
    return {
        "message": tree_to_record(rest),
        "uplink": arrays,
        "uplink-spec": ConfigRecord({"spec": json.dumps(leaves)}),
    }


def unpack(content, channel: RoundChannel, round_: int, client: int) -> tuple[Tree, float]:
    """The message the server receives from one reply, and the bytes it cost."""
    from fedkin.backends.flower_app import record_to_tree

    message = record_to_tree(content["message"])
    nbytes = channel.packed_bytes(message)
    if "uplink" not in content:
        return message, nbytes
    arrays = content["uplink"]
    buffer = arrays["delta"].numpy().tobytes()
    spec = TreeSpec(
        tuple((tuple(p), tuple(s)) for p, s in json.loads(content["uplink-spec"]["spec"]))
    )
    flat = channel.compressor.decode(buffer, spec.size, round_, client).to(torch.float32)
    nbytes += len(buffer)
    if "scale" in arrays:
        scale = torch.from_numpy(arrays["scale"].numpy().copy())
        flat = flat * scale.to(flat.dtype)
        nbytes += 8
    message[MODEL_KEY] = unflatten(flat, spec)
    return message, nbytes
