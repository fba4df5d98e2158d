"""Find target layers and swap modules in place, by fully qualified name.

Selection is by a filter function ``(module, fqn) -> bool``, by exact names, or by regular
expressions written ``re:PATTERN`` (full match). A name that matches nothing raises and names it.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rankdown.errors import LayerNotFoundError, RankdownError, UnsupportedLayerError
from rankdown.probe import forward

FilterFn = Callable[[nn.Module, str], bool]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once it has what it came for."""


@contextlib.contextmanager
def hooked(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Hooks registered for the block only: removed when it ends, also when it raises. A
    :class:`StopForward` raised by one of them ends the block quietly."""
    try:
        with contextlib.suppress(StopForward):
            yield
    finally:
        for h in handles:
            h.remove()


def get_module(model: nn.Module, fqn: str) -> nn.Module:
    """``model.get_submodule(fqn)`` with an error that names the layer and suggests close names."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(fqn, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LayerNotFoundError(f"no layer named {fqn!r} in {type(model).__name__}{hint}") from None


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's weight, typed (``module.weight`` is ``Tensor | Module`` to a type checker)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``fqn`` (through the parent's attribute); returns the old module."""
    if not fqn:
        raise LayerNotFoundError("cannot replace the root module")
    old = get_module(model, fqn)
    parent_name, _, child = fqn.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    setattr(parent, child, new)
    return old


@contextlib.contextmanager
def swapped(model: nn.Module, fqn: str, new: nn.Module) -> Iterator[nn.Module]:
    """``new`` at ``fqn`` for the duration of the block, the original back afterwards (also on
    error): for scoring one candidate layer inside the whole model."""
    old = replace_module(model, fqn, new)
    try:
        yield model
    finally:
        replace_module(model, fqn, old)


def shared_modules(model: nn.Module) -> dict[str, list[str]]:
    """fqn -> every other fqn at which the same module object is reachable."""
    seen: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        seen.setdefault(id(mod), []).append(name)
    return {n: names for names in seen.values() if len(names) > 1 for n in names}


def _matches(fqn: str, selectors: Iterable[str]) -> bool:
    for sel in selectors:
        if sel.startswith("re:"):
            if re.fullmatch(sel[3:], fqn):
                return True
        elif sel == fqn:
            return True
    return False


def check_selectors(selectors: Iterable[str]) -> None:
    """Layer names or ``re:PATTERN``: no empty one, no pattern that does not compile."""
    for sel in selectors:
        if not isinstance(sel, str) or not sel.strip() or sel == "re:":
            raise RankdownError(f"layer selector {sel!r} is empty")
        if sel.startswith("re:"):
            try:
                re.compile(sel[3:])
            except re.error as exc:
                raise RankdownError(f"layer pattern {sel!r} is not a valid regular expression ({exc})") from None


@dataclass
class Selection:
    targets: list[str]  # layers to factorize, in model order
    skipped: dict[str, str]  # layer -> why it stays dense (only layers of a factorizable type)


def select_layers(
    model: nn.Module,
    *,
    is_candidate: Callable[[str, nn.Module], object],
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    filter_fn: FilterFn | None = None,
) -> Selection:
    """Pick the layers to factorize.

    ``is_candidate(fqn, module)`` raises UnsupportedLayerError for a layer it cannot handle.
    With ``layers`` given, every selector must match something, and a layer named exactly must be
    supported (an explicit request for an unsupported layer is an error, never a silent skip).
    Without it, every Conv2d/Linear is considered and unsupported ones are reported as skipped.
    """
    layers = list(layers) if layers is not None else None
    skip = list(skip)
    check_selectors([*(layers or []), *skip])
    shared = shared_modules(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is not None:
        for sel in layers:
            if sel.startswith("re:"):
                if not any(re.fullmatch(sel[3:], n) for n, _ in named):
                    raise LayerNotFoundError(f"pattern {sel!r} matches no layer of {type(model).__name__}")
            else:
                get_module(model, sel)
    targets, skipped = [], {}
    exact = {sel for sel in layers or () if not sel.startswith("re:")}
    for name, mod in named:
        # An exact name is a demand: an unsupported layer is an error. A pattern is a broad brush:
        # it picks among conv/linear layers and reports the unsupported ones as skipped.
        explicit = name in exact
        if layers is not None and not (explicit or _matches(name, layers)):
            continue
        if not explicit and not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        if _matches(name, skip):
            skipped[name] = "skipped by request"
            continue
        try:
            if name in shared:
                others = [o for o in shared[name] if o != name]
                raise UnsupportedLayerError(name, type(mod).__name__, f"the same module is also used as {others}")
            is_candidate(name, mod)
        except UnsupportedLayerError as exc:
            if explicit:
                raise
            skipped[name] = exc.reason
            continue
        targets.append(name)
    return Selection(targets, skipped)


def record_inputs(model: nn.Module, example, fqns: list[str]) -> dict[str, torch.Tensor]:
    """One example of each layer's input (batch 1, on the meta device), from a probe forward.

    Rank policies that budget MACs need the spatial size each layer really sees.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for fqn in fqns:

        def hook(_m, args, fqn=fqn):
            if fqn not in seen and args and isinstance(args[0], torch.Tensor):
                seen[fqn] = torch.empty((1, *args[0].shape[1:]), device="meta", dtype=args[0].dtype)

        handles.append(get_module(model, fqn).register_forward_pre_hook(hook))
    with hooked(handles), torch.no_grad():
        forward(model, example)
    return seen
