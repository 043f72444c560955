"""Flatten and rebuild ``grads`` (SPEC §2, §10).

``grads`` is a single array, a sequence or other iterable of arrays, or nested
containers of arrays with ``None`` leaves. Leaves come out depth-first, mappings in
their own order; ``None`` leaves are skipped. ``flatten`` also returns a ``treedef``
from which ``unflatten`` rebuilds the same structure around new leaves, and ``path``
names a leaf for error messages (``grads['enc'][1]``).

Containers come back as they went in, or are refused (``TypeError``) when flattening:

- ``dict``, ``list``, ``tuple``, ``collections.OrderedDict``, ``collections.UserDict``
  and ``types.MappingProxyType`` (a read-only view of a new dict): by their type;
- namedtuples: by ``_make``; ``collections.defaultdict``: with its ``default_factory``;
- other subclasses of ``dict``, ``list`` and ``UserDict``: their constructors may take
  anything (``Named(name, ...)``), so an empty copy of the container (``copy.copy``,
  then ``clear``) is kept and the rebuilt one is a copy of it, filled — the type and
  its attributes as they were. Their items live in the container itself (in ``.data``,
  which ``UserDict`` copies), so clearing the copy cannot touch the original;
- other tuple subclasses: by their type if it takes the items as ``tuple`` does and
  the instance holds nothing else; other mappings: refused (a shallow copy of one may
  share its items' storage with the original).

A container inside itself and nesting deeper than `MAX_DEPTH` are refused
(``ValueError``), never a bare ``RecursionError``.
"""

import collections
import copy
import functools
import types
from collections.abc import Mapping

import numpy as np

from . import _checks

MAX_DEPTH = 200
"""The deepest nesting of containers accepted (Python's recursion limit allows ~490)."""


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


class _Template:
    """The kind of a container rebuilt as a filled copy of ``empty``, an empty instance of
    its type (see the module docstring). Kinds compare by type."""

    __slots__ = ("empty",)

    def __init__(self, empty):
        self.empty = empty

    def __reduce__(self):
        return _Template, (self.empty,)

    def __eq__(self, other):
        return isinstance(other, _Template) and type(other.empty) is type(self.empty)

    def __hash__(self):
        return hash(type(self.empty))

    def __repr__(self):
        return f"_Template({type(self.empty).__name__})"

    def build(self, keys, values):
        container = copy.copy(self.empty)
        if keys is None:
            container.extend(values)
        else:
            container.update(zip(keys, values))
        return container


# How `flatten` treats an object, by its type (`_rule`)
_AS_LEAF, _BY_TYPE, _NAMEDTUPLE, _DEFAULTDICT, _BY_COPY, _PLAIN_TUPLE, _REFUSED = range(1, 8)  # all true
_MAPPINGS_BY_TYPE = (dict, collections.OrderedDict, collections.UserDict, types.MappingProxyType)


def _rule(cls):
    """How `flatten` treats instances of ``cls`` (remembered in ``_RULES``)."""
    rule = _RULES.get(cls)
    if rule is None:
        rule = _RULES[cls] = _rule_of(cls)
    return rule


_RULES = {}


def _rule_of(cls):
    if issubclass(cls, (str, bytes, np.ndarray, np.generic)):
        return _AS_LEAF
    if cls in _MAPPINGS_BY_TYPE or cls is list or cls is tuple:
        return _BY_TYPE
    if cls is collections.defaultdict:
        return _DEFAULTDICT
    if issubclass(cls, tuple):
        if hasattr(cls, "_fields") and hasattr(cls, "_make"):
            return _NAMEDTUPLE
        return _PLAIN_TUPLE if cls.__new__ is tuple.__new__ else _REFUSED
    if issubclass(cls, (dict, list, collections.UserDict)):
        return _BY_COPY
    return _REFUSED if issubclass(cls, Mapping) else _AS_LEAF


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


def flatten(grads, root="grads"):
    """Return ``(leaves, treedef)``; a top-level iterator is consumed once.

    Raises TypeError for a container that cannot be rebuilt, and ValueError for a
    container inside itself or nested deeper than `MAX_DEPTH`; ``root`` names ``grads``.
    """
    leaves = []
    if _rule(type(grads)) is _AS_LEAF and not _is_array_like(grads) and grads is not None:
        if hasattr(grads, "__iter__") and not isinstance(grads, (str, bytes)):
            grads = list(grads)
    try:
        return leaves, _walk(grads, leaves, MAX_DEPTH)
    except _Unwalkable as error:
        raise error.exception(root) from None


class _Unwalkable(Exception):
    """Raised where a container cannot be walked; the way to it is gathered on the way out.

    ``make_exception`` (path -> the exception to raise) is None for a container nested
    too deep: whether that is a cycle is only worked out then, from the way to it.
    """

    def __init__(self, node, make_exception=None):
        self.chain = [node]  # the containers on the way, innermost first
        self.keys = []  # the keys between them, outermost first
        self.make_exception = make_exception

    def came_through(self, parent):
        """Record the container ``parent`` and the key under which it holds the last one."""
        items = parent.items() if isinstance(parent, Mapping) else enumerate(parent)
        self.keys.insert(0, next(key for key, child in items if child is self.chain[-1]))
        self.chain.append(parent)

    def exception(self, root):
        keys, make = self.keys, self.make_exception
        if make is None:
            first_seen = {}
            for depth, node in enumerate(reversed(self.chain)):  # reached by keys[:depth]
                if id(node) in first_seen:
                    keys, make = keys[:depth], _checks.container_cycle
                    break
                first_seen[id(node)] = depth
            else:
                make = functools.partial(_checks.container_too_deep, limit=MAX_DEPTH)
        shown = "".join(f"[{key!r}]" for key in keys[:8])
        more = f"[... {len(keys) - 8} levels more]" if len(keys) > 8 else ""
        return make(root + shown + more)


