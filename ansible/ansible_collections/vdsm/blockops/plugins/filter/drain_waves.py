# -*- coding: utf-8 -*-
# Copyright: (c) 2026, vdsm-blockops developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The drain role's plan for the nodes drained together (one C(serial)
batch): per node, its moves in waves, so that in every wave each node
starts at most C(limit) moves and each destination takes at most C(limit)
in all -- the waves of the nodes run side by side."""

from __future__ import annotations


def drain_waves(vms_by_node, destinations, limit):
    """``vms_by_node``: {node: [domain, ...]} (the running VMs of each node
    drained now, in order); returns {node: [[{domain, dest}, ...], ...]},
    every node with as many waves (an empty wave waits for the others)."""
    from ansible.errors import AnsibleFilterError

    limit = int(limit)
    destinations = list(destinations)
    if limit < 1:
        raise AnsibleFilterError("the limit of moves at a time must be 1 or more")
    if not destinations:
        raise AnsibleFilterError("no destination to drain onto")
    pending = {node: list(vms) for node, vms in vms_by_node.items()}
    waves = {node: [] for node in pending}
    turn = 0  # destinations are taken in turn across nodes and waves
    while any(pending.values()):
        load = dict.fromkeys(destinations, 0)
        wave = {node: [] for node in pending}
        placed = True
        while placed:  # one move per node at a time: nodes share the destinations fairly
            placed = False
            for node in pending:
                free = [d for d in (destinations[(turn + i) % len(destinations)]
                                    for i in range(len(destinations))) if load[d] < limit]
                if not pending[node] or len(wave[node]) >= limit or not free:
                    continue
                load[free[0]] += 1
                turn = (destinations.index(free[0]) + 1) % len(destinations)
                wave[node].append({"domain": pending[node].pop(0), "dest": free[0]})
                placed = True
        for node in pending:
            waves[node].append(wave[node])
    return waves


class FilterModule:
    def filters(self):
        return {"drain_waves": drain_waves}
