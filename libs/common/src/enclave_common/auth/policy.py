"""The access policy: one table of action x role -> scope, and the rules that read it.

A cell's scope says where a role may perform an action:

* ``tenant``: any resource of the principal's own tenant (PHI reads of a *restricted* resource
  additionally need an open break-glass session);
* ``grant``: only a patient for whom an active admin grant names this principal;
* ``break_glass``: only a patient for whom this principal opened a break-glass session;
* no cell: never (403 before any lookup, so a refusal reveals nothing about resources).

Tenant isolation comes before everything resource-level: another tenant's resource is
``NOT_FOUND``, never ``FORBIDDEN``. A principal whose only way in is a grant also gets
``NOT_FOUND`` for a patient it holds no grant on, so it cannot probe which patients exist.
The policy is pure: grants are passed in, or fetched by :meth:`AccessPolicy.authorize`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

import uuid_utils

from enclave_common.auth.actions import BREAK_GLASS_ACTIONS, Action
from enclave_common.auth.errors import InvalidGrantError
from enclave_common.auth.grants import Grant, GrantKind, GrantStore
from enclave_common.auth.roles import Principal, Role


class Scope(StrEnum):
    TENANT = "tenant"
    GRANT = "grant"
    BREAK_GLASS = "break_glass"


PolicyTable = Mapping[Action, Mapping[Role, Scope]]

_T, _G, _B = Scope.TENANT, Scope.GRANT, Scope.BREAK_GLASS
_U, _C, _R, _A, _ADM, _CG = (
    Role.UPLOADER,
    Role.CLINICIAN,
    Role.RESEARCHER,
    Role.AUDITOR,
    Role.ADMIN,
    Role.CAREGIVER,
)

POLICY: PolicyTable = MappingProxyType(
    {
        Action.UPLOAD: {_U: _T},
        Action.READ_STATUS: {_U: _T, _C: _T, _R: _T, _CG: _G},
        Action.READ_RESULTS_PHI: {_C: _T, _CG: _G},
        Action.READ_RESULTS_DEID: {_C: _T, _R: _T},
        Action.QUERY_PATIENT: {_C: _T, _CG: _G},
        Action.READ_LINKAGE: {_C: _B},
        Action.AUDIT_QUERY: {_A: _T},
        Action.AUDIT_VERIFY: {_A: _T, _ADM: _T},
        Action.AUDIT_EXPORT: {_A: _T},
        Action.READ_GRANTS: {_ADM: _T},
        Action.MANAGE_GRANTS: {_ADM: _T},
        Action.READ_RESTRICTIONS: {_ADM: _T},
        Action.MANAGE_RESTRICTIONS: {_ADM: _T},
        Action.QUERY_PATIENT_KEY: {_A: _T, _ADM: _T},
        Action.REVOKE_TOKENS: {_ADM: _T},
        Action.MANAGE_KEYS: {_ADM: _T},
        Action.BREAK_GLASS: {_C: _T},
    }
)
"""THE access policy. docs/access.md embeds :func:`render_policy_table` of it (a test checks)."""


class Outcome(StrEnum):
    ALLOW = "allow"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"


class Basis(StrEnum):
    """Why an ALLOW was given: by role, by an admin's grant, or by a break-glass session."""

    ROLE = "role"
    GRANT = "grant"
    BREAK_GLASS = "break_glass"


_STATUS = {Outcome.ALLOW: 200, Outcome.FORBIDDEN: 403, Outcome.NOT_FOUND: 404}


