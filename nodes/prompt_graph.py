"""ComfyUI's API prompt (the graph a node receives through its hidden PROMPT input), read as a graph: which nodes a
node's output reaches. A node can then check, before the costly part of a graph runs, what the nodes after it need."""
from __future__ import annotations


def _is_link(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)


def fed_by(prompt: dict, node_id, output: int) -> list[str]:
    """Ids of the nodes that output `output` of node `node_id` feeds, directly or through other nodes."""
    node_id, found = str(node_id), []
    grown = True
    while grown:
        grown = False
        for nid, node in prompt.items():
            if nid in found or not isinstance(node, dict):
                continue
            for value in (node.get("inputs") or {}).values():
                if _is_link(value) and ((str(value[0]) == node_id and value[1] == output) or str(value[0]) in found):
                    found.append(nid)
                    grown = True
                    break
    return found
