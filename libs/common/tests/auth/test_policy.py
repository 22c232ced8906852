"""The access policy: the whole matrix generated from POLICY, design invariants, spot checks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from enclave_common.auth import (
    BREAK_GLASS_ACTIONS,
    DEFAULT_POLICY,
    POLICY,
    Action,
    Basis,
    Decision,
    Grant,
    GrantKind,
    InMemoryGrantStore,
    Outcome,
    Principal,
    Resource,
    Role,
    Scope,
    render_policy_table,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OWN, OTHER = "hospital-a", "hospital-b"
PATIENT = "pt-7f3a"
HOUR = timedelta(hours=1)

ROLE_SETS: list[frozenset[Role]] = [frozenset({r}) for r in Role] + [
    frozenset({Role.CLINICIAN, Role.CAREGIVER}),
    frozenset({Role.ADMIN, Role.CAREGIVER}),
    frozenset({Role.ADMIN, Role.CLINICIAN}),
    frozenset({Role.RESEARCHER, Role.AUDITOR}),
    frozenset(),
]
RESOURCES = ["collection", "record", "restricted"]
GRANT_STATES = [
    "none",
    "active",
    "expired",
    "not_yet",
    "revoked",
    "other_patient",
    "other_subject",
    "uncovered",
]
BREAK_GLASS_STATES = ["none", "active", "expired"]


def principal(roles: frozenset[Role], subject: str = "alice") -> Principal:
    return Principal(subject=subject, tenant=OWN, roles=roles)


def grant(
    kind: GrantKind, actions: frozenset[Action], *, start: datetime, end: datetime, **changes: object
) -> Grant:
    values: dict[str, object] = {
        "grant_id": f"{kind}-{start.isoformat()}",
        "kind": kind,
        "grantee": "alice",
        "tenant": OWN,
        "patient_key": PATIENT,
        "actions": actions,
        "not_before": start,
        "expires_at": end,
        "justification": "caregiver of the patient",
        "created_by": "root",
        "created_at": NOW - 2 * HOUR,
    }
    values.update(changes)
    return Grant(**values)  # type: ignore[arg-type]


def patient_grants(state: str, action: Action) -> list[Grant]:
    every = frozenset(Action)
    window = {"start": NOW - HOUR, "end": NOW + HOUR}
    match state:
        case "none":
            return []
        case "active":
            return [grant(GrantKind.PATIENT, every, **window)]
        case "expired":
            return [grant(GrantKind.PATIENT, every, start=NOW - 2 * HOUR, end=NOW)]
        case "not_yet":
            return [grant(GrantKind.PATIENT, every, start=NOW + timedelta(seconds=1), end=NOW + HOUR)]
        case "revoked":
            return [
                grant(
                    GrantKind.PATIENT,
                    every,
                    **window,
                    revoked_at=NOW - timedelta(seconds=1),
                    revoked_by="root",
                )
            ]
        case "other_patient":
            return [grant(GrantKind.PATIENT, every, **window, patient_key="pt-other")]
        case "other_subject":
            return [grant(GrantKind.PATIENT, every, **window, grantee="mallory")]
        case "uncovered":
            return [grant(GrantKind.PATIENT, every - {action}, **window)]
    raise AssertionError(state)


def break_glass_sessions(state: str) -> list[Grant]:
    if state == "active":
        return [grant(GrantKind.BREAK_GLASS, BREAK_GLASS_ACTIONS, start=NOW - HOUR, end=NOW + HOUR)]
    if state == "expired":
        return [grant(GrantKind.BREAK_GLASS, BREAK_GLASS_ACTIONS, start=NOW - 3 * HOUR, end=NOW - HOUR)]
    return []


def resource_for(kind: str, tenant: str) -> Resource | None:
    return {
        "collection": None,
        "record": Resource(tenant, PATIENT),
        "restricted": Resource(tenant, PATIENT, restricted=True),
    }[kind]


@dataclass(frozen=True)
class Expected:
    outcome: Outcome
    basis: Basis | None = None


def expected(
    roles: frozenset[Role], action: Action, tenant: str, res: str, grant_state: str, bg: str
) -> Expected:
    """The policy's rules, stated once more from the table and the module docstring."""
    scopes = {POLICY[action][r] for r in roles if r in POLICY[action]}
    if not scopes:
        return Expected(Outcome.FORBIDDEN)
    if res == "collection":
        return Expected(Outcome.ALLOW, Basis.ROLE) if Scope.TENANT in scopes else Expected(Outcome.FORBIDDEN)
    if tenant != OWN:
        return Expected(Outcome.NOT_FOUND)
    if Scope.TENANT in scopes and not (res == "restricted" and action.phi):
        return Expected(Outcome.ALLOW, Basis.ROLE)
    if Scope.GRANT in scopes and grant_state == "active":
        return Expected(Outcome.ALLOW, Basis.GRANT)
    may_break_glass = any(POLICY[Action.BREAK_GLASS].get(r) is Scope.TENANT for r in roles)
    direct = Scope.TENANT in scopes or Scope.BREAK_GLASS in scopes
    if direct and may_break_glass and action in BREAK_GLASS_ACTIONS and bg == "active":
        return Expected(Outcome.ALLOW, Basis.BREAK_GLASS)
    return Expected(Outcome.FORBIDDEN) if direct else Expected(Outcome.NOT_FOUND)


