"""Alias operations on the MLflow model registry: promote, roll back, and creating versions safely.

A registered model's versions carry three aliases (names from `RegisterConfig`):
`candidate` (every new version), `champion` (what serving follows) and `previous` (the champion
that was replaced: what a rollback restores). The registered model keeps the order of its
champions in a tag, `champion.history` (oldest first, the last `HISTORY_LENGTH`), so a second
rollback knows which version was champion before `previous`.

Concurrency (several pipeline runs or people promoting at once). MLflow stores an alias as one
row per (model, alias) under a unique key: an alias always points at exactly one version, so no
race can leave two champions, and the aliases set here only ever name versions that exist (these
commands never delete versions). MLflow's SQL store writes an alias by reading, then inserting
or updating, so two first writers of the same alias clash on the key (PostgreSQL answers
"duplicate key"); `set_alias` retries that, and the retry is an update. MLflow has no
compare-and-set, so what a race CAN do:
- two promotes at once: both succeed, the later write wins `champion`; `previous` may name the
  champion from before both (the loser of the race is then neither champion nor previous), and
  `champion.history` (a read-modify-write of one tag) may miss one of the two;
- a promote racing a rollback: the final champion is whichever wrote last.
After every move the final alias state is read back and returned, so the caller prints what the
registry really holds rather than what it meant to write. Version creation itself is safe: the
server allocates version numbers in a transaction and `create_version` retries the server's
"gave up after N attempts" answer under contention, so concurrent registrations all get
distinct versions.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

HISTORY_TAG = "champion.history"
HISTORY_LENGTH = 50  # versions kept in the tag (MLflow tag values are capped at 5000 characters)


class RegistryError(Exception):
    """An alias operation that cannot be done: unknown model or version, nothing to roll back to."""


@dataclass(frozen=True)
class AliasMove:
    """One alias change: `alias` went from version `before` to `after` (None: unset / removed)."""

    alias: str
    before: str | None
    after: str | None

    def __str__(self) -> str:
        def show(version: str | None) -> str:
            return f"v{version}" if version else "(none)"

        return f"{self.alias}: {show(self.before)} -> {show(self.after)}"


def _is_missing(error: Exception) -> bool:
    return getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def aliases(client: Any, name: str) -> dict[str, str]:
    """{alias: version} of registered model `name`; RegistryError naming the model when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if _is_missing(error):
            raise RegistryError(f"no registered model named {name!r} in the registry") from error
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the alias (or the model) does not exist."""
    try:
        return aliases(client, name).get(alias)
    except RegistryError:
        return None


def history(client: Any, name: str) -> list[str]:
    """Versions that were champion, oldest first (from the registered model's history tag)."""
    tags = client.get_registered_model(name).tags or {}
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v.strip().isdigit()]


def _set_history(client: Any, name: str, versions: list[str]) -> None:
    _retry_clash(client.set_registered_model_tag, name, HISTORY_TAG, ",".join(versions[-HISTORY_LENGTH:]))


def set_alias(client: Any, name: str, alias: str, version: str) -> None:
    """Point `alias` of `name` at `version`, safe against a concurrent writer of the same alias."""
    _retry_clash(client.set_registered_model_alias, name, alias, str(version))


# How SQL stores word a unique-key clash (PostgreSQL, SQLite, MySQL).
_CLASH_MARKERS = ("duplicate key", "UniqueViolation", "UNIQUE constraint failed", "Duplicate entry")


def _retry_clash(call: Any, *args: Any, attempts: int = 6) -> Any:
    """Run a registry write, retrying when a concurrent writer inserted the same row first.

    MLflow's SQL store sets an alias or tag by reading the row and inserting it when missing; two
    writers that both find it missing clash on the unique key, and the loser gets an error
    although nothing is wrong. On the retry the row exists and the write becomes an update.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call(*args)
        except MlflowException as error:
            if not any(marker in str(error) for marker in _CLASH_MARKERS) or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
    raise AssertionError("unreachable")


def _require_version(client: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    aliases(client, name)  # a clear error for an unknown model first
    try:
        client.get_model_version(name, str(version))
    except MlflowException as error:
        if not _is_missing(error) and getattr(error, "error_code", "") != "INVALID_PARAMETER_VALUE":
            raise
        known = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
        raise RegistryError(f"model {name!r} has no version {version!r} (versions: "
                            f"{', '.join(map(str, known)) or 'none'})") from error


def _moves(before: dict[str, str], after: dict[str, str], names: tuple[str, ...]) -> list[AliasMove]:
    return [AliasMove(a, before.get(a), after.get(a)) for a in names if before.get(a) != after.get(a)]


def promote(client: Any, name: str, version: str | int, champion_alias: str = "champion",
            previous_alias: str = "previous") -> list[AliasMove]:
    """Make `version` the champion; the replaced champion becomes `previous`. Returns what moved.

    Promoting the version that is already champion changes nothing (an empty list).
    """
    version = str(version)
    _require_version(client, name, version)
    before = aliases(client, name)
    current = before.get(champion_alias)
    if current == version:
        return []
    if current is not None:
        # `previous` first: if the process dies in between, champion is still the old version
        # and previous merely names it too; never a champion with a stale previous.
        set_alias(client, name, previous_alias, current)
    set_alias(client, name, champion_alias, version)
    past = history(client, name)
    if current is not None and (not past or past[-1] != current):
        past.append(current)  # champions set before the history tag existed (or by hand)
    _set_history(client, name, past + [version])
    return _moves(before, aliases(client, name), (champion_alias, previous_alias))


def rollback(client: Any, name: str, champion_alias: str = "champion",
             previous_alias: str = "previous") -> list[AliasMove]:
    """Champion back to the `previous` version; `previous` moves to the champion before that, if known.

    "Known" means the history tag lists a version before the restored one; otherwise the
    `previous` alias is removed. RegistryError when no version is aliased `previous`.
    """
    before = aliases(client, name)
    target = before.get(previous_alias)
    if target is None:
        raise RegistryError(f"model {name!r} has no {previous_alias!r} version to roll back to "
                            f"(aliases: {before or 'none'})")
    set_alias(client, name, champion_alias, target)
    past = history(client, name)
    # The history up to the restored champion: the entry before it is the new `previous`.
    cut = len(past) - 1 - past[::-1].index(target) if target in past else None
    earlier = past[cut - 1] if cut else None
    if earlier is not None and earlier != target:
        set_alias(client, name, previous_alias, earlier)
    else:
        client.delete_registered_model_alias(name, previous_alias)
    _set_history(client, name, past[: cut + 1] if cut is not None else [target])
    return _moves(before, aliases(client, name), (champion_alias, previous_alias))


def create_version(client: Any, name: str, source: str, run_id: str | None, tags: dict[str, str],
                   attempts: int = 8) -> Any:
    """Create a version of `name` (and the registered model if missing), retrying under contention.

    MLflow's SQL store allocates `max(version) + 1` and retries a clash three times before it
    answers "Giving up"; with many concurrent registrations (parallel pipeline runs) that can
    happen, and nothing was created, so trying again after a random pause is safe.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if getattr(error, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    for attempt in range(attempts):
        try:
            return client.create_model_version(name, source, run_id=run_id, tags=tags)
        except MlflowException as error:
            if "Giving up" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))  # jitter: let the other writers through
    raise AssertionError("unreachable")
