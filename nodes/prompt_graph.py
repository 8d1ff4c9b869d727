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


# Inputs that pass a CONDITIONING on from output 0 of the nodes that edit one (Apply ControlNet old and new,
# ConditioningSetArea, ...): followed back to the text encoder that made it.
_CONDITIONING_INPUTS = ("conditioning", "positive", "conditioning_to")


def conditioning_text(prompt: dict, node_id, input_name: str) -> str | None:
    """The prompt text the CONDITIONING at input `input_name` of node `node_id` was encoded from (a CONDITIONING
    itself carries no text): found by following the links back to a node with a literal `text` input (CLIP Text
    Encode). None when the graph does not say (a text from another node's output, a combined conditioning)."""
    if not isinstance(prompt, dict):
        return None
    node, name, seen = prompt.get(str(node_id)), input_name, set()
    while isinstance(node, dict):
        link = (node.get("inputs") or {}).get(name)
        if not _is_link(link) or str(link[0]) in seen:
            return None
        seen.add(str(link[0]))
        node = prompt.get(str(link[0]))
        inputs = (node or {}).get("inputs") or {}
        if isinstance(inputs.get("text"), str):
            return inputs["text"]
        if link[1] == 1 and "negative" in inputs:  # Apply ControlNet (advanced) passes its negative on output 1
            name = "negative"
        else:
            name = next((n for n in _CONDITIONING_INPUTS if _is_link(inputs.get(n))), None)
        if name is None:
            return None
    return None