CASES = list(itertools.product(Action, [OWN, OTHER], RESOURCES, GRANT_STATES, BREAK_GLASS_STATES))


def all_decisions(roles: frozenset[Role]) -> list[tuple[tuple[Action, str, str, str, str], Decision]]:
    who = principal(roles)
    return [
        (
            case,
            DEFAULT_POLICY.decide(
                who,
                case[0],
                resource_for(case[2], case[1]),
                patient_grants(case[3], case[0]) + break_glass_sessions(case[4]),
                NOW,
            ),
        )
        for case in CASES
    ]


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda rs: "+".join(sorted(rs)) or "no-role")
def test_policy_matrix(roles: frozenset[Role]) -> None:
    mismatches = []
    for (action, tenant, res, grant_state, bg), decision in all_decisions(roles):
        want = expected(roles, action, tenant, res, grant_state, bg)
        got = Expected(decision.outcome, decision.basis if decision.allowed else None)
        if got != want:
            mismatches.append(((action.value, tenant, res, grant_state, bg), want, got))
        assert decision.break_glass == (decision.basis is Basis.BREAK_GLASS)
        assert decision.status_code == {"allow": 200, "forbidden": 403, "not_found": 404}[decision.outcome]
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda rs: "+".join(sorted(rs)) or "no-role")
async def test_authorize_through_a_store_matches_decide(roles: frozenset[Role]) -> None:
    who = principal(roles)
    for action, tenant, res, grant_state, bg in CASES:
        store = InMemoryGrantStore()
        for g in patient_grants(grant_state, action) + break_glass_sessions(bg):
            await store.create(g)
        decision = await DEFAULT_POLICY.authorize(who, action, resource_for(res, tenant), store, NOW)
        want = expected(roles, action, tenant, res, grant_state, bg)
        assert (decision.outcome, decision.basis if decision.allowed else None) == (
            want.outcome,
            want.basis,
        ), (
            action,
            tenant,
            res,
            grant_state,
            bg,
        )


# Design invariants, checked over every decision without reference to the table.


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda rs: "+".join(sorted(rs)) or "no-role")
def test_design_invariants(roles: frozenset[Role]) -> None:
    for (action, tenant, res, grant_state, bg), decision in all_decisions(roles):
        if tenant == OTHER and res != "collection":
            assert decision.outcome is not Outcome.ALLOW, "tenants are isolated"
            if decision.outcome is not Outcome.FORBIDDEN:
                assert decision.outcome is Outcome.NOT_FOUND
        if action.phi and decision.allowed:
            assert roles & {Role.CLINICIAN, Role.CAREGIVER}, f"{sorted(roles)} must never read PHI"
        if decision.basis is Basis.GRANT:
            assert grant_state == "active"
            assert Role.CAREGIVER in roles
        if decision.basis is Basis.BREAK_GLASS:
            assert bg == "active"
            assert Role.CLINICIAN in roles
        if action is Action.READ_LINKAGE and decision.allowed:
            assert decision.break_glass, "linkage is readable only through break-glass"


def test_a_refusal_by_role_does_not_depend_on_the_resource() -> None:
    """403 before lookup: the same answer for own tenant, other tenant and no resource at all."""
    for roles in ROLE_SETS:
        for action in Action:
            if DEFAULT_POLICY.permits(principal(roles), action):
                continue
            outcomes = {
                DEFAULT_POLICY.decide(principal(roles), action, r, [], NOW).outcome
                for r in (None, Resource(OWN, PATIENT), Resource(OTHER, PATIENT))
            }
            assert outcomes == {Outcome.FORBIDDEN}


def test_caregiver_cannot_probe_which_patients_exist() -> None:
    caregiver = principal(frozenset({Role.CAREGIVER}))
    for action in DEFAULT_POLICY.grantable_actions:
        own = DEFAULT_POLICY.decide(caregiver, action, Resource(OWN, "pt-exists"), [], NOW)
        other = DEFAULT_POLICY.decide(caregiver, action, Resource(OTHER, "pt-exists"), [], NOW)
        assert own.outcome is other.outcome is Outcome.NOT_FOUND
        assert own.message == other.message


