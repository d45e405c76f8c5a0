"""Batches whose inputs are charged to safety sessions.

LangChain's `batch` runs one call per input side by side, in no set order. A call on a
safety session starts from what the session's call before it left, so the calls on one
session must run one after another, in input order. `SessionBatch` splits a batch into
chains: the inputs on each session, in order (one chain per session), and the inputs on
no session, which are left to the model's own batch (one search for all of them). The
chains run side by side; concurrent calls on different sessions still decode together
in the model's `GuardEngine`. Each input is decoded once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list, get_executor_for_config

from inference_safeguard.session import SafetySession, SafetySessions


class SessionModel(Protocol):
    """What `batch_on_sessions` needs of a model: its sessions and its calls."""

    session_key: str

    @property
    def sessions(self) -> SafetySessions | None: ...

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any: ...

    async def ainvoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any: ...

    def batch(
        self, inputs: list[Any], config: Any = None, *, return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]: ...  # fmt: skip

    async def abatch(
        self, inputs: list[Any], config: Any = None, *, return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]: ...  # fmt: skip


def batch_on_sessions(
    model: SessionModel,
    inputs: list[Any],
    config: RunnableConfig | Sequence[RunnableConfig] | None,
    kwargs: dict[str, Any],
    return_exceptions: bool,
) -> list[Any] | None:
    """`model.batch(inputs, config, **kwargs)` when some input is on a safety session:
    the calls on each session one after another in input order, the sessions side by
    side, the inputs on no session in one `model.batch`; None when no input is on a
    session (the model then batches as usual)."""
    split = SessionBatch.of(len(inputs), config, kwargs, model.sessions, model.session_key)
    if split is None:
        return None
    return split.run(
        lambda i: model.invoke(inputs[i], split.configs[i], **kwargs),
        lambda free: model.batch(
            [inputs[i] for i in free],
            [split.configs[i] for i in free],
            return_exceptions=True,
            **kwargs,
        ),
        return_exceptions,
    )


async def abatch_on_sessions(
    model: SessionModel,
    inputs: list[Any],
    config: RunnableConfig | Sequence[RunnableConfig] | None,
    kwargs: dict[str, Any],
    return_exceptions: bool,
) -> list[Any] | None:
    """`batch_on_sessions` for async code: `model.ainvoke` and `model.abatch`."""
    split = SessionBatch.of(len(inputs), config, kwargs, model.sessions, model.session_key)
    if split is None:
        return None
    return await split.arun(
        lambda i: model.ainvoke(inputs[i], split.configs[i], **kwargs),
        lambda free: model.abatch(
            [inputs[i] for i in free],
            [split.configs[i] for i in free],
            return_exceptions=True,
            **kwargs,
        ),
        return_exceptions,
    )


class SessionBatch:
    """The inputs of one batch, grouped by the safety session each is charged to.

    Args:
        configs: one `RunnableConfig` per input.
        chains: per session, the indices of its inputs in order.
        free: indices of the inputs on no session.
    """

    def __init__(
        self, configs: list[RunnableConfig], chains: list[list[int]], free: list[int]
    ) -> None:
        self.configs = configs
        self.chains = chains
        self.free = free

    @classmethod
    def of(
        cls,
        count: int,
        config: RunnableConfig | Sequence[RunnableConfig] | None,
        kwargs: dict[str, Any],
        sessions: SafetySessions | None,
        session_key: str,
    ) -> SessionBatch | None:
        """The batch of `count` inputs split by session, or None when no input is on one
        (then the model batches as it does without sessions).

        A `session=` keyword puts every input on that one session; otherwise each input's
        `configurable[session_key]` names its session among `sessions`.
        """
        configs = get_config_list(config, count)  # type: ignore[arg-type]
        if isinstance(kwargs.get("session"), SafetySession):
            return cls(configs, [list(range(count))], [])
        if sessions is None or count == 0:
            return None
        chains: dict[str, list[int]] = {}
        free: list[int] = []
        for index, each in enumerate(configs):
            session_id = ensure_config(each).get("configurable", {}).get(session_key)
            if session_id is None:
                free.append(index)
            else:
                chains.setdefault(str(session_id), []).append(index)
        if not chains:
            return None
        return cls(configs, list(chains.values()), free)

    def run(
        self,
        call: Callable[[int], Any],
        batch_free: Callable[[list[int]], list[Any]],
        return_exceptions: bool,
    ) -> list[Any]:
        """Every input's output, in input order.

        Args:
            call: makes input `index`'s call (on its session).
            batch_free: batches the given inputs on no session; an input's failure comes
                back as its output (LangChain's `return_exceptions=True`).
            return_exceptions: return a failed input's exception as its output instead
                of raising the first one once every input is done.
        """
        outputs: list[Any] = [None] * len(self.configs)

        def chain(indices: list[int]) -> None:
            for index in indices:
                try:
                    outputs[index] = call(index)
                except Exception as error:  # the session's later calls still run
                    outputs[index] = error

        def free() -> None:
            for index, output in zip(self.free, batch_free(self.free), strict=True):
                outputs[index] = output

        with get_executor_for_config(self.configs[0]) as executor:
            futures = [executor.submit(chain, indices) for indices in self.chains]
            if self.free:
                futures.append(executor.submit(free))
            for future in futures:
                future.result()
        return _settled(outputs, return_exceptions)

    async def arun(
        self,
        call: Callable[[int], Awaitable[Any]],
        batch_free: Callable[[list[int]], Awaitable[list[Any]]],
        return_exceptions: bool,
    ) -> list[Any]:
        """`run` for async code: the chains run as tasks (at most the config's
        `max_concurrency` at once)."""
        outputs: list[Any] = [None] * len(self.configs)
        limit = self.configs[0].get("max_concurrency")
        gate = asyncio.Semaphore(limit) if limit else None

        async def chain(indices: list[int]) -> None:
            for index in indices:
                try:
                    if gate is None:
                        outputs[index] = await call(index)
                    else:
                        async with gate:
                            outputs[index] = await call(index)
                except Exception as error:
                    outputs[index] = error

        async def free() -> None:
            for index, output in zip(self.free, await batch_free(self.free), strict=True):
                outputs[index] = output

        await asyncio.gather(
            *(chain(indices) for indices in self.chains), *([free()] if self.free else [])
        )
        return _settled(outputs, return_exceptions)


def _settled(outputs: list[Any], return_exceptions: bool) -> list[Any]:
    if not return_exceptions:
        for output in outputs:
            if isinstance(output, Exception):
                raise output
    return outputs
