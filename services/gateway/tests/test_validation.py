"""Per-instance validation: what real files give, the hostile-instance corpus, streaming equivalence."""

from __future__ import annotations

import hashlib
import warnings

import pydicom
import pytest
from corpus import builders as corpus  # tests/conftest.py puts this directory on sys.path
from enclave_gateway.validation import (
    FailureReason,
    InstanceInfo,
    InstanceInspector,
    ValidationFailure,
    ValidationPolicy,
    validate_instance,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)

PHI = (corpus.PLANTED_PATIENT_ID, corpus.PLANTED_PATIENT_NAME, "Secretname")

ACCEPTED_PYDICOM_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "waveform_ecg.dcm",
]


def streamed(data: bytes, sizes: list[int], **kwargs) -> InstanceInfo | ValidationFailure:
    inspector = InstanceInspector(**kwargs)
    for chunk in corpus.split(data, sizes):
        inspector.feed(chunk)
    return inspector.finish()


def refused(result, reason: FailureReason, problem: str | None = None) -> ValidationFailure:
    assert isinstance(result, ValidationFailure), result
    assert result.reason_code == reason, result
    if problem is not None:
        assert result.problem == problem, result
    for value in PHI:
        assert value not in result.message
    return result


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("name", ACCEPTED_PYDICOM_FILES)
def test_pydicom_files_are_accepted_with_their_identity(name) -> None:
    data = corpus.pydicom_file(name)
    info = validate_instance(data)
    assert isinstance(info, InstanceInfo), info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(corpus.PYDICOM_TEST_FILES / name, stop_before_pixels=True, force=True)
    assert info.sop_class_uid == ds.SOPClassUID
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.study_instance_uid == ds.StudyInstanceUID
    assert info.series_instance_uid == ds.SeriesInstanceUID
    assert info.patient_id == ds.PatientID
    assert info.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert info.has_file_meta
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert streamed(data, [1]) == info
    assert streamed(data, [3, 1000, 17]) == info


@pytest.mark.parametrize(
    ("syntax", "with_meta"),
    [
        (ExplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, True),
        (DeflatedExplicitVRLittleEndian, True),
        (ExplicitVRLittleEndian, False),
        (ImplicitVRLittleEndian, False),
    ],
)
def test_with_meta_or_bare_dataset_in_each_little_endian_encoding(syntax, with_meta) -> None:
    data = corpus.make_instance(syntax, with_meta=with_meta, pixel_bytes=5000)
    info = validate_instance(data)
    assert isinstance(info, InstanceInfo), info
    assert info.has_file_meta is with_meta
    assert info.transfer_syntax_uid == syntax
    assert info.patient_id == corpus.PLANTED_PATIENT_ID
    assert corpus.PLANTED_PATIENT_ID not in repr(info)
    assert streamed(data, [1]) == info


def test_header_verdict_comes_before_the_pixel_data() -> None:
    data = corpus.make_instance(pixel_bytes=100_000, sop_class_uid=CTImageStorage)
    policy = ValidationPolicy(allowed_sop_classes=frozenset({MRImageStorage}))
    inspector = InstanceInspector(policy)
    header_end = corpus.pixel_data_offset(data) + 12
    assert inspector.feed(data[:header_end]) is not None
    assert inspector.failure.reason_code == FailureReason.SOP_CLASS_NOT_SUPPORTED
    assert inspector.failure.sop_instance_uid is not None

    accepted = InstanceInspector()
    assert accepted.feed(data[:header_end]) is None
    assert accepted.header is not None
    assert accepted.header.sop_class_uid == CTImageStorage


# --------------------------------------------------------------------------- hostile instances