def _walk(node, leaves, room):
    """The treedef of ``node``, appending its leaves; ``room``: how many more containers
    may enclose it.

    A container inside itself is found as nesting deeper than `MAX_DEPTH`, which costs
    nothing on the way (no set of the containers seen).
    """
    if node is None:
        return _NONE
    cls = type(node)
    rule = _RULES.get(cls) or _rule(cls)
    if rule is _AS_LEAF:
        leaves.append(node)
        return _LEAF
    if cls is dict:
        kind, keys, values = dict, list(node), node.values()
    elif cls is list or cls is tuple:
        kind, keys, values = cls, None, node
    else:
        kind, keys, values = _container(node, rule)
    if not room:
        raise _Unwalkable(node)
    room -= 1
    try:
        return (kind, keys, [_walk(child, leaves, room) for child in values])
    except _Unwalkable as error:
        error.came_through(node)
        raise


def _container(node, rule):
    """``(kind, keys, values)`` of a container that is not a plain dict, list or tuple."""
    cls = type(node)
    if rule is _REFUSED or (rule is _PLAIN_TUPLE and getattr(node, "__dict__", None)):
        raise _Unwalkable(node, lambda path: _checks.container_refused(path, cls))
    if rule is _BY_TYPE or rule is _NAMEDTUPLE or rule is _PLAIN_TUPLE:
        kind = cls
    elif rule is _DEFAULTDICT:
        kind = _Template(collections.defaultdict(node.default_factory))
    else:
        try:
            empty = copy.copy(node)
            if empty is node or (isinstance(node, collections.UserDict) and empty.data is node.data):
                raise TypeError("the copy shares its items with the original")  # clear would empty both
            empty.clear()
        except Exception as error:  # whatever the type's own copy or clear raised
            reason = error
            raise _Unwalkable(node, lambda path: _checks.container_refused(path, cls, reason)) from None
        if type(empty) is not cls or len(empty):
            raise _Unwalkable(node, lambda path: _checks.container_refused(path, cls))
        kind = _Template(empty)
    if isinstance(node, Mapping):
        keys = list(node)
        return kind, keys, list(node.values())
    return kind, None, node


def entries(node):
    """``(keys, values)`` of a container as `flatten` walks it (``keys`` None for a
    sequence), or None for anything else (a leaf, None, or a container it refuses)."""
    cls = type(node)
    if cls is dict:
        return list(node), list(node.values())
    if cls is list or cls is tuple:
        return None, list(node)
    rule = _rule(cls)
    if rule is _AS_LEAF or rule is _REFUSED:
        return None
    if isinstance(node, Mapping):
        return list(node), list(node.values())
    return None, list(node)


def leaf_count(treedef, where="", depth=0):
    """The number of leaves of ``treedef`` if `flatten` could have made it (a saved one,
    checked); else ValueError with ``(where, expected, got)``, ``where`` like ``[2][1]``."""
    if treedef is _LEAF:
        return 1
    if treedef is _NONE:
        return 0
    if not (type(treedef) is tuple and len(treedef) == 3) or depth >= MAX_DEPTH:
        raise ValueError(where, "a treedef: _LEAF, _NONE or a (kind, keys, children) triple", treedef)
    kind, keys, children = treedef
    cls = type(kind.empty) if isinstance(kind, _Template) else kind
    if isinstance(kind, _Template):
        known = _rule(cls) in (_BY_COPY, _DEFAULTDICT) and not len(kind.empty)
    else:
        known = isinstance(kind, type) and _rule(kind) in (_BY_TYPE, _NAMEDTUPLE, _PLAIN_TUPLE)
    if not known:
        raise ValueError(f"{where}[0]", "a container kind that flatten makes", kind)
    if type(children) is not list:
        raise ValueError(f"{where}[2]", "a list of children", children)
    if issubclass(cls, Mapping):
        if type(keys) is not list or len(keys) != len(children) or not _distinct_keys(keys):
            raise ValueError(f"{where}[1]", f"a list of {len(children)} distinct keys", keys)
    elif keys is not None:
        raise ValueError(f"{where}[1]", "None (a sequence has no keys)", keys)
    elif _rule(cls) is _NAMEDTUPLE and len(children) != len(cls._fields):
        raise ValueError(f"{where}[2]", f"{len(cls._fields)} children, one per field of {cls.__name__}", children)
    return sum(leaf_count(child, f"{where}[2][{i}]", depth + 1) for i, child in enumerate(children))


def _distinct_keys(keys):
    try:
        return len(set(keys)) == len(keys)
    except TypeError:  # an unhashable key
        return False


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
    if isinstance(kind, _Template):
        return kind.build(keys, values)
    if kind is types.MappingProxyType:
        return types.MappingProxyType(dict(zip(keys, values)))
    if keys is not None:
        return kind(zip(keys, values))
    if kind is tuple or kind is list:
        return kind(values)
    if _rule(kind) is _NAMEDTUPLE:
        return kind._make(values)
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
    if not (isinstance(expected, tuple) and isinstance(got, tuple)) or expected[0] != got[0]:
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
    name = type(kind.empty).__name__ if isinstance(kind, _Template) else kind.__name__
    return f"{_checks.with_article(name)} of {len(children)}" + (f" with keys {keys}" if keys is not None else "")
