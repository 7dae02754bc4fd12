"""Messages of a run, built and read on the server: the Flower ``Message`` factory and what a reply claims."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from common.updates.wire import claimed_examples, numpy_to_array

__all__ = ["MessageFactory", "claimed_weight", "flower_message", "node_names", "state_record"]

MessageFactory = Callable[[RecordDict, int, str, str], Message]


def flower_message(content: RecordDict, node_id: int, message_type: str, group_id: str) -> Message:
    """A message to one node; only possible inside a Flower run (tests pass their own factory)."""
    return Message(content=content, dst_node_id=node_id, message_type=message_type, group_id=group_id)


def claimed_weight(reply: Message) -> int | None:
    """A reply's claimed number of examples, if it can be read: weights must be known before capping."""
    if reply.has_error():
        return None
    try:
        return claimed_examples(reply.content)
    except Exception:  # an unreadable reply is refused later, with its reason, by the intake
        return None


def node_names(grid: Grid) -> dict[int, str]:
    """Names given at registration (``flwr supernode register --name``): they label nodes that never reply."""
    get_nodes = getattr(grid, "get_nodes", None)  # test doubles may only list ids
    return {int(n.node_id): str(getattr(n, "name", "")) for n in get_nodes()} if get_nodes else {}


def state_record(items: Iterable[tuple[str, Tensor]]) -> ArrayRecord:
    """An ArrayRecord built one tensor at a time, as ``ArrayRecord(state_dict)`` does without a whole dict."""
    record = ArrayRecord()
    for key, tensor in items:
        record[key] = numpy_to_array(tensor.detach().cpu().numpy())
    return record
