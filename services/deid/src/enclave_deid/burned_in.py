"""Burned-in text risk: which instances are quarantined instead of released (the Clean Pixel Data option
is not implemented, so text in pixels can only be kept out, never cleaned).

Hand-written policy, because PS3.15 gives the criteria (E.3.1) but no library applies them: an instance is
released only when it says BurnedInAnnotation NO, or when it is of a kind not known for burned-in text and
does not say YES. Kinds at risk must also say RecognizableVisualFeatures NO. A kind is recognised by its
SOP class as well as its Modality: a sender may leave Modality empty (Ultrasound Image Storage without
one was released) or write another one.

Graphics in the pixels also include a retired overlay embedded in Pixel Data that cannot be cleared
(``pixel_bits``: compressed pixels, or an overlay inside the stored value): such an instance is
quarantined with the same code, since the Basic Profile removes overlays (PS3.15 E.3.3, Note 1).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from enclave_deid.pixel_bits import unclearable_reason

# Ultrasound, ophthalmic photography and the photographic / screen-capture modalities that routinely carry
# text in pixels.
AT_RISK_MODALITIES = frozenset({"US", "IVUS", "OP", "XC", "ES", "GM", "OT", "DOC"})
# SOP classes of those kinds (PS3.4 B.5), whatever their Modality says.
AT_RISK_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image (retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image (retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": "Wide Field Ophthalmic Photography Stereographic Projection Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": "Wide Field Ophthalmic Photography 3D Coordinates Image",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "Video Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL Slide-Coordinates Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic Image",
    "1.2.840.10008.5.1.1.29": "Hardcopy Grayscale Image (retired)",
    "1.2.840.10008.5.1.1.30": "Hardcopy Color Image (retired)",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
}
WHOLE_SLIDE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
# ImageType values of a whole slide's label photograph and its overview (which often shows the label).
SLIDE_LABEL_IMAGE_TYPES = frozenset({"LABEL", "OVERVIEW"})
# ImageType values (value 3 and on) that vendors use for screen captures.
SCREENSHOT_IMAGE_TYPES = frozenset({"SCREEN SAVE", "SCREENSHOT", "SECONDARY CAPTURE"})
# Conversion Type (0008,0064) values of captured or scanned images.
CAPTURED_CONVERSION_TYPES = frozenset({"WSD", "DV", "DI", "SD", "SI", "DF"})


def _code_string(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def _kind_at_risk(dataset: Dataset) -> str | None:
    """The kind of image known to carry identifying text that ``dataset`` is, or None."""
    modality = _code_string(dataset, "Modality")
    sop_class = str(dataset.get("SOPClassUID", "")).strip()
    image_type = {str(value).strip().upper() for value in (dataset.get("ImageType") or [])}
    if modality in AT_RISK_MODALITIES:
        return f"modality {modality}"
    if sop_class in AT_RISK_SOP_CLASSES:
        return f"SOP class {sop_class} ({AT_RISK_SOP_CLASSES[sop_class]})"
    if (modality == "SM" or sop_class == WHOLE_SLIDE_SOP_CLASS) and image_type & SLIDE_LABEL_IMAGE_TYPES:
        return "whole-slide label or overview ImageType"
    if image_type & SCREENSHOT_IMAGE_TYPES:
        return "screen-capture ImageType"
    conversion = _code_string(dataset, "ConversionType")
    if conversion in CAPTURED_CONVERSION_TYPES:
        return f"ConversionType {conversion}"
    return None


def assess_burned_in_risk(dataset: Dataset) -> str | None:
    """The reason to quarantine ``dataset`` for burned-in identifying text, or None when it may be released.

    Reasons name attributes and standard codes only, never a value that could identify anyone. A value
    that cannot be read raises (the caller quarantines the instance as unsupported).
    """
    burned_in = _code_string(dataset, "BurnedInAnnotation")
    if burned_in == "YES":
        return "BurnedInAnnotation is YES"
    if _code_string(dataset, "SpecimenLabelInImage") == "YES":
        return "SpecimenLabelInImage is YES (the slide label, with its identifiers, is in the pixels)"
    if (overlay := unclearable_reason(dataset)) is not None:
        return overlay
    kind = _kind_at_risk(dataset)
    if kind is None:
        return None
    if burned_in == "NO" and _code_string(dataset, "RecognizableVisualFeatures") == "NO":
        return None
    return (
        f"{kind} is at risk of burned-in text and is not verified clean "
        "(needs BurnedInAnnotation NO and RecognizableVisualFeatures NO)"
    )