# Spot checks written out by hand.


def decide(roles: set[Role], action: Action, resource: Resource | None, grants: list[Grant] = ()) -> Decision:  # type: ignore[assignment]
    return DEFAULT_POLICY.decide(principal(frozenset(roles)), action, resource, list(grants), NOW)


def test_spot_checks() -> None:
    record, restricted, elsewhere = (
        Resource(OWN, PATIENT),
        Resource(OWN, PATIENT, True),
        Resource(OTHER, PATIENT),
    )
    active = patient_grants("active", Action.READ_RESULTS_PHI)
    session = break_glass_sessions("active")

    assert decide({Role.CLINICIAN}, Action.READ_RESULTS_PHI, record).outcome is Outcome.ALLOW
    assert decide({Role.CLINICIAN}, Action.READ_RESULTS_PHI, elsewhere).outcome is Outcome.NOT_FOUND
    assert decide({Role.CLINICIAN}, Action.UPLOAD, None).outcome is Outcome.FORBIDDEN
    assert decide({Role.UPLOADER}, Action.UPLOAD, None).outcome is Outcome.ALLOW
    assert decide({Role.UPLOADER}, Action.READ_STATUS, record).outcome is Outcome.ALLOW
    assert decide({Role.UPLOADER}, Action.READ_RESULTS_PHI, record).outcome is Outcome.FORBIDDEN
    assert decide({Role.RESEARCHER}, Action.READ_RESULTS_PHI, record).outcome is Outcome.FORBIDDEN
    assert decide({Role.RESEARCHER}, Action.READ_RESULTS_DEID, restricted).outcome is Outcome.ALLOW
    assert decide({Role.RESEARCHER}, Action.READ_RESULTS_DEID, elsewhere).outcome is Outcome.NOT_FOUND
    assert decide({Role.AUDITOR}, Action.AUDIT_QUERY, None).outcome is Outcome.ALLOW
    assert decide({Role.AUDITOR}, Action.READ_STATUS, record).outcome is Outcome.FORBIDDEN
    assert decide({Role.ADMIN}, Action.MANAGE_GRANTS, None).outcome is Outcome.ALLOW
    assert decide({Role.ADMIN}, Action.READ_RESULTS_PHI, record, active).outcome is Outcome.FORBIDDEN
    assert decide({Role.ADMIN}, Action.MANAGE_KEYS, elsewhere).outcome is Outcome.NOT_FOUND

    assert decide({Role.CAREGIVER}, Action.READ_RESULTS_PHI, record).outcome is Outcome.NOT_FOUND
    allowed = decide({Role.CAREGIVER}, Action.READ_RESULTS_PHI, record, active)
    assert (allowed.outcome, allowed.basis, allowed.grant_id) == (
        Outcome.ALLOW,
        Basis.GRANT,
        active[0].grant_id,
    )
    assert not allowed.break_glass
    assert decide({Role.CAREGIVER}, Action.READ_RESULTS_PHI, elsewhere, active).outcome is Outcome.NOT_FOUND
    assert decide({Role.CAREGIVER}, Action.READ_RESULTS_DEID, record, active).outcome is Outcome.FORBIDDEN
    assert decide({Role.CAREGIVER}, Action.READ_RESULTS_PHI, None, active).outcome is Outcome.FORBIDDEN

    refused = decide({Role.CLINICIAN}, Action.READ_RESULTS_PHI, restricted)
    assert (refused.outcome, refused.reason, refused.break_glass_available) == (
        Outcome.FORBIDDEN,
        "break_glass_required",
        True,
    )
    glass = decide({Role.CLINICIAN}, Action.READ_RESULTS_PHI, restricted, session)
    assert (glass.outcome, glass.basis, glass.break_glass) == (Outcome.ALLOW, Basis.BREAK_GLASS, True)
    assert decide({Role.CLINICIAN}, Action.READ_RESULTS_DEID, restricted).outcome is Outcome.ALLOW
    assert decide({Role.CLINICIAN}, Action.READ_LINKAGE, record).reason == "break_glass_required"
    assert decide({Role.CLINICIAN}, Action.READ_LINKAGE, record, session).break_glass
    assert decide({Role.CLINICIAN}, Action.READ_LINKAGE, elsewhere, session).outcome is Outcome.NOT_FOUND
    assert decide({Role.CAREGIVER}, Action.READ_RESULTS_PHI, record, session).outcome is Outcome.NOT_FOUND