def test_truncated_pydicom_files_are_refused_though_pydicom_reads_them() -> None:
    pydicom.dcmread(corpus.PYDICOM_TEST_FILES / "MR_truncated.dcm")  # silently accepted by pydicom
    failure = refused(
        validate_instance(corpus.pydicom_file("MR_truncated.dcm")), FailureReason.CANNOT_UNDERSTAND
    )
    assert failure.problem == "truncated"
    assert "PixelData" in failure.message
    refused(
        validate_instance(corpus.pydicom_file("rtplan_truncated.dcm")),
        FailureReason.CANNOT_UNDERSTAND,
        "truncated",
    )


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
def test_every_cut_inside_the_pixel_data_is_truncation(syntax) -> None:
    data = corpus.make_instance(syntax, pixel_bytes=600)
    full = validate_instance(data)
    assert isinstance(full, InstanceInfo)
    last = len(data) - 1
    deflated = syntax == DeflatedExplicitVRLittleEndian
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    cuts = range(meta_end + 1, last + 1, 5) if deflated else range(last - 590, last + 1, 7)
    for cut in cuts:
        result = validate_instance(data[:cut])
        refused(result, FailureReason.CANNOT_UNDERSTAND, "truncated")
        if not deflated:
            assert result.sop_instance_uid == full.sop_instance_uid


def test_any_cut_never_crashes_and_never_passes_off_another_size() -> None:
    data = corpus.pydicom_file("CT_small.dcm")
    for cut in range(0, len(data), 97):
        result = validate_instance(data[:cut])
        assert isinstance(result, ValidationFailure | InstanceInfo)
        if isinstance(result, InstanceInfo):
            assert result.size == cut


def test_deflated_file_with_stray_trailer_is_read_to_its_attributes() -> None:
    # pydicom's deflated sample has an empty PatientID (and 8 stray bytes after the deflate stream,
    # which pydicom ignores too): the verdict is about the attribute, not the framing.
    failure = refused(
        validate_instance(corpus.pydicom_file("image_dfl.dcm")),
        FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    )
    assert "PatientID" in failure.message


def test_dataset_encoded_unlike_its_meta_is_read_as_pydicom_reads_it() -> None:
    # SC_rgb_jpeg.dcm: no preamble, meta says explicit VR, dataset is implicit VR. Its framing is
    # understood (the verdict is about its empty PatientID, not its VRs).
    failure = refused(
        validate_instance(corpus.pydicom_file("SC_rgb_jpeg.dcm")),
        FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    )
    assert "PatientID" in failure.message


def test_bad_vr() -> None:
    refused(
        validate_instance(corpus.with_bad_vr(corpus.make_instance())),
        FailureReason.CANNOT_UNDERSTAND,
        "bad_vr",
    )


@pytest.mark.parametrize("name", sorted(corpus.NON_DICOM_SAMPLES))
def test_non_dicom_bytes(name) -> None:
    refused(validate_instance(corpus.NON_DICOM_SAMPLES[name]), FailureReason.CANNOT_UNDERSTAND)


def test_empty_instance() -> None:
    refused(validate_instance(b""), FailureReason.CANNOT_UNDERSTAND, "not_dicom")


def test_huge_declared_length() -> None:
    data = corpus.make_instance()
    refused(
        validate_instance(corpus.with_huge_pixel_length(data)),
        FailureReason.CANNOT_UNDERSTAND,
        "declared_length_too_large",
    )
    past_end = corpus.with_huge_pixel_length(data, 10_000)
    refused(validate_instance(past_end), FailureReason.CANNOT_UNDERSTAND, "truncated")


def test_sequence_depth_at_and_past_the_limit() -> None:
    policy = ValidationPolicy(max_sequence_depth=16)
    assert isinstance(validate_instance(corpus.nested_sequences(16), policy), InstanceInfo)
    refused(
        validate_instance(corpus.nested_sequences(17), policy),
        FailureReason.CANNOT_UNDERSTAND,
        "sequence_too_deep",
    )
    refused(
        validate_instance(corpus.nested_sequences(5000)), FailureReason.CANNOT_UNDERSTAND, "sequence_too_deep"
    )


def test_deflate_bomb() -> None:
    bomb = corpus.deflate_bomb()
    assert len(bomb) < 200_000
    refused(validate_instance(bomb), FailureReason.OUT_OF_RESOURCES, "deflate_bomb")


def test_deflate_garbage_and_truncated_deflate() -> None:
    data = corpus.make_instance(DeflatedExplicitVRLittleEndian, pixel_bytes=4000)
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    garbage = data[:meta_end] + b"\xff" * 64
    refused(validate_instance(garbage), FailureReason.CANNOT_UNDERSTAND)
    refused(validate_instance(data[: meta_end + 20]), FailureReason.CANNOT_UNDERSTAND)


