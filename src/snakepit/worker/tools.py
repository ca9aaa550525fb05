"""Tool definitions: the ``@tool`` decorator and the specs derived from signatures and hints.

A tool's parameters, their wire types and which are required all come from its Python signature,
so the spec a client lists and the validation a call gets can never disagree with the code.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, get_args, get_origin, overload

import numpy as np

from ..errors import InvalidArgument
from ..protocol import pb, to_pb
from ..protocol import value_types as vt

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__snakepit_tool__"

Embedding = Annotated[np.ndarray, "embedding"]
"""Annotate a parameter with ``Embedding`` to declare a 1-D float vector instead of a tensor."""

_SCALAR_TYPES: dict[Any, str] = {
    bool: vt.BOOLEAN,
    int: vt.INTEGER,
    float: vt.FLOAT,
    str: vt.STRING,
    bytes: vt.BYTES,
    list: vt.LIST,
    tuple: vt.LIST,
    dict: vt.MAP,
    np.ndarray: vt.TENSOR,
    type(None): vt.NULL,
}


@dataclass(frozen=True, slots=True)
class ToolOptions:
    name: str | None = None
    description: str | None = None
    streaming: bool | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Parameter:
    name: str
    type: str
    required: bool
    default: Any = None
    nullable: bool = False
    description: str = ""


@dataclass(slots=True)
class ToolDef:
    """A bound tool of an adapter instance, ready to validate arguments and be called."""

    name: str
    description: str
    fn: Callable[..., Any]
    parameters: dict[str, Parameter]
    streaming: bool
    is_async: bool
    context_param: str | None
    accepts_extra: bool
    # A sync tool that runs on the worker's event loop instead of its thread pool (``@tool(inline=
    # True)``); the runner turns it off for good if a call proves the tool is not quick.
    inline: bool = False
    calls: int = 0  # inline calls so far
    overran_at: int = 0  # the inline call that last took longer than the runner's budget
    spec: pb.ToolSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = pb.ToolSpec(
            name=self.name,
            description=self.description,
            streaming=self.streaming,
            uses_context=self.context_param is not None,
            parameters=[
                pb.ParameterSpec(
                    name=p.name,
                    type=p.type,
                    required=p.required,
                    description=p.description,
                    default=None if p.required else _default_value(p.default),
                )
                for p in self.parameters.values()
            ],
        )

    def bind(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check and convert call arguments; raise InvalidArgument naming the parameter."""
        if not self.accepts_extra:
            for name in arguments:
                if name not in self.parameters:
                    known = ", ".join(self.parameters) or "none"
                    raise InvalidArgument(
                        f"unknown argument {name!r} for tool {self.name!r} (parameters: {known})"
                    )
        kwargs: dict[str, Any] = {}
        for name, param in self.parameters.items():
            if name not in arguments:
                if param.required:
                    raise InvalidArgument(
                        f"missing required argument {name!r} for tool {self.name!r}"
                    )
                continue
            value = arguments[name]
            if value is None and param.nullable:
                kwargs[name] = None
                continue
            kwargs[name] = vt.coerce(value, param.type, f"argument {name!r} of tool {self.name!r}")
        if self.accepts_extra:
            kwargs.update((k, v) for k, v in arguments.items() if k not in self.parameters)
        return kwargs


def _default_value(value: Any) -> pb.Value | None:
    try:
        return to_pb(value)
    except InvalidArgument:
        return None


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    streaming: bool | None = None,
    inline: bool = False,
) -> Callable[[F], F]: ...
def tool(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    streaming: bool | None = None,
    inline: bool = False,
) -> F | Callable[[F], F]:
    """Mark an adapter method as a tool. Works bare (``@tool``) or with options.

    ``inline=True`` (plain sync tools only) runs the tool on the worker's event loop instead of
    handing it to a thread, which is about a third of a small call's cost. Only for tools that
    finish in well under a millisecond whatever their arguments (arithmetic, lookups): while one
    runs, the worker serves nothing else, and no time limit can interrupt it. A second call
    that takes longer than ``runner.INLINE_BUDGET_SECONDS`` (within 1,000 calls of the first)
    moves the tool to the thread pool for the rest of the worker's life (logged), so a tool
    wrongly declared quick stalls the loop twice.
    """

    def mark(func: F) -> F:
        options = ToolOptions(
            name=name, description=description, streaming=streaming, inline=inline
        )
        setattr(func, _MARK, options)
        return func

    return mark(fn) if fn is not None else mark


def discover(adapter: object) -> dict[str, ToolDef]:
    """Every ``@tool`` of an adapter instance, keyed by tool name."""
    found: dict[str, ToolDef] = {}
    for attr in dir(type(adapter)):
        member = getattr(type(adapter), attr, None)
        options = getattr(member, _MARK, None)
        if not isinstance(options, ToolOptions):
            continue
        definition = build_tool(getattr(adapter, attr), options)
        if definition.name in found:
            raise ValueError(f"two tools are named {definition.name!r}")
        found[definition.name] = definition
    return found


def build_tool(fn: Callable[..., Any], options: ToolOptions) -> ToolDef:
    from .context import SessionContext  # the context module imports this one

    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    parameters: dict[str, Parameter] = {}
    context_param = None
    accepts_extra = False
    for param in signature.parameters.values():
        hint = hints.get(param.name, Any)
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"tool {fn.__name__!r}: *args is not supported, name every parameter")
        if hint is SessionContext or (param.name == "ctx" and hint is Any):
            context_param = param.name
            continue
        type_name, nullable = wire_type_of(hint)
        has_default = param.default is not inspect.Parameter.empty
        parameters[param.name] = Parameter(
            name=param.name,
            type=type_name,
            required=not has_default,
            default=param.default if has_default else None,
            nullable=nullable or (has_default and param.default is None),
        )
    is_async_gen = inspect.isasyncgenfunction(fn)
    is_gen = inspect.isgeneratorfunction(fn)
    streaming = options.streaming if options.streaming is not None else (is_async_gen or is_gen)
    if streaming and not (is_async_gen or is_gen):
        raise TypeError(f"tool {fn.__name__!r} is declared streaming but is not a generator")
    description = options.description or inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0]
    is_async = inspect.iscoroutinefunction(fn) or is_async_gen
    if options.inline and (is_async or streaming or context_param is not None):
        raise TypeError(
            f"tool {fn.__name__!r}: inline=True is for plain sync tools (not async, streaming "
            "or taking a session context, whose store calls would block the loop)"
        )
    return ToolDef(
        name=options.name or fn.__name__,
        description=description,
        fn=fn,
        parameters=parameters,
        streaming=streaming,
        is_async=is_async,
        context_param=context_param,
        accepts_extra=accepts_extra,
        inline=options.inline,
    )


def wire_type_of(hint: Any) -> tuple[str, bool]:
    """``(wire type, accepts None)`` for a type hint; unknown hints accept anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return vt.ANY, True
    origin = get_origin(hint)
    if origin is Annotated:
        base, *extras = get_args(hint)
        if "embedding" in extras:
            return vt.EMBEDDING, False
        return wire_type_of(base)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in get_args(hint) if a is not type(None)]
        nullable = len(members) < len(get_args(hint))
        if len(members) == 1:
            return wire_type_of(members[0])[0], nullable
        if set(members) == {int, float}:
            return vt.FLOAT, nullable
        return vt.ANY, True
    if origin is not None:
        hint = origin
    return _SCALAR_TYPES.get(hint, vt.ANY), hint is type(None)
