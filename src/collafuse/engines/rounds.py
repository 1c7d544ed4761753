"""The order of a training round, written once for every engine.

A round: the engine's :class:`Transport` asks the clients for round r, then collects what they
sent the server (the client steps run in between: in-process when collected, on a Flower node
as soon as it is asked); the server takes one step per batch index on the union of the
clients' messages of that index, clients in the run's one order; then the engine's
:class:`Keeper` writes the round's metrics, checkpoints and reports progress. The next round's
requests go out as soon as this round's replies are in, so remote clients train while the
server does. Both engines go through :func:`run_rounds`, which is why they give the same models
under the same seed; adding an engine means writing a transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..messages import Message


@dataclass
class ClientReplies:
    """What the clients sent the server in one round, in the run's client order."""

    messages: dict[str, list[Message]]  # client id -> its K server-bound messages
    losses: dict[str, Any]  # client id -> its loss: a 0-d tensor in-process, a node's float
    nbytes: dict[str, int]  # client id -> bytes of its messages
    problems: dict[str, str] = field(default_factory=dict)  # client id -> why it is left out


class Transport(Protocol):
    def request(self, rnd: int) -> None:
        """Ask every client for round ``rnd``; may return before any has answered."""

    def replies(self, rnd: int) -> ClientReplies:
        """What the clients sent for round ``rnd`` (waits for them)."""


class Keeper(Protocol):
    """What an engine keeps of its rounds (each engine its own run folder)."""

    def record(self, rnd: int, replies: ClientReplies, server_losses: list) -> None:
        """The round's metrics (and whatever the engine tracks)."""

    def checkpoint(self, rnd: int, final: bool) -> None:
        """Save the run when due; always when ``final``."""

    def progress(self, rnd: int) -> None:
        """Tell the user round ``rnd`` is done."""


def server_step(server, replies: ClientReplies, batches: int) -> list:
    """One server step per batch index on the union of the clients' messages of that index;
    the steps' losses (None where no message held a server-owned sample)."""
    if not replies.messages:
        return []
    return [server.train_step([msgs[k] for msgs in replies.messages.values()])
            for k in range(batches)]


def run_rounds(server, transport: Transport, keeper: Keeper, done: int, until: int,
               batches: int) -> int:
    """Rounds ``done`` + 1 .. ``until``; returns the last round done.

    The metrics line is written before the checkpoint: a line of a round the checkpoint does
    not hold is dropped on resume, a checkpoint without its line would leave a gap."""
    if done < until:
        transport.request(done + 1)
    for rnd in range(done + 1, until + 1):
        replies = transport.replies(rnd)
        if rnd < until:  # pipelined: remote clients start the next round now
            transport.request(rnd + 1)
        losses = server_step(server, replies, batches)
        keeper.record(rnd, replies, losses)
        keeper.checkpoint(rnd, final=rnd == until)
        keeper.progress(rnd)
    return max(done, until)