def test_transfer_syntax_not_on_the_allow_list() -> None:
    big_endian = corpus.pydicom_file("MR_small_bigendian.dcm")
    failure = refused(validate_instance(big_endian), FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED)
    assert "1.2.840.10008.1.2.2" in failure.message
    assert "accepted" in failure.message
    implicit_only = ValidationPolicy(allowed_transfer_syntaxes=frozenset({ImplicitVRLittleEndian}))
    refused(
        validate_instance(corpus.make_instance(), implicit_only), FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED
    )
    bare_explicit = corpus.make_instance(with_meta=False)
    refused(validate_instance(bare_explicit, implicit_only), FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED)


def test_big_endian_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="Big Endian"):
        ValidationPolicy(allowed_transfer_syntaxes=frozenset({"1.2.840.10008.1.2.2"}))


def test_sop_class_allow_list() -> None:
    data = corpus.make_instance(sop_class_uid=CTImageStorage)
    assert isinstance(validate_instance(data), InstanceInfo)
    mr_only = ValidationPolicy(allowed_sop_classes=frozenset({MRImageStorage}))
    refused(validate_instance(data, mr_only), FailureReason.SOP_CLASS_NOT_SUPPORTED, "sop_class_not_allowed")
    verification = corpus.make_instance(sop_class_uid="1.2.840.10008.1.1")
    refused(validate_instance(verification), FailureReason.SOP_CLASS_NOT_SUPPORTED)


@pytest.mark.parametrize(
    ("sop_class_uid", "name", "why"),
    [
        ("1.2.840.10008.1.3.10", "Media Storage Directory Storage", "the directory (DICOMDIR) of a file-set"),
        ("1.2.840.10008.5.1.1.29", "Hardcopy Grayscale Image Storage SOP Class", "it is retired"),
        ("1.2.840.10008.5.1.1.30", "Hardcopy Color Image Storage SOP Class", "it is retired"),
        ("1.2.840.10008.5.1.4.1.1.8", "Standalone Overlay Storage", "it is retired"),
        ("1.2.840.10008.5.1.4.1.1.6", "Ultrasound Image Storage", "it is retired"),
        ("1.2.840.10008.5.1.4.38.1", "Hanging Protocol Storage", "non-patient object (PS3.4 Annex GG)"),
        ("1.2.840.10008.5.1.4.1.1.501.1", "DICOS CT Image Storage", "it belongs to DICOS, not to PS3.4"),
        ("1.2.840.10008.1.1", "Verification SOP Class", "it is not a Storage SOP class"),
        ("1.2.826.0.1.3680043.8.498.1", None, "not in the DICOM UID registry"),
    ],
)
def test_the_default_allow_list_refuses_classes_other_than_composite_instance_storage(
    sop_class_uid, name, why
) -> None:
    """Found by a conformance review: every class with "Storage" in its name was accepted, so a
    DICOMDIR and retired classes (Hardcopy, Standalone Overlay) were de-identified and released."""
    failure = refused(
        validate_instance(corpus.make_instance(sop_class_uid=sop_class_uid)),
        FailureReason.SOP_CLASS_NOT_SUPPORTED,
        "sop_class_not_allowed",
    )
    named = f"SOP class {sop_class_uid} ({name})" if name else f"SOP class {sop_class_uid}"
    assert failure.message.startswith(f"{named} is not accepted: "), failure.message
    assert why in failure.message
    assert failure.message.endswith(
        "; accepted: the Storage SOP classes of PS3.4 Annex B (composite instances of a patient) that are "
        "not retired"
    )
    assert failure.sop_class_uid == sop_class_uid  # the STOW response references the instance


@pytest.mark.parametrize(
    "sop_class_uid",
    [
        MRImageStorage,
        CTImageStorage,
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR Storage
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan Storage
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.200.2",  # CT Performed Procedure Protocol Storage (of a patient)
    ],
)
def test_the_default_allow_list_accepts_composite_instance_storage_classes(sop_class_uid) -> None:
    assert isinstance(validate_instance(corpus.make_instance(sop_class_uid=sop_class_uid)), InstanceInfo)


