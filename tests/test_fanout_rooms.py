"""The fan-out manager's room bookkeeping (server/realtime/fanout.py) is python-socketio's, in O(1).

It indexes each client's rooms and keeps pending connects and disconnects in sets instead of lists;
driven through the same random sequences of connects, room changes and disconnects, it must leave
exactly the state python-socketio's own manager leaves.
"""

from __future__ import annotations

import random

import pytest
import socketio

from server.realtime.fanout import FanoutManager

NAMESPACES = ("/", "/assistant")
ROOMS = ("market", "user:1", "user:2", "chain:blocks")


def state(manager: socketio.AsyncManager, sids: list[tuple[str, str]]) -> dict:
    """Everything the manager answers about its clients, in plain types."""
    return {
        "rooms": {ns: {room: dict(members) for room, members in rooms.items()}
                  for ns, rooms in manager.rooms.items()},
        "pending_connect": {ns: frozenset(s) for ns, s in manager.pending_connect.items()},
        "pending_disconnect": {ns: frozenset(s) for ns, s in manager.pending_disconnect.items()},
        "awaiting_acks": frozenset(manager.callbacks),
        "connected": {(ns, sid): manager.is_connected(sid, ns) for ns, sid in sids},
        "client_rooms": {(ns, sid): frozenset(manager.get_rooms(sid, ns)) for ns, sid in sids},
    }


@pytest.mark.parametrize("seed", range(8))
async def test_rooms_and_pending_clients_match_python_socketio_through_random_churn(seed):
    managers = [socketio.AsyncManager(), FanoutManager()]
    for manager in managers:
        socketio.AsyncServer(client_manager=manager)
    rng = random.Random(seed)
    clients: list[tuple[str, str, str]] = []  # (namespace, eio sid, the sid each manager gave)
    sid_maps: list[dict[str, str]] = [{}, {}]  # a common name per client -> each manager's sid
    for step in range(600):
        action = rng.random()
        if action < 0.25 or not clients:
            namespace, name = rng.choice(NAMESPACES), f"c{step}"
            for manager, sids in zip(managers, sid_maps):
                sids[name] = await manager.pre_connect(f"eio{step}", namespace)
            clients.append((namespace, name, "pending"))
            continue
        index = rng.randrange(len(clients))
        namespace, name, phase = clients[index]
        if action < 0.4 and phase == "pending":
            op = "connect"
        elif action < 0.45:
            op = "await_ack"
        elif action < 0.65:
            op = "enter_room"
        elif action < 0.8:
            op = "leave_room"
        elif action < 0.88 and phase != "closing":
            op = "pre_disconnect"
        elif action < 0.97:
            op = "disconnect"
        else:
            op = "close_room"
        room = rng.choice(ROOMS)
        for manager, sids in zip(managers, sid_maps):
            sid = sids[name]
            if op == "connect":
                await manager.connect(sid, namespace)
            elif op == "await_ack":
                manager._generate_ack_id(sid, lambda *_: None)
            elif op == "enter_room":
                manager.basic_enter_room(sid, namespace, room)
            elif op == "leave_room":
                manager.basic_leave_room(sid, namespace, room)
            elif op == "pre_disconnect":
                manager.pre_disconnect(sid, namespace)
            elif op == "disconnect":
                await manager.disconnect(sid, namespace)
            else:
                await manager.close_room(room, namespace)
        if op == "connect":
            clients[index] = (namespace, name, "connected")
        elif op == "pre_disconnect":
            clients[index] = (namespace, name, "closing")
        elif op == "disconnect":
            clients.pop(index)
    expected, actual = (state(m, [(ns, sids[name]) for ns, name, _ in clients])
                        for m, sids in zip(managers, sid_maps))
    # The sids differ between managers (random ids); compare with each mapped to its client's name.
    names = [{sid: name for name, sid in sids.items()} for sids in sid_maps]
    assert rename(expected, names[0]) == rename(actual, names[1])
    assert actual["rooms"], "the churn left no client behind: the comparison would prove nothing"


def rename(value, names: dict[str, str]):
    """`value` with every sid replaced by its client's name."""
    if isinstance(value, dict):
        return {rename(k, names): rename(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset)):
        return type(value)(rename(v, names) for v in value)
    return names.get(value, value) if isinstance(value, str) else value
