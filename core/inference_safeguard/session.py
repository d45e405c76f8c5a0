"""`SafetySession`: one safety budget per constraint across several generations.

A conversation or an agent run can break a policy a little at a time while every single
response stays within its own budget. A session carries the safety state from one call
to the next: it starts with a total budget per constraint name, each call of
`guard.generate(..., session=session)` is held to what is left (and to the call's own
budget, whichever is smaller), and what the returned response cost is charged to the
session. Once a constraint's budget is spent, the next call refuses (or raises
`SessionBudgetSpentError`, `on_spent="raise"`) without generating.

Choices:
- A refused response was never said, so nothing is charged for it; a cost below 0 (a
  cost model that rewards some text) refunds nothing: a session's budget only shrinks.
- A constraint is spent when nothing is left of it: its remaining budget is below 0
  (text charged with `charge_text`, a response returned over budget), or 0 after some
  cost was charged to it. A session whose budget starts at 0 (no cost tolerated) is not
  spent until something costs it.
- Calls on one session run one at a time (each starts from what the one before left);
  calls on different sessions are independent. Reading the state never waits for a
  running call.
- A batch of prompts on one session is charged prompt by prompt, in order, as the same
  calls made one after another (each starts from what the one before left, so they
  cannot share one search); `SafetySession.run_each`.
- Each result of a call on a session reports what the session had left once the call
  was charged (`GuardResult.session`).
- A constraint the guard has but the session does not name is held per response only;
  a session naming a constraint the guard lacks is refused at the call.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from inference_safeguard.constraints import budget_vector
from inference_safeguard.errors import ConstraintError, SessionBudgetSpentError, SessionStateError
from inference_safeguard.results import GuardResult, SessionState

if TYPE_CHECKING:
    from inference_safeguard.decoder import Decoder

OnSpent = Literal["refuse", "raise"]
FORMAT_VERSION = 1
"""Version of `SafetySession.to_dict`'s layout."""