def test_a_configured_allow_list_may_take_a_class_the_default_leaves_out() -> None:
    hardcopy = "1.2.840.10008.5.1.1.29"
    legacy = ValidationPolicy(allowed_sop_classes=frozenset({hardcopy}))
    assert isinstance(validate_instance(corpus.make_instance(sop_class_uid=hardcopy), legacy), InstanceInfo)
    failure = refused(
        validate_instance(corpus.make_instance(), legacy), FailureReason.SOP_CLASS_NOT_SUPPORTED
    )
    assert (
        failure.message
        == f"SOP class {MRImageStorage} (MR Image Storage) is not accepted; accepted: the configured SOP classes"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sop_class_uid", ""),
        ("sop_instance_uid", ""),
        ("study_uid", ""),
        ("series_uid", ""),
        ("patient_id", None),
        ("patient_id", ""),
    ],
)
def test_missing_required_attribute(field, value) -> None:
    data = corpus.make_instance(with_meta=False, **{field: value})
    refused(validate_instance(data), FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, "missing_attribute")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sop_instance_uid", "1.02.3"),
        ("sop_instance_uid", "1.2.abc"),
        ("study_uid", "1..2"),
        ("series_uid", "1." + "2" * 70),
        ("sop_class_uid", "1.2.3."),
    ],
)
def test_invalid_uid_syntax(field, value) -> None:
    with pytest.warns(UserWarning, match="Invalid value|maximum length"):  # pydicom warns while *writing* it
        data = corpus.make_instance(**{field: value})
    failure = refused(validate_instance(data), FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, "invalid_uid")
    assert value not in failure.message


def test_patient_id_longer_than_lo() -> None:
    with pytest.warns(UserWarning, match="exceeds the maximum length"):
        data = corpus.make_instance(patient_id="P" * 65)
    failure = refused(validate_instance(data), FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    assert "P" * 65 not in failure.message


def test_study_uid_mismatch_with_the_url() -> None:
    data = corpus.make_instance()
    assert isinstance(validate_instance(data, expected_study_uid=corpus.STUDY_UID), InstanceInfo)
    failure = refused(
        validate_instance(data, expected_study_uid="1.2.3.999"),
        FailureReason.STUDY_INSTANCE_UID_MISMATCH,
        "study_uid_mismatch",
    )
    assert failure.sop_instance_uid is not None


def test_instance_size_at_and_past_the_limit() -> None:
    data = corpus.make_instance()
    assert isinstance(validate_instance(data, ValidationPolicy(max_instance_bytes=len(data))), InstanceInfo)
    refused(
        validate_instance(data, ValidationPolicy(max_instance_bytes=len(data) - 1)),
        FailureReason.OUT_OF_RESOURCES,
    )


def test_header_window_at_and_past_the_limit() -> None:
    data = corpus.make_instance(with_meta=False)
    header = corpus.pixel_data_offset(data)
    # The header ends where the first element after SeriesInstanceUID starts (InstanceNumber).
    cutoff = data.find(b"\x20\x00\x13\x00")
    assert 0 < cutoff < header
    assert isinstance(validate_instance(data, ValidationPolicy(header_window_bytes=cutoff)), InstanceInfo)
    refused(
        validate_instance(data, ValidationPolicy(header_window_bytes=cutoff - 1)),
        FailureReason.OUT_OF_RESOURCES,
        "header_too_large",
    )


def test_messages_never_carry_planted_values() -> None:
    base = corpus.make_instance()
    cases = [
        corpus.truncate(base, len(base) - 3),
        corpus.with_bad_vr(base),
        corpus.with_huge_pixel_length(base),
        corpus.make_instance(study_uid=""),
    ]
    for data in cases:
        result = validate_instance(data, expected_study_uid="1.2.3")
        refused(result, result.reason_code)


# --------------------------------------------------------------------------- properties


SEEDS = [
    corpus.make_instance(pixel_bytes=300),
    corpus.make_instance(ImplicitVRLittleEndian, with_meta=False, pixel_bytes=300),
    corpus.make_instance(DeflatedExplicitVRLittleEndian, pixel_bytes=300),
    corpus.nested_sequences(3),
    corpus.pydicom_file("JPEG2000-embedded-sequence-delimiter.dcm"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=4)), max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    sizes=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=6),
)
def test_mutated_instances_never_crash_and_chunking_does_not_matter(seed, edits, cut, sizes) -> None:
    data = bytearray(seed)
    for position, patch in edits:
        at = position % len(data)
        data[at : at + len(patch)] = patch
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    data = bytes(data)
    whole = validate_instance(data)
    assert isinstance(whole, InstanceInfo | ValidationFailure)
    assert streamed(data, sizes) == whole
    if isinstance(whole, ValidationFailure):
        for value in PHI:
            assert value not in whole.message


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_refused_without_crashing(data) -> None:
    result = validate_instance(data)
    assert isinstance(result, ValidationFailure)
    assert result.problem != "unparseable", result


