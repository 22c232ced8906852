"""Per-tenant de-identification policy: which PS3.15 Annex E options apply, and their CID 7050 codes."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MethodCode(NamedTuple):
    """A coded De-identification Method (PS3.16 CID 7050), written into (0012,0064)."""

    value: str
    meaning: str
    scheme: str = "DCM"


BASIC_PROFILE = MethodCode("113100", "Basic Application Confidentiality Profile")


class DeidOption(Enum):
    """The Annex E options this service implements, each with its CID 7050 code and Table E.1-1 column."""

    CLEAN_DESCRIPTORS = (MethodCode("113105", "Clean Descriptors Option"), "clean_descriptors")
    RETAIN_LONGITUDINAL_MODIFIED_DATES = (
        MethodCode("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
        "retain_longitudinal_modified_dates",
    )
    RETAIN_PATIENT_CHARACTERISTICS = (
        MethodCode("113108", "Retain Patient Characteristics Option"),
        "retain_patient_characteristics",
    )
    RETAIN_DEVICE_IDENTITY = (MethodCode("113109", "Retain Device Identity Option"), "retain_device_identity")
    RETAIN_UIDS = (MethodCode("113110", "Retain UIDs Option"), "retain_uids")
    RETAIN_SAFE_PRIVATE = (MethodCode("113111", "Retain Safe Private Option"), "retain_safe_private")

    @property
    def code(self) -> MethodCode:
        return self.value[0]

    @property
    def column(self) -> str:
        return self.value[1]


class SafePrivateAttribute(BaseModel):
    """A private attribute known to be safe: private creator, group, element byte (xx of gggg,bbxx)."""

    model_config = ConfigDict(frozen=True)

    creator: str = Field(min_length=1, max_length=64)
    group: int
    element: int = Field(ge=0x00, le=0xFF, description="low byte of the element, without the block")

    @field_validator("group")
    @classmethod
    def _odd_group(cls, group: int) -> int:
        if not (0x0009 <= group <= 0xFFFF and group % 2 == 1):
            raise ValueError(f"private group must be odd and in 0009..FFFF, got {group:#06x}")
        return group


class DeidPolicy(BaseModel):
    """Options of PS3.15 Annex E applied on top of the Basic Profile; everything off is the Basic Profile."""

    model_config = ConfigDict(frozen=True)

    retain_longitudinal_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    clean_descriptors: bool = False
    retain_uids: bool = False
    retain_safe_private: bool = False
    safe_private_attributes: tuple[SafePrivateAttribute, ...] = ()

    @field_validator("safe_private_attributes")
    @classmethod
    def _unique(cls, value: tuple[SafePrivateAttribute, ...]) -> tuple[SafePrivateAttribute, ...]:
        if len(set(value)) != len(value):
            raise ValueError("safe_private_attributes lists the same attribute twice")
        return value

    @property
    def options(self) -> tuple[DeidOption, ...]:
        """Options switched on, in CID 7050 code order."""
        return tuple(option for option in DeidOption if getattr(self, option.column))

    @property
    def method_codes(self) -> tuple[MethodCode, ...]:
        return (BASIC_PROFILE, *(option.code for option in self.options))