class SafetySession:
    """Remaining safety budget per constraint, across the calls of a conversation or run.

    Args:
        budgets: total budget per constraint name (the one cost of `cost=` is "cost").
        on_spent: what a call does once the budget is spent: "refuse" (return the
            guard's refusal text, `refused=True`, without generating) or "raise"
            (`SessionBudgetSpentError`).
        session_id: an optional label (a conversation or run id), kept in `to_dict`.

    Raises:
        ConstraintError: no budgets, an empty name, or a budget that is not a finite number.
        ValueError: `on_spent` is neither "refuse" nor "raise".
    """

    def __init__(
        self,
        budgets: Mapping[str, float],
        *,
        on_spent: OnSpent = "refuse",
        session_id: str | None = None,
    ) -> None:
        if not isinstance(budgets, Mapping) or not budgets:
            raise ConstraintError(
                "a SafetySession needs a total budget per constraint name, e.g. "
                "SafetySession({'cost': 1.0})"
            )
        for name, budget in budgets.items():
            _check_entry(name, budget, "budgets")
        if on_spent not in ("refuse", "raise"):
            raise ValueError(f"on_spent must be 'refuse' or 'raise', got {on_spent!r}")
        self.budgets = {name: float(value) for name, value in budgets.items()}
        self.on_spent: OnSpent = on_spent
        self.session_id = session_id
        self._remaining = dict(self.budgets)
        self._charged = dict.fromkeys(self.budgets, 0.0)
        self._turns = 0
        self._state = threading.Lock()  # guards the numbers; held only briefly
        self._turn = threading.Lock()  # one call at a time

    # ------------------------------------------------------------------ state
    def remaining(self) -> dict[str, float]:
        """What is left of each constraint's budget."""
        with self._state:
            return dict(self._remaining)

    def charged(self) -> dict[str, float]:
        """What has been charged to each constraint so far."""
        with self._state:
            return dict(self._charged)

    @property
    def turns(self) -> int:
        """Calls that generated a response charged to this session."""
        with self._state:
            return self._turns

    def spent(self) -> list[str]:
        """The constraints whose budget is spent (see the module), in the session's order."""
        with self._state:
            return self._spent()

    def _spent(self) -> list[str]:
        return [
            name
            for name, left in self._remaining.items()
            if left < 0 or (left <= 0 and self._charged[name] > 0)
        ]

    @property
    def is_spent(self) -> bool:
        """Whether some constraint's budget is spent: the next call will not generate."""
        return bool(self.spent())

    def charge(self, costs: Mapping[str, float]) -> dict[str, float]:
        """Charge `costs` (by constraint name; names the session lacks are ignored, costs
        below 0 count as 0) and return what is left."""
        with self._state:
            for name, cost in costs.items():
                if name in self._remaining and math.isfinite(cost) and cost > 0:
                    self._remaining[name] -= cost
                    self._charged[name] += cost
            return dict(self._remaining)

    def charge_text(self, guard: Decoder, text: str, prompt: str = "") -> dict[str, float]:
        """Charge the cost of `text` (e.g. a tool's result read into the conversation)
        under `guard`'s constraints, as a response to `prompt`; return what is left."""
        costs = guard.constraints.score([prompt], [text])[0].tolist()
        return self.charge(dict(zip(guard.constraints.names, costs, strict=True)))

    # ---------------------------------------------------------------- calls
    def run(
        self,
        guard: Decoder,
        overrides: Mapping[str, Any],
        call: Callable[[dict[str, Any]], GuardResult],
    ) -> GuardResult:
        """Run one call of `guard` on this session.

        `call` generates with the `GuardConfig` overrides it is given (`overrides` with
        the session's budgets applied); its result is charged. When the session is spent,
        `call` is not run.

        Raises:
            ConstraintError: the session names a constraint `guard` does not have.
            SessionBudgetSpentError: spent, and `on_spent` is "raise".
        """
        unknown = sorted(set(self.budgets) - set(guard.constraints.names))
        if unknown:
            raise ConstraintError(
                f"the session budgets {unknown}, which are not constraints of this guard; "
                f"its constraints are {list(guard.constraints.names)}"
            )
        with self._turn:
            config = guard.call_config(overrides)
            own = dict(zip(guard.constraints.names, budget_vector(config), strict=True))
            with self._state:
                spent, left = self._spent(), dict(self._remaining)
            if spent and self.on_spent == "raise":
                raise SessionBudgetSpentError(
                    f"the session's budget is spent for {spent} (left: "
                    + ", ".join(f"{n} {left[n]:.4g}" for n in spent)
                    + "); start a new SafetySession, or use on_spent='refuse' to get "
                    "a refusal instead",
                    remaining=left,
                )
            budgets = {name: min(own[name], left.get(name, own[name])) for name in own}
            if spent:
                return replace(guard.withheld(config, budgets, spent), session=self.state())
            result = call({**_without_budget(overrides), "budgets": budgets})
            if not result.refused:
                self.charge({c.name: c.cost for c in result.constraints})
            with self._state:
                self._turns += 1
            return replace(result, session=self.state())

    def run_each(
        self,
        guard: Decoder,
        count: int,
        overrides: Mapping[str, Any],
        call: Callable[[int, dict[str, Any]], GuardResult],
    ) -> list[GuardResult]:
        """Run `count` calls on this session one after another, in order: call `i` is
        `call(i, overrides with the budgets left)` and starts from what call `i - 1` left,
        so a batch on one session is charged as the same calls made in turn would be
        (once the budget is spent, the rest refuse or raise without generating).
        Calls of other threads may run between them."""
        return [
            self.run(guard, overrides, functools.partial(call, index)) for index in range(count)
        ]

    def state(self) -> SessionState:
        """What the session has left now, as a `GuardResult.session` reports it."""
        with self._state:
            return SessionState(
                session_id=self.session_id,
                remaining=dict(self._remaining),
                spent=bool(self._spent()),
                turns=self._turns,
            )

    # ---------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        """The session as a JSON-able dict; `from_dict` restores it."""
        with self._state:
            return {
                "version": FORMAT_VERSION,
                "session_id": self.session_id,
                "on_spent": self.on_spent,
                "budgets": dict(self.budgets),
                "remaining": dict(self._remaining),
                "charged": dict(self._charged),
                "turns": self._turns,
            }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SafetySession:
        """A session from `to_dict`'s dict.

        Raises:
            SessionStateError: the dict is not a session's state (wrong version, names
                that disagree, numbers that are not finite).
        """
        try:
            if data.get("version") != FORMAT_VERSION:
                raise SessionStateError(
                    f"unsupported session state version {data.get('version')!r}; expected "
                    f"{FORMAT_VERSION}"
                )
            session = cls(
                data["budgets"], on_spent=data["on_spent"], session_id=data.get("session_id")
            )
            remaining, charged = data["remaining"], data["charged"]
            if set(remaining) != set(session.budgets) or set(charged) != set(session.budgets):
                raise SessionStateError(
                    "the session state's remaining and charged budgets must name the same "
                    f"constraints as its budgets {sorted(session.budgets)}"
                )
            for name in session.budgets:
                _check_entry(name, remaining[name], "remaining")
                _check_entry(name, charged[name], "charged")
            turns = data["turns"]
            if isinstance(turns, bool) or not isinstance(turns, int) or turns < 0:
                raise SessionStateError(f"turns must be an int >= 0, got {turns!r}")
        except (KeyError, TypeError, AttributeError, ConstraintError, ValueError) as exc:
            if isinstance(exc, SessionStateError):
                raise
            raise SessionStateError(f"not a SafetySession state: {exc}") from exc
        session._remaining = {name: float(remaining[name]) for name in session.budgets}
        session._charged = {name: float(charged[name]) for name in session.budgets}
        session._turns = turns
        return session

    def __repr__(self) -> str:
        return f"SafetySession(remaining={self.remaining()}, session_id={self.session_id!r})"