def _with_transfer_syntax(data: bytes, old: str, new: str) -> bytes:
    """Swap the meta's transfer syntax for another of the same padded length (the meta stays valid)."""
    old_value, new_value = (uid.encode().ljust(20, b"\0") for uid in (old, new))
    assert data.count(old_value) == 1
    return data.replace(old_value, new_value)


def test_pixel_data_encoded_unlike_its_transfer_syntax_is_refused() -> None:
    """Native Pixel Data under an encapsulated transfer syntax, or fragments under a native one (found by
    an API hunt): accepted before, and no reader downstream could decode it."""
    native = corpus.make_instance(ExplicitVRLittleEndian, pixel_bytes=64)
    mislabelled = _with_transfer_syntax(native, ExplicitVRLittleEndian, RLELossless)
    failure = validate_instance(mislabelled)
    assert isinstance(failure, ValidationFailure) and failure.problem == "pixel_data_encoding"
    assert failure.reason_code == FailureReason.CANNOT_UNDERSTAND
    assert (
        "Pixel Data (7FE0,0010) is native, but the transfer syntax requires encapsulated" in failure.message
    )

    ds = corpus.make_dataset(pixel_bytes=64)
    ds.PixelData = encapsulate([b"\x00" * 64])
    encapsulated = corpus.encode(ds, syntax=RLELossless)
    assert isinstance(validate_instance(encapsulated), InstanceInfo)
    failure = validate_instance(_with_transfer_syntax(encapsulated, RLELossless, ExplicitVRLittleEndian))
    assert isinstance(failure, ValidationFailure) and failure.problem == "pixel_data_encoding"
    assert "is encapsulated, but the transfer syntax requires native" in failure.message


@pytest.mark.parametrize(
    ("charset", "written", "expected"),
    [
        ("ISO_IR 192", "HÜNTER-山田", "HÜNTER-山田"),
        ("ISO_IR 192", "HUNTPID-" + "Å" * 30, "HUNTPID-" + "Å" * 30),
        ("ISO_IR 100", "MÜLLER-0042", "MÜLLER-0042"),
        ("GB18030", "王伟-7", "王伟-7"),
        ("", ["FIRST", "SECOND"], "FIRST\\SECOND"),
    ],
)
def test_the_patient_id_is_read_in_its_character_set(charset, written, expected) -> None:
    """Found by a pipeline hunt: the gateway read PatientID's bytes as ASCII, so a non-ASCII id got
    another patient key than ingest's (its instances went missing from the patient query), and a
    38-character UTF-8 id (68 bytes) was refused as "longer than 64 characters". The same cases are in
    services/ingest/tests/test_dicom_check.py: both services must read the same text."""
    ds = corpus.make_dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientID = written
    info = validate_instance(corpus.encode(ds))
    assert isinstance(info, InstanceInfo), info
    assert info.patient_id == expected


def test_a_patient_id_past_64_characters_is_refused() -> None:
    ds = corpus.make_dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "Å" * 65
    failure = validate_instance(corpus.encode(ds))
    assert isinstance(failure, ValidationFailure) and failure.problem == "invalid_patient_id"


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\xfe\xff", b"AB\x1b$BCD"])
def test_a_patient_id_that_is_not_text_in_its_character_set_is_refused(raw) -> None:
    """Found by an API hunt: bytes invalid in the declared set decoded to replacement characters, so
    different patients (FF FE, FE FF) got one patient key."""
    ds = corpus.make_dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    data = corpus.encode(ds)
    old = corpus.PLANTED_PATIENT_ID.encode() + b" "  # padded to an even length
    new = raw.ljust(len(old), b" ")
    assert data.count(old) == 1
    data = data.replace(old, new)
    failure = validate_instance(data)
    assert isinstance(failure, ValidationFailure) and failure.problem == "invalid_patient_id", failure
    assert "Specific Character Set" in failure.message