@dataclass(frozen=True, slots=True)
class Resource:
    """What an action targets, as far as access is concerned: its tenant and, for patient data,
    the patient's pseudonym. ``restricted`` marks records whose PHI needs break-glass even for
    the tenant's clinicians (e.g. a confidentiality flag set by the hospital)."""

    tenant: str
    patient_key: str | None = None
    restricted: bool = False
    #: The study's pseudonymous key, when the resource belongs to one: named in the audit trail only.
    study_key: str | None = None
    #: The upload (its opaque id), when the resource is one upload's instances: named in the audit
    #: trail only.
    upload_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer. ``message`` is safe to return to the client; ``reason`` is a code for
    audit events. When ``break_glass`` is True the caller must raise a security alert."""

    outcome: Outcome
    action: Action
    reason: str
    message: str
    basis: Basis | None = None
    grant_id: str | None = None
    break_glass: bool = False
    break_glass_available: bool = False

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    @property
    def status_code(self) -> int:
        return _STATUS[self.outcome]


DEFAULT_MAX_GRANT = timedelta(days=366)
DEFAULT_BREAK_GLASS = timedelta(hours=1)
DEFAULT_MAX_BREAK_GLASS = timedelta(hours=4)
JUSTIFICATION_MIN_CHARS = 10
JUSTIFICATION_MAX_CHARS = 500


class AccessPolicy:
    """Evaluates :data:`POLICY` (or another table, for tests) and validates grants against it."""

    def __init__(
        self,
        table: PolicyTable = POLICY,
        *,
        max_grant: timedelta = DEFAULT_MAX_GRANT,
        default_break_glass: timedelta = DEFAULT_BREAK_GLASS,
        max_break_glass: timedelta = DEFAULT_MAX_BREAK_GLASS,
    ) -> None:
        self.table = table
        self.max_grant = max_grant
        self.default_break_glass = default_break_glass
        self.max_break_glass = max_break_glass
        self.grantable_actions = frozenset(a for a, row in table.items() if _G in row.values())

    def scopes(self, principal: Principal, action: Action) -> frozenset[Scope]:
        """Every scope the principal's roles give for ``action`` (empty: never allowed)."""
        row = self.table.get(action, {})
        return frozenset(row[r] for r in principal.roles if r in row)

    def permits(self, principal: Principal, action: Action) -> bool:
        """Whether some resource exists on which the principal could perform ``action``."""
        return bool(self.scopes(principal, action))

    def restriction_matters(self, principal: Principal, action: Action, resource: Resource) -> bool:
        """Whether a restriction on ``resource``'s patient could change the decision: a PHI action on
        a patient of the principal's own tenant that one of its roles allows by ``tenant`` cell (a
        grant allows what it names, restricted or not; another tenant's patient is 404 anyway). Only
        then need the restriction be looked up (:class:`~enclave_common.auth.restrictions.RestrictionStore`)."""
        return (
            action.phi
            and not resource.restricted
            and resource.patient_key is not None
            and resource.tenant == principal.tenant
            and _T in self.scopes(principal, action)
        )

    def held_back_by_restrictions(self, principal: Principal) -> frozenset[Role]:
        """The principal's roles whose reads a restriction holds back: those with a ``tenant`` cell on
        a PHI action (a grant or break-glass cell is not held back)."""
        return frozenset(
            role
            for action, row in self.table.items()
            if action.phi
            for role, scope in row.items()
            if scope == _T and role in principal.roles
        )

    def check_lift(self, principal: Principal) -> Decision | None:
        """Separation of duties: None when ``principal`` may lift a restriction, else the FORBIDDEN
        decision (``separation_of_duties``). A principal whose own reads the restriction holds back
        (an admin who is also a clinician) would lift its own limit: another admin must."""
        held = sorted(r.value for r in self.held_back_by_restrictions(principal))
        if not held:
            return None
        return Decision(
            Outcome.FORBIDDEN,
            Action.MANAGE_RESTRICTIONS,
            "separation_of_duties",
            "a restriction cannot be lifted by a principal whose reads it holds back (your roles include "
            f"{', '.join(held)}): an admin without those roles must lift it",
        )

    def check_action(self, principal: Principal, action: Action) -> Decision:
        """Action-level check, before any resource lookup: FORBIDDEN or ALLOW (provisionally, when a
        resource-level decision is still due)."""
        if self.permits(principal, action):
            return Decision(Outcome.ALLOW, action, "permitted", f"{action} is permitted", basis=Basis.ROLE)
        allowed = sorted(r.value for r in self.table.get(action, {}))
        return Decision(
            Outcome.FORBIDDEN,
            action,
            "role_not_permitted",
            f"{action} is not permitted for your roles; roles that may: {', '.join(allowed) or 'none'}",
        )

    def decide(
        self,
        principal: Principal,
        action: Action,
        resource: Resource | None,
        grants: Iterable[Grant],
        now: datetime,
    ) -> Decision:
        """The full decision. ``resource=None`` is a collection-level action in the principal's own
        tenant (an upload, an audit verification); ``grants`` are the principal's active grants."""
        scopes = self.scopes(principal, action)
        if not scopes:
            return self.check_action(principal, action)
        if resource is None:
            if _T in scopes:
                return Decision(
                    Outcome.ALLOW, action, "role", f"{action} permitted by role", basis=Basis.ROLE
                )
            return Decision(
                Outcome.FORBIDDEN,
                action,
                "resource_required",
                f"{action} is only permitted on one patient's records, not on a collection",
            )
        if resource.tenant != principal.tenant:
            return _not_found(action, "other_tenant")
        needs_break_glass = resource.restricted and action.phi
        if _T in scopes and not needs_break_glass:
            return Decision(Outcome.ALLOW, action, "role", f"{action} permitted by role", basis=Basis.ROLE)

        may_break_glass = self.permits(principal, Action.BREAK_GLASS) and action in BREAK_GLASS_ACTIONS
        if resource.patient_key is not None:
            covering = [
                g
                for g in grants
                if g.covers(
                    subject=principal.subject,
                    tenant=principal.tenant,
                    patient_key=resource.patient_key,
                    action=action,
                    now=now,
                )
            ]
            if _G in scopes:
                for grant in covering:
                    if grant.kind is GrantKind.PATIENT:
                        return Decision(
                            Outcome.ALLOW,
                            action,
                            "grant",
                            f"{action} permitted by a patient grant",
                            basis=Basis.GRANT,
                            grant_id=grant.grant_id,
                        )
            if may_break_glass and (_B in scopes or _T in scopes):
                for grant in covering:
                    if grant.kind is GrantKind.BREAK_GLASS:
                        return Decision(
                            Outcome.ALLOW,
                            action,
                            "break_glass",
                            f"{action} permitted under break-glass; this access raises a security alert",
                            basis=Basis.BREAK_GLASS,
                            grant_id=grant.grant_id,
                            break_glass=True,
                        )
        if _T in scopes or _B in scopes:
            available = may_break_glass and resource.patient_key is not None
            return Decision(
                Outcome.FORBIDDEN,
                action,
                "break_glass_required",
                ("this patient's records are restricted by the hospital: " if needs_break_glass else "")
                + f"{action} on this record needs an open break-glass session"
                + (" (open one with a justification)" if available else ""),
                break_glass_available=available,
            )
        return _not_found(action, "no_grant")

    async def authorize(
        self,
        principal: Principal,
        action: Action,
        resource: Resource | None,
        store: GrantStore | None,
        now: datetime,
    ) -> Decision:
        """:meth:`decide`, fetching the principal's grants from ``store`` only when they could matter."""
        grants: list[Grant] = []
        if store is not None and resource is not None and resource.patient_key is not None:
            scopes = self.scopes(principal, action)
            role_suffices = _T in scopes and not (resource.restricted and action.phi)
            if scopes and resource.tenant == principal.tenant and not role_suffices:
                grants = list(
                    await store.active_for(principal.subject, principal.tenant, resource.patient_key, now)
                )
        return self.decide(principal, action, resource, grants, now)

    def new_patient_grant(
        self,
        admin: Principal,
        *,
        grantee: str,
        patient_key: str,
        actions: Iterable[Action],
        not_before: datetime,
        expires_at: datetime,
        justification: str,
        now: datetime,
    ) -> Grant:
        """Validate and build an admin's grant for a caregiver (store it with ``GrantStore.create``)."""
        if not self.permits(admin, Action.MANAGE_GRANTS):
            raise InvalidGrantError("only a principal allowed to manage_grants may create grants")
        if not grantee.strip():
            raise InvalidGrantError("grantee must be the subject of the principal the grant is for")
        if grantee == admin.subject:
            raise InvalidGrantError("a grant cannot name its own creator as grantee")
        if not patient_key.strip():
            raise InvalidGrantError("patient_key must be the patient's pseudonym")
        requested = frozenset(Action(a) for a in actions)
        allowed = sorted(a.value for a in self.grantable_actions)
        if not requested or not requested <= self.grantable_actions:
            raise InvalidGrantError(f"a grant must list one or more grantable actions; grantable: {allowed}")
        _check_window(not_before, expires_at, now, self.max_grant)
        return Grant(
            grant_id=str(uuid_utils.uuid7()),
            kind=GrantKind.PATIENT,
            grantee=grantee,
            tenant=admin.tenant,
            patient_key=patient_key,
            actions=requested,
            not_before=not_before,
            expires_at=expires_at,
            justification=check_justification(justification),
            created_by=admin.subject,
            created_at=now,
        )

    def open_break_glass(
        self,
        clinician: Principal,
        *,
        patient_key: str,
        justification: str,
        now: datetime,
        duration: timedelta | None = None,
    ) -> Grant:
        """Validate and build a break-glass session for ``clinician`` on one patient (store it with
        ``GrantStore.create``; opening it is itself a security alert)."""
        if not self.permits(clinician, Action.BREAK_GLASS):
            raise InvalidGrantError("break-glass is not permitted for your roles")
        if not patient_key.strip():
            raise InvalidGrantError("patient_key must be the patient's pseudonym")
        length = self.default_break_glass if duration is None else duration
        _check_window(now, now + length, now, self.max_break_glass)
        return Grant(
            grant_id=str(uuid_utils.uuid7()),
            kind=GrantKind.BREAK_GLASS,
            grantee=clinician.subject,
            tenant=clinician.tenant,
            patient_key=patient_key,
            actions=BREAK_GLASS_ACTIONS,
            not_before=now,
            expires_at=now + length,
            justification=check_justification(justification),
            created_by=clinician.subject,
            created_at=now,
        )