def test_not_found_reasons_are_for_audit_only() -> None:
    other = decide({Role.CLINICIAN}, Action.READ_RESULTS_PHI, Resource(OTHER, PATIENT))
    no_grant = decide({Role.CAREGIVER}, Action.READ_RESULTS_PHI, Resource(OWN, PATIENT))
    assert (other.reason, no_grant.reason) == ("other_tenant", "no_grant")
    assert other.message == no_grant.message


class CountingStore(InMemoryGrantStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def active_for(self, subject: str, tenant: str, patient_key: str, now: datetime):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return await super().active_for(subject, tenant, patient_key, now)


async def test_authorize_reads_grants_only_when_they_can_matter() -> None:
    store = CountingStore()
    clinician, caregiver = principal(frozenset({Role.CLINICIAN})), principal(frozenset({Role.CAREGIVER}))
    await DEFAULT_POLICY.authorize(clinician, Action.READ_RESULTS_PHI, Resource(OWN, PATIENT), store, NOW)
    await DEFAULT_POLICY.authorize(caregiver, Action.READ_RESULTS_PHI, Resource(OTHER, PATIENT), store, NOW)
    await DEFAULT_POLICY.authorize(caregiver, Action.UPLOAD, Resource(OWN, PATIENT), store, NOW)
    assert store.lookups == 0
    await DEFAULT_POLICY.authorize(caregiver, Action.READ_RESULTS_PHI, Resource(OWN, PATIENT), store, NOW)
    await DEFAULT_POLICY.authorize(
        clinician, Action.READ_RESULTS_PHI, Resource(OWN, PATIENT, True), store, NOW
    )
    assert store.lookups == 2


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda r: "+".join(sorted(r)) or "none")
@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("tenant", [OWN, OTHER])
def test_a_restriction_is_looked_up_exactly_when_it_changes_the_decision(
    roles: frozenset[Role], action: Action, tenant: str
) -> None:
    """``restriction_matters`` False means a restricted resource is decided as an unrestricted one, for
    every grant and break-glass state; True means the restriction changes some decision."""
    who = principal(roles)
    plain, restricted = Resource(tenant, PATIENT), Resource(tenant, PATIENT, restricted=True)
    sessions = [
        patient_grants(g, action) + break_glass_sessions(b) for g in GRANT_STATES for b in BREAK_GLASS_STATES
    ]

    def decided(resource: Resource, grants: list[Grant]) -> tuple[Outcome, Basis | None, bool]:
        decision = DEFAULT_POLICY.decide(who, action, resource, grants, NOW)
        return decision.outcome, decision.basis, decision.break_glass

    differs = any(decided(plain, grants) != decided(restricted, grants) for grants in sessions)
    assert DEFAULT_POLICY.restriction_matters(who, action, plain) is differs
    assert DEFAULT_POLICY.restriction_matters(who, action, restricted) is False  # known already
    assert DEFAULT_POLICY.restriction_matters(who, action, Resource(tenant)) is False  # no patient


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda r: "+".join(sorted(r)) or "none")
def test_a_restriction_is_lifted_only_by_a_principal_whose_reads_it_does_not_hold_back(
    roles: frozenset[Role],
) -> None:
    """Separation of duties: ``held_back_by_restrictions`` names exactly the roles for which a
    restriction turns some allowed read of the own tenant into a refusal (without grants or sessions),
    and ``check_lift`` refuses a principal holding one of them."""
    who = principal(roles)
    held = {
        role
        for role in roles
        for action in Action
        if DEFAULT_POLICY.decide(
            principal(frozenset({role})), action, Resource(OWN, PATIENT), [], NOW
        ).allowed
        and not DEFAULT_POLICY.decide(
            principal(frozenset({role})), action, Resource(OWN, PATIENT, restricted=True), [], NOW
        ).allowed
    }
    assert DEFAULT_POLICY.held_back_by_restrictions(who) == held
    refusal = DEFAULT_POLICY.check_lift(who)
    if held:
        assert refusal is not None and refusal.status_code == 403
        assert (refusal.reason, refusal.action) == ("separation_of_duties", Action.MANAGE_RESTRICTIONS)
        assert all(role.value in refusal.message for role in held)
    else:
        assert refusal is None


def test_every_action_has_a_row_and_the_doc_matches_the_table() -> None:
    assert set(POLICY) == set(Action)
    doc = (Path(__file__).resolve().parents[4] / "docs" / "access.md").read_text(encoding="utf-8")
    begin, end = "<!-- policy-table:begin -->\n", "<!-- policy-table:end -->"
    assert begin in doc, "docs/access.md must embed the policy table between markers"
    assert end in doc, "docs/access.md must embed the policy table between markers"
    embedded = doc.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == render_policy_table(), (
        "docs/access.md is out of date; paste the output of\n"
        "uv run python -c 'from enclave_common.auth import render_policy_table as r; print(r(), end=\"\")'"
    )