def _check_entry(name: Any, value: Any, field: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConstraintError(f"{field} names must be non-empty constraint names, got {name!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConstraintError(f"{field}[{name!r}] must be a finite number, got {value!r}")


def _without_budget(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` less `budget`/`budgets`, which the session's budgets replace."""
    return {k: v for k, v in overrides.items() if k not in ("budget", "budgets")}


class SafetySessions:
    """Safety sessions by id (a conversation, a user, an agent run), each created on first
    use with the same total budgets; thread-safe.

    Args:
        budgets: total budget per constraint name of every new session.
        on_spent: what a spent session's next call does (see `SafetySession`).
        max_sessions: most sessions kept; beyond it the least recently used is
            forgotten (its next call starts a fresh budget). None: no limit.

    Raises:
        ConstraintError: malformed `budgets` (as `SafetySession`).
        ValueError: `max_sessions` below 1.
    """

    def __init__(
        self,
        budgets: Mapping[str, float],
        *,
        on_spent: OnSpent = "refuse",
        max_sessions: int | None = None,
    ) -> None:
        SafetySession(budgets, on_spent=on_spent)  # checks the arguments once
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1 or None, got {max_sessions}")
        self.budgets = dict(budgets)
        self.on_spent: OnSpent = on_spent
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, SafetySession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SafetySession:
        """The session of `session_id`, created with the budgets on first use."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"a session id must be a non-empty string, got {session_id!r}")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = SafetySession(self.budgets, on_spent=self.on_spent, session_id=session_id)
                self._sessions[session_id] = session
                if self.max_sessions is not None and len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(session_id)
            return session

    def put(self, session: SafetySession) -> None:
        """Keep `session` (e.g. restored with `SafetySession.from_dict`) under its id."""
        if not session.session_id:
            raise ValueError("only a session with a session_id can be kept by id")
        with self._lock:
            self._sessions[session.session_id] = session
            self._sessions.move_to_end(session.session_id)

    def drop(self, session_id: str) -> None:
        """Forget a session (its next call starts a fresh budget)."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every session's state by id (`SafetySession.to_dict`)."""
        with self._lock:
            sessions = list(self._sessions.items())
        return {session_id: session.to_dict() for session_id, session in sessions}