DEFAULT_POLICY = AccessPolicy()


NOT_FOUND_MESSAGE = "no such resource"


def _not_found(action: Action, reason: str) -> Decision:
    """NOT_FOUND looks the same to the client whatever the reason; the reason is for the audit."""
    return Decision(Outcome.NOT_FOUND, action, reason, NOT_FOUND_MESSAGE)


def _check_window(not_before: datetime, expires_at: datetime, now: datetime, longest: timedelta) -> None:
    if not_before.tzinfo is None or expires_at.tzinfo is None:
        raise InvalidGrantError("not_before and expires_at must carry a timezone (UTC recommended)")
    try:  # 9999-12-31T23:59-14:00 is past the last datetime in UTC: the store could not write it
        not_before.astimezone(UTC), expires_at.astimezone(UTC)
    except OverflowError:
        raise InvalidGrantError("not_before and expires_at must be valid times in UTC") from None
    if not_before - now > longest:
        raise InvalidGrantError(f"not_before may be at most {_days(longest)} from now")
    if expires_at <= not_before:
        raise InvalidGrantError("expires_at must be after not_before (not_before is now when not given)")
    if expires_at <= now:
        raise InvalidGrantError("expires_at must be in the future")
    if expires_at - not_before > longest:
        raise InvalidGrantError(
            f"the window may last at most {_days(longest)}; asked for {_days(expires_at - not_before)}"
        )