# --------------------------------------------------------------------------- VRs of what the pipeline reads

#: (keyword, tag, VR written): an explicit-VR attribute the gateway, ingest or deid read, under a VR
#: that is not its standard one.
WRONG_VRS = [
    ("SeriesInstanceUID", 0x0020000E, b"FD", "UI"),
    ("SOPClassUID", 0x00080016, b"SH", "UI"),
    ("StudyInstanceUID", 0x0020000D, b"UL", "UI"),
    ("PatientID", 0x00100020, b"FD", "LO"),
    ("PatientID", 0x00100020, b"PN", "LO"),
    ("Modality", 0x00080060, b"FD", "CS"),
    ("ImageType", 0x00080008, b"FD", "CS"),
    ("BurnedInAnnotation", 0x00280301, b"US", "CS"),
]


def _reading_the_pipeline_attributes() -> Dataset:
    ds = corpus.make_dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    return ds


@pytest.mark.parametrize(("keyword", "tag", "written", "standard"), WRONG_VRS)
def test_an_attribute_the_pipeline_reads_under_another_vr_is_refused(keyword, tag, written, standard) -> None:
    """Found by a conformance review: a SeriesInstanceUID written as FD was accepted (the gateway
    read its bytes without its VR) and ingest failed it as ``unexpected_error`` with a stack location;
    the same defect in PatientID was ``unparseable``, and in Modality it stopped deid."""
    ds = _reading_the_pipeline_attributes()
    data = corpus.with_element_vr(corpus.encode(ds), tag, written)
    failure = refused(validate_instance(data), FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, "wrong_vr")
    name = f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    assert failure.message == f"{name} has VR {written.decode()}; it must be {standard} (PS3.6)"
    # the failure names the instance, for the STOW response
    assert (failure.sop_class_uid, failure.sop_instance_uid) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert streamed(data, [1]) == failure
    assert streamed(data, [7, 64, 3]) == failure


def test_the_first_attribute_under_another_vr_is_the_one_named() -> None:
    data = corpus.encode(_reading_the_pipeline_attributes())
    data = corpus.with_element_vr(data, 0x00280301, b"US")
    data = corpus.with_element_vr(data, 0x00080060, b"FD")
    failure = validate_instance(data)
    assert isinstance(failure, ValidationFailure) and failure.message.startswith("Modality (0008,0060)")


@pytest.mark.parametrize("tag", [0x0020000E, 0x00100020, 0x00080060, 0x00280301])
def test_an_attribute_written_as_un_of_defined_length_is_read_by_its_standard_vr(tag) -> None:
    """PS3.5 6.2.2: UN is what a sender writes when it does not know the VR; pydicom reads it by the
    dictionary, so the pipeline reads the same value."""
    ds = _reading_the_pipeline_attributes()
    info = validate_instance(corpus.with_element_vr(corpus.encode(ds), tag, b"UN"))
    assert isinstance(info, InstanceInfo), info
    assert (info.series_instance_uid, info.patient_id) == (ds.SeriesInstanceUID, corpus.PLANTED_PATIENT_ID)


def test_an_attribute_written_as_un_of_undefined_length_is_refused() -> None:
    data = corpus.with_element_vr(
        corpus.encode(corpus.make_dataset()), 0x00080060, b"UN", undefined_length=True
    )
    failure = refused(validate_instance(data), FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, "wrong_vr")
    assert failure.message == "Modality (0008,0060) has VR UN of undefined length; it must be CS (PS3.6)"


def test_an_implicit_vr_instance_is_read_by_the_dictionary() -> None:
    ds = _reading_the_pipeline_attributes()
    info = validate_instance(corpus.encode(ds, syntax=ImplicitVRLittleEndian))
    assert isinstance(info, InstanceInfo) and info.patient_id == corpus.PLANTED_PATIENT_ID
