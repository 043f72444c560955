"""Flatten and rebuild ``grads`` (SPEC §2).

``grads`` is a single array, a sequence or other iterable of arrays, or nested
dicts / lists / tuples of arrays with ``None`` leaves. Leaves come out depth-first,
dicts in insertion order; ``None`` leaves are skipped. ``flatten`` also returns a
``treedef`` from which ``unflatten`` rebuilds the same structure around new
leaves, and ``path`` names a leaf for error messages (``grads['enc'][1]``).
"""

import numpy as np

class _Marker:
    """A treedef placeholder that pickles by name, so treedefs can be checkpointed."""

    def __init__(self, name):
        self._name = name

    def __reduce__(self):
        return self._name

    def __repr__(self):
        return self._name


_LEAF = _Marker("_LEAF")
_NONE = _Marker("_NONE")


def _is_array_like(obj):
    return (
        isinstance(obj, (np.ndarray, np.generic))
        or hasattr(obj, "__array_interface__")
        or hasattr(obj, "__cuda_array_interface__")
        or hasattr(obj, "__dlpack__")
    )


def list_of_leaves(n):
    """The treedef of a list of ``n`` arrays."""
    return (list, None, [_LEAF] * n)


def flatten(grads):
    """Return ``(leaves, treedef)``; a top-level iterator is consumed once."""
    leaves = []
    if not isinstance(grads, (dict, list, tuple)) and not _is_array_like(grads) and grads is not None:
        if hasattr(grads, "__iter__") and not isinstance(grads, (str, bytes)):
            grads = list(grads)
    return leaves, _walk(grads, leaves)


def _walk(node, leaves):
    if node is None:
        return _NONE
    if isinstance(node, dict):
        return (type(node), list(node), [_walk(v, leaves) for v in node.values()])
    if isinstance(node, (list, tuple)):
        return (type(node), None, [_walk(v, leaves) for v in node])
    leaves.append(node)
    return _LEAF


def unflatten(treedef, leaves):
    """Rebuild the structure of ``treedef`` with ``leaves`` in leaf order."""
    return _build(treedef, iter(leaves))


def _build(treedef, leaves):
    if treedef is _LEAF:
        return next(leaves)
    if treedef is _NONE:
        return None
    kind, keys, children = treedef
    values = [_build(child, leaves) for child in children]
    if keys is not None:
        return kind(zip(keys, values))
    if kind is tuple or kind is list:
        return kind(values)
    if hasattr(kind, "_fields"):  # namedtuple
        return kind(*values)
    return kind(values)


def path(treedef, position, root="grads"):
    """The path of leaf number ``position``, e.g. ``grads['enc'][1]``."""
    found = _find(treedef, position, [0])
    return root + "".join(f"[{key!r}]" for key in found)


def _find(treedef, position, seen):
    if treedef is _LEAF:
        seen[0] += 1
        return [] if seen[0] == position + 1 else None
    if treedef is _NONE:
        return None
    _, keys, children = treedef
    for i, child in enumerate(children):
        below = _find(child, position, seen)
        if below is not None:
            return [keys[i] if keys is not None else i, *below]
    return None


def difference(expected, got, where="grads"):
    """``(path, expected, got)`` described at the first place two treedefs differ, or None."""
    if expected == got:
        return None
    if not (isinstance(expected, tuple) and isinstance(got, tuple)) or expected[0] is not got[0]:
        return where, _describe(expected), _describe(got)
    (_, keys, children), (_, got_keys, got_children) = expected, got
    if keys != got_keys:
        return where, f"keys {keys}", f"keys {got_keys}"
    if len(children) != len(got_children):
        return where, f"length {len(children)}", f"length {len(got_children)}"
    for i, (mine, theirs) in enumerate(zip(children, got_children)):
        found = difference(mine, theirs, f"{where}[{(keys[i] if keys is not None else i)!r}]")
        if found is not None:
            return found
    return None


def _describe(treedef):
    if treedef is _LEAF:
        return "an array"
    if treedef is _NONE:
        return "None"
    kind, keys, children = treedef
    return f"a {kind.__name__} of {len(children)}" + (f" with keys {keys}" if keys is not None else "")