def _days(span: timedelta) -> str:
    """A duration as people read it in a message: days, with one decimal when not whole."""
    days = span.total_seconds() / 86_400
    return f"{days:.0f} days" if days == int(days) else f"{days:.1f} days"


def check_justification(
    text: str, refused: Callable[[str], Exception] = InvalidGrantError, *, what: str = "justification"
) -> str:
    """``text`` with its whitespace collapsed, or ``refused(message)`` raised when it is too short or
    too long (grants, break-glass, operator commands' reasons)."""
    cleaned = " ".join(text.split())
    if not cleaned.isprintable():  # control characters, lone surrogates (the store cannot write them)
        raise refused(f"{what} must be printable Unicode text (no control characters or lone surrogates)")
    if not JUSTIFICATION_MIN_CHARS <= len(cleaned) <= JUSTIFICATION_MAX_CHARS:
        raise refused(
            f"{what} must be {JUSTIFICATION_MIN_CHARS} to {JUSTIFICATION_MAX_CHARS} characters "
            f"(got {len(cleaned)}); describe the reason, not the patient"
        )
    return cleaned


_CELL = {_T: "tenant", _G: "grant", _B: "break-glass"}


def render_policy_table(table: PolicyTable = POLICY) -> str:
    """The table as Markdown, rows = actions, columns = roles; docs/access.md embeds it verbatim."""
    roles = list(Role)
    lines = [
        "| action | PHI | " + " | ".join(r.value for r in roles) + " |",
        "|---|---|" + "---|" * len(roles),
    ]
    for action in Action:
        row = table.get(action, {})
        cells = [_CELL[row[r]] if r in row else "-" for r in roles]
        lines.append(f"| `{action.value}` | {'yes' if action.phi else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
