"""Coded vocabulary of the audit trail: DICOM PS3.16 audit codes and RFC 3881 / PS3.15 A.5 enumerations.

Codes are spelled here once. Event IDs are CID 400 ("Audit Event ID"), event type codes CID 401
("Audit Event Type Code"), active participant roles CID 402 ("Audit Active Participant Role ID
Code") and participant object ID types CID 404, all in the DCM coding scheme; the FHIR R4
``audit-event-type`` value set reuses the same codes under ``http://dicom.nema.org/resources/ontology/DCM``.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict

DCM: Final = "DCM"
RFC_3881: Final = "RFC-3881"


class Code(BaseModel):
    """A coded concept (code value, coding scheme designator, code meaning)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str
    system: str = DCM
    display: str


# CID 400 Audit Event ID
APPLICATION_ACTIVITY: Final = Code(code="110100", display="Application Activity")
AUDIT_LOG_USED: Final = Code(code="110101", display="Audit Log Used")
BEGIN_TRANSFERRING_INSTANCES: Final = Code(code="110102", display="Begin Transferring DICOM Instances")
INSTANCES_ACCESSED: Final = Code(code="110103", display="DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Final = Code(code="110104", display="DICOM Instances Transferred")
STUDY_DELETED: Final = Code(code="110105", display="DICOM Study Deleted")
EXPORT: Final = Code(code="110106", display="Export")
IMPORT: Final = Code(code="110107", display="Import")
NETWORK_ENTRY: Final = Code(code="110108", display="Network Entry")
ORDER_RECORD: Final = Code(code="110109", display="Order Record")
PATIENT_RECORD: Final = Code(code="110110", display="Patient Record")
PROCEDURE_RECORD: Final = Code(code="110111", display="Procedure Record")
QUERY: Final = Code(code="110112", display="Query")
SECURITY_ALERT: Final = Code(code="110113", display="Security Alert")
USER_AUTHENTICATION: Final = Code(code="110114", display="User Authentication")

# CID 401 Audit Event Type Code (the subset Enclave emits)
APPLICATION_START: Final = Code(code="110120", display="Application Start")
APPLICATION_STOP: Final = Code(code="110121", display="Application Stop")
LOGIN: Final = Code(code="110122", display="Login")
LOGOUT: Final = Code(code="110123", display="Logout")
NODE_AUTHENTICATION: Final = Code(code="110126", display="Node Authentication")
EMERGENCY_OVERRIDE_STARTED: Final = Code(code="110127", display="Emergency Override Started")
SECURITY_CONFIGURATION: Final = Code(code="110129", display="Security Configuration")
SOFTWARE_CONFIGURATION: Final = Code(code="110131", display="Software Configuration")
USE_OF_RESTRICTED_FUNCTION: Final = Code(code="110132", display="Use of Restricted Function")
OBJECT_SECURITY_ATTRIBUTES_CHANGED: Final = Code(code="110135", display="Object Security Attributes Changed")
SECURITY_ROLES_CHANGED: Final = Code(code="110136", display="Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED: Final = Code(code="110137", display="User security Attributes Changed")

# CID 402 Audit Active Participant Role ID Code
ROLE_APPLICATION: Final = Code(code="110150", display="Application")
ROLE_DESTINATION: Final = Code(code="110152", display="Destination Role ID")
ROLE_SOURCE: Final = Code(code="110153", display="Source Role ID")

# CID 404 Audit Participant Object ID Type Code, plus RFC 3881's patient number
STUDY_INSTANCE_UID: Final = Code(code="110180", display="Study Instance UID")
SOP_CLASS_UID: Final = Code(code="110181", display="SOP Class UID")
NODE_ID: Final = Code(code="110182", display="Node ID")
PATIENT_NUMBER: Final = Code(code="2", system=RFC_3881, display="Patient Number")

EVENT_IDS: Final[tuple[Code, ...]] = (
    APPLICATION_ACTIVITY,
    AUDIT_LOG_USED,
    BEGIN_TRANSFERRING_INSTANCES,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    STUDY_DELETED,
    EXPORT,
    IMPORT,
    NETWORK_ENTRY,
    ORDER_RECORD,
    PATIENT_RECORD,
    PROCEDURE_RECORD,
    QUERY,
    SECURITY_ALERT,
    USER_AUTHENTICATION,
)


class EventAction(StrEnum):
    """EventActionCode (PS3.15 A.5.1, RFC 3881): what was done to the participant objects."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class EventOutcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class ObjectKind(StrEnum):
    """What a participant object is in Enclave. Ids are opaque ids or tenant-scoped pseudonyms, never UIDs."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"
    UPLOAD = "upload"
    ANALYSIS = "analysis"
    REPORT = "report"
    KEY = "key"
    AUDIT_LOG = "audit_log"
    OTHER = "other"


class ObjectTypeCode(IntEnum):
    """ParticipantObjectTypeCode (RFC 3881; FHIR ``audit-entity-type``)."""

    PERSON = 1
    SYSTEM_OBJECT = 2
    ORGANIZATION = 3
    OTHER = 4


class ObjectRole(IntEnum):
    """ParticipantObjectTypeCodeRole (RFC 3881; FHIR ``object-role``), the subset used here."""

    PATIENT = 1
    REPORT = 3
    RESOURCE = 4
    JOB = 20
    SECURITY_RESOURCE = 13
    QUERY = 24


#: How each kind of object is described in a PS3.15 A.5 message: type code, role, ID type code.
OBJECT_CODING: Final[dict[ObjectKind, tuple[ObjectTypeCode, ObjectRole, Code | None]]] = {
    ObjectKind.PATIENT: (ObjectTypeCode.PERSON, ObjectRole.PATIENT, PATIENT_NUMBER),
    ObjectKind.STUDY: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.REPORT, STUDY_INSTANCE_UID),
    ObjectKind.SERIES: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.RESOURCE, None),
    ObjectKind.INSTANCE: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.RESOURCE, None),
    ObjectKind.UPLOAD: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.JOB, None),
    ObjectKind.ANALYSIS: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.JOB, None),
    ObjectKind.REPORT: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.REPORT, None),
    ObjectKind.KEY: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.SECURITY_RESOURCE, None),
    ObjectKind.AUDIT_LOG: (ObjectTypeCode.SYSTEM_OBJECT, ObjectRole.RESOURCE, None),
    ObjectKind.OTHER: (ObjectTypeCode.OTHER, ObjectRole.RESOURCE, None),
}
